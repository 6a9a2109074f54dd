"""File-level operations: they take paths, return result dataclasses, and never import torch.

One module per command (`inspect`, `select`, `push`; `convert/` is a package, imported only by
its public names), and what they share: `hub` (Hub repo ids), `card` (model cards), `checks` (what
a file says about its modules, and what is wrong with it).
"""

#: The version of every JSON document a command writes (`"schema_version"`): one number for all,
#: raised when a document changes incompatibly.
SCHEMA_VERSION = 1
