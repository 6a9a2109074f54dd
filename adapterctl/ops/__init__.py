"""File-level operations: they take paths, return result dataclasses, and never import torch.

One module per command (`inspect`, `select`, `push`; `convert/` is a package, imported only by
its public names), and what they share: `hub` (Hub repo ids), `card` (model cards), `checks` (what
a file says about its modules, and what is wrong with it).
"""
