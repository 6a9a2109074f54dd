"""File-level operations: they take paths, return result dataclasses, and never import torch.

One module per command (`inspect`, `select`, `push`; `convert/`, `merge/`, `extract/`,
`combine/` and `engines/` are packages, imported only by their public names), and what they
share: the JSON schema version and the `--verify` failure line (here), `hub` (Hub repo ids),
`card` (model cards), `checks` (what a file says about its modules, and what is wrong with it).
"""

from __future__ import annotations

from typing import Protocol

#: The version of every JSON document a command writes (`"schema_version"`): one number for all,
#: raised when a document changes incompatibly.
SCHEMA_VERSION = 1


class Worst(Protocol):
    """A check, as the failure message names it (convert's, extract's, combine's and merge's)."""

    @property
    def name(self) -> str: ...
    @property
    def error(self) -> float: ...
    @property
    def threshold(self) -> float: ...


def failure_message(worst: Worst | None) -> str:
    """The error line of a failed `--verify` (every command's): the worst check, where known."""
    if worst is None:
        return "verification failed"
    return (
        f"verification failed: `{worst.name}` off by {worst.error:.3g} "
        f"(allowed {worst.threshold:.3g})"
    )
