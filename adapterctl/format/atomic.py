"""Atomic output directories for the CLI.

An output is built in a hidden temp sibling (`.NAME.adapterctl-tmp-*`), each file fsynced, then
renamed into place. An existing output is refused unless `force`, and then swapped only once the new
one is complete: the old one is renamed aside (`.NAME.adapterctl-old-*`), the new one renamed in,
the old one deleted. Each temp sibling holds an flock for as long as its process lives, so a later
run can tell a stale sibling (its process died) from one in use, and clean up only the stale ones.
An aside copy whose destination is missing is a swap that was interrupted: it is renamed back.
Outputs are never written through a symlink.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from adapterctl.errors import OutputError

log = logging.getLogger(__name__)

_TMP = ".adapterctl-tmp-"
_OLD = ".adapterctl-old-"


def _siblings(dest: Path, marker: str) -> list[Path]:
    prefix = f".{dest.name}{marker}"
    try:
        return [p for p in dest.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def _lock(directory: Path, *, wait: bool) -> int | None:
    """flock a directory (the lock travels with it through renames); None when another holds it."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _owner_alive(path: Path, marker: str) -> bool:
    """Whether the process named in a sibling's name (`.NAME<marker>PID-RANDOM`) still runs."""
    try:
        pid = int(path.name.rsplit(marker, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but is not ours to signal
    return True


def _stale(path: Path, marker: str) -> int | None:
    """A lock on a sibling that is stale: its process is gone and nobody holds its lock."""
    if _owner_alive(path, marker):
        return None  # covers the moment between a sibling's mkdir and its flock
    return _lock(path, wait=False)


def recover(dest: Path) -> None:
    """Undo what an interrupted earlier run left next to `dest`: stale temps, an aside copy."""
    for old in _siblings(dest, _OLD):
        fd = _stale(old, _OLD)
        if fd is None:
            continue
        try:
            if not dest.exists() and not dest.is_symlink():
                os.rename(old, dest)
                log.warning("restored `%s` from an interrupted swap", dest)
            else:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            log.warning("could not clean up `%s`: %s", old, e.strerror)
        finally:
            os.close(fd)
    for tmp in _siblings(dest, _TMP):
        fd = _stale(tmp, _TMP)
        if fd is None:
            continue  # another live process is writing it
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("removed stale temp directory `%s`", tmp)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output(dest: Path, force: bool) -> None:
    """Refuse a symlink, or an existing output without `force`, before any work is done."""
    if dest.is_symlink():
        raise OutputError(
            f"output `{dest}` is a symlink; adapterctl never writes through one",
            hint="pass the real path instead",
        )
    if dest.exists() and not force:
        raise OutputError(f"output `{dest}` already exists", hint="pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output `{dest}` exists and is not a directory")


def check_not_inside(dest: str | os.PathLike[str], inputs: list[str | os.PathLike[str]]) -> None:
    """Refuse an output that is one of the inputs or a folder holding one (replacing it would
    destroy what is being read)."""
    real_out = Path(os.path.realpath(dest))
    for item in inputs:
        real_in = Path(os.path.realpath(item))
        if real_out == real_in or real_out in real_in.parents:
            raise OutputError(
                f"output `{dest}` is `{item}` or a folder that holds it",
                hint="write to a new directory",
            )


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory; on success it becomes `dest`, on failure it disappears."""
    dest = Path(os.path.abspath(dest))
    parent = dest.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write `{dest}`: `{parent}` is not a directory")
    recover(dest)
    check_output(dest, force)
    tmp = parent / f".{dest.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(
            f"cannot write `{dest}`: {e.strerror}", hint=f"check the permissions of `{parent}`"
        ) from None
    lock_fd = _lock(tmp, wait=True)
    try:
        try:
            yield tmp
            fsync_tree(tmp)
        except OSError as e:
            raise OutputError(f"cannot write `{dest}`: {e.strerror}") from None
        _swap_in(tmp, dest, force)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, dest: Path, force: bool) -> None:
    check_output(dest, force)  # the world may have changed while we were writing
    # Without `force` an output is never replaced, whatever appeared since the check above: the
    # plain rename fails on a non-empty `dest`. (Deciding by a second `dest.exists()` here once let
    # a writer that lost the race swap the winner's output aside as if --force had been given.)
    if force and dest.exists():
        _replace(tmp, dest)
        return
    try:
        os.rename(tmp, dest)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            if force:  # another process put `dest` there after our check: replace that one
                _replace(tmp, dest)
                return
            raise OutputError(
                f"output `{dest}` already exists (written by another process meanwhile)",
                hint="pass --force to replace it",
            ) from None
        raise OutputError(f"cannot write `{dest}`: {e.strerror}") from None
    _fsync_dir(dest.parent)


def _replace(tmp: Path, dest: Path) -> None:
    """Swap `tmp` in for an existing `dest` (--force): old aside, new in, old deleted."""
    aside = dest.parent / f".{dest.name}{_OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old_fd = _lock(dest, wait=True)  # held while aside, so no other run restores it meanwhile
    try:
        os.rename(dest, aside)
        try:
            os.rename(tmp, dest)
        except BaseException:  # an interrupt here too: put the old output back first
            if tmp.exists():
                os.rename(aside, dest)
            else:  # it came just after the rename: the new output is whole and in place
                shutil.rmtree(aside, ignore_errors=True)
            raise
        _fsync_dir(dest.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"cannot replace `{dest}`: {e.strerror}") from None
    finally:
        if old_fd is not None:
            os.close(old_fd)
