"""Opening files that strangers made: regular files only, read with a size cap per kind.

A README.md that is a FIFO blocks a plain `open()` for ever; `/dev/zero` makes `read()` grow
without end; a directory or a symlink loop raises an OSError nobody expected. Every file adapterctl
reads goes through `open_regular` (opened with O_NONBLOCK, so a FIFO never blocks, then checked
with `fstat` on the open descriptor, so nothing can swap the file between the check and the read)
and the small ones through `read_small`, which also caps the size by kind.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from adapterctl.errors import AdapterFormatError, AdapterNotFoundError

_MiB = 1024 * 1024
#: the largest file of each kind adapterctl reads whole
LIMITS: dict[str, int] = {
    "adapter config": 16 * _MiB,
    "model card": 4 * _MiB,
    "model config": 16 * _MiB,
    "weights index": 64 * _MiB,
    "token file": 64 * 1024,
}


class UnreadableFileError(AdapterFormatError):
    """A file adapterctl must read is no regular file, is too large, or cannot be opened."""


class NotRegularFileError(UnreadableFileError):
    """A file adapterctl must read is a FIFO, a device, a directory or a socket."""


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], kind: str) -> BinaryIO:
    """`open(path, "rb")` for a regular file (symlinks to one are fine); anything else, a missing
    file included, is an error naming the path and the `kind` of file expected."""
    label = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise AdapterNotFoundError(f"`{label}` does not exist") from e
    except OSError as e:
        raise UnreadableFileError(f"cannot read the {kind} `{label}`: {e.strerror}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(
                f"the {kind} `{label}` is {_kind_of(mode)}, not a regular file",
                hint="replace it with a regular file or remove it",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_at_most(f: BinaryIO, most: int, *, first: int) -> bytes:
    """At most `most` bytes of `f`: `first` (the size the file has, plus one) asked for at once,
    then 64 KiB at a time should it have grown. `f.read(n)` allocates n bytes before it reads, so
    asking for the cap itself would cost the whole cap for every small file."""
    parts: list[bytes] = []
    total, want = 0, first
    while total < most:
        piece = f.read(min(want, most - total))
        if not piece:
            break
        parts.append(piece)
        total += len(piece)
        want = 1 << 16
    return b"".join(parts)


def read_small(
    path: str | os.PathLike[str],
    kind: str,
    *,
    limit: int | None = None,
    same_as: os.stat_result | None = None,
) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (LIMITS[kind] by default); with
    `same_as`, only when the file opened is that one (device and inode: nothing swapped it since
    it was checked)."""
    cap = LIMITS[kind] if limit is None else limit
    label = os.fspath(path)
    with open_regular(path, kind) as f:
        opened = os.fstat(f.fileno())
        if same_as is not None and not os.path.samestat(opened, same_as):
            raise UnreadableFileError(f"the {kind} `{label}` changed while it was being read")
        try:
            size = opened.st_size
            data = _read_at_most(f, cap + 1, first=size + 1) if size <= cap else b""
        except OSError as e:
            raise UnreadableFileError(f"cannot read the {kind} `{label}`: {e.strerror}") from e
    if size > cap or len(data) > cap:
        raise UnreadableFileError(
            f"the {kind} `{label}` is larger than the {cap // 1024} KiB adapterctl reads for one"
        )
    return data


def read_optional(
    path: str | os.PathLike[str], kind: str, *, same_as: os.stat_result | None = None
) -> bytes | None:
    """`read_small`, or None when nothing is at `path` (a broken symlink included)."""
    if not os.path.lexists(path):
        return None
    try:
        return read_small(path, kind, same_as=same_as)
    except AdapterNotFoundError:
        return None
