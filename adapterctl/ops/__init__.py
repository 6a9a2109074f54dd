"""File-level operations: they take paths, return result dataclasses, and never import torch."""
