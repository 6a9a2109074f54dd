"""File-level operations: they take paths, return result dataclasses, and never import torch."""

#: The version of every JSON document a command writes (`"schema_version"`): one number for all,
#: raised when a document changes incompatibly.
SCHEMA_VERSION = 1
