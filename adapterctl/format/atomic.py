"""Atomic output directories, and the one rule that keeps an output away from the inputs.

An output is built in a hidden temp sibling (`.NAME.adapterctl-tmp-*`), each file fsynced, then
renamed into place. An existing output is refused unless `force`, and then swapped only once the new
one is complete: the old one is renamed aside (`.NAME.adapterctl-old-*`), the new one renamed in,
the old one deleted. Each temp sibling holds an flock for as long as its process lives, so a later
run can tell a stale sibling (its process died) from one in use, and clean up only the stale ones.
An aside copy whose destination is missing is a swap that was interrupted (SIGKILL between the two
renames): the next writer renames it back, and `inspect` names it. Outputs are never written
through a symlink.

Several outputs of one command (`save`'s adapter and residual base) are built side by side and
renamed in together: a failure before or during the renames leaves every one as it was.

An output that is, holds or lies inside one of the command's inputs is refused, `force` or not
(`check_inputs`): identity is by device and inode along the kernel's own `..` chain, so a bind
mount, a symlink or a `..` in either path cannot disguise it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

from adapterctl.errors import OutputError

log = logging.getLogger(__name__)

_TMP = ".adapterctl-tmp-"
_OLD = ".adapterctl-old-"
_MAX_DEPTH = 1024  # directories above a path (the kernel's PATH_MAX bounds it anyway)
_MAX_WALK = 100_000  # entries looked at inside one input or output tree
_FS_IOC_GETFLAGS = 0x80086601
_UNDELETABLE_FLAGS = 0x10 | 0x20  # FS_IMMUTABLE_FL | FS_APPEND_FL

StrPath = Union[str, "os.PathLike[str]"]
Ident = tuple[int, int]


def output_path(dest: StrPath) -> Path:
    """The path an output is written at (absolute; `..` taken as written, as the writer does)."""
    return Path(os.path.abspath(dest))


# -- identity ------------------------------------------------------------------------------------


def _ident(path: StrPath) -> Ident | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _above(path: str) -> list[Ident]:
    """The identities of every directory above `path` (or of `path` itself when it is one), found
    by stat along the kernel's `..` chain: bind mounts, symlinks and `..` resolve as they really
    do, not as the text says."""
    if os.path.isdir(path):
        cur = path
    else:
        head, tail = os.path.split(path)
        cur = head or "."
        if tail in ("", ".", ".."):
            cur = path
    chain: list[Ident] = []
    for _ in range(_MAX_DEPTH):
        here = _ident(cur)
        if here is None or (chain and here == chain[-1]):
            break  # `/..` is `/`
        chain.append(here)
        cur = os.path.join(cur, "..")
    return chain


def _relation(out: str, other: str) -> str | None:
    """How output `out` stands to the existing or planned path `other`: "is", "lies inside",
    "holds", or None when they are apart."""
    out_id, other_id = _ident(out), _ident(other)
    if other_id is None:  # two planned outputs: the same name in the same directory
        same_dir = _ident(os.path.dirname(out) or ".") == _ident(os.path.dirname(other) or ".")
        if out_id is None and same_dir and os.path.basename(out) == os.path.basename(other):
            return "is"
        return None
    if other_id == out_id:
        return "is"
    if other_id in _above(out if out_id is not None else os.path.dirname(out) or "."):
        return "lies inside"
    if out_id is not None and out_id in _above(other):
        return "holds"
    return None


def _linked_from(directory: str) -> list[str]:
    """The real files behind the symlinks inside an input directory (a Hub snapshot's files are
    symlinks into the cache's blobs): those are inputs too."""
    found: list[str] = []
    seen = 0
    for dirpath, dirs, files in os.walk(directory):
        for name in dirs + files:
            seen += 1
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                found.append(os.path.realpath(path))
        if seen > _MAX_WALK:
            break
    return found


def check_inputs(dest: StrPath, inputs: Iterable[StrPath | None], *, replaces: bool = True) -> None:
    """THE rule for every writer: refuse an output that is, holds or lies inside any input
    (replacing it, or writing into it, would destroy or change what is being read), with or
    without --force. A writer that only adds files to `dest` and never replaces it
    (`replaces=False`: the library's save_pretrained) may write into a folder holding an input."""
    out = os.fspath(output_path(dest))
    for item in inputs:
        if item is None:
            continue
        label = os.fspath(item)
        candidates = [label]
        if os.path.isdir(label):
            candidates += _linked_from(label)
        for path in candidates:
            if _ident(path) is None:
                continue  # what does not exist cannot be lost
            how = _relation(out, path)
            if how is not None and (replaces or how != "holds"):
                through = "" if path == label else f" (through `{path}`)"
                raise OutputError(
                    f"output `{dest}` {how} the input `{label}`{through}",
                    hint="write to a new directory: --force never replaces or writes into an input",
                )


def check_apart(dests: Sequence[StrPath]) -> None:
    """Several outputs of one command must be different places, none inside another."""
    outs = [os.fspath(output_path(d)) for d in dests]
    for i, a in enumerate(outs):
        for j in range(i):
            how = _relation(a, outs[j])
            if how is None:
                how = _relation(outs[j], a)
            if how is not None:
                raise OutputError(
                    f"the outputs `{dests[j]}` and `{dests[i]}` overlap: one {how} the other",
                    hint="write each to its own new directory",
                )


# -- siblings, locks and recovery ---------------------------------------------------------------


def _siblings(dest: Path, marker: str) -> list[Path]:
    prefix = f".{dest.name}{marker}"
    try:
        return sorted(p for p in dest.parent.iterdir() if p.name.startswith(prefix))
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


def interrupted_swap(dest: StrPath) -> Path | None:
    """The aside copy holding `dest`'s previous contents, when `dest` is missing because a
    --force replace was interrupted between its two renames; else None."""
    path = output_path(dest)
    if os.path.lexists(path):  # (lexists: a path the system cannot even look up is no swap)
        return None
    olds = _siblings(path, _OLD)
    return olds[-1] if olds else None


def recover(dest: Path) -> None:
    """Undo what an interrupted earlier run left next to `dest`: stale temps, an aside copy."""
    for old in _siblings(dest, _OLD):
        fd = _stale(old, _OLD)
        if fd is None:
            continue
        try:
            if not dest.exists() and not dest.is_symlink():
                os.rename(old, dest)
                log.warning(
                    "restored `%s` from `%s` (an interrupted --force replace)", dest, old.name
                )
            else:
                problem = _remove_tree(old)
                if problem:
                    log.warning("`%s` is left beside `%s`: %s", old.name, dest, problem)
        except OSError as e:
            log.warning("could not restore `%s` from `%s`: %s", dest, old.name, e.strerror)
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


# -- checks before any work ---------------------------------------------------------------------


def check_output(dest: Path, force: bool) -> None:
    """Refuse a symlink, or an existing output without `force`."""
    if dest.is_symlink():
        raise OutputError(
            f"output `{dest}` is a symlink; adapterctl never writes through one",
            hint="pass the real path instead",
        )
    if dest.exists() and not force:
        raise OutputError(f"output `{dest}` already exists", hint="pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output `{dest}` exists and is not a directory")
    if dest.exists():
        problem = _not_replaceable(dest)
        if problem is not None:
            raise OutputError(
                f"--force will not replace `{dest}`: {problem}",
                hint="--force replaces only an empty folder or an adapter or model folder; "
                "choose another OUTPUT",
            )


#: what an adapter or model folder holds at its root (or in an adapter's subfolder)
_MARKERS = ("adapter_config.json", "config.json")


def _not_replaceable(dest: Path) -> str | None:
    """Why `--force` must not replace the existing folder `dest`, if it must not: only an empty
    folder, or one that holds an adapter or model (a marker file at its root or in a subfolder)
    and nothing hidden (`.git`, `.ssh`...), is ever deleted; never a mount point or a home."""
    if os.path.ismount(dest):
        return "it is a mount point"
    home = os.path.expanduser("~")
    with contextlib.suppress(OSError):
        if os.path.samefile(dest, home):
            return "it is the home folder"
    marked = False
    seen = 0
    for dirpath, dirs, files in os.walk(dest):
        depth = len(Path(dirpath).relative_to(dest).parts)
        hidden = next((n for n in sorted(dirs + files) if n.startswith(".")), None)
        if hidden is not None:
            return f"it holds `{os.path.join(dirpath, hidden)}`, which adapterctl never writes"
        marked = marked or (depth <= 1 and any(m in files for m in _MARKERS))
        seen += len(dirs) + len(files)
        if seen > _MAX_WALK:
            return f"it holds more than {_MAX_WALK} entries"
    if seen and not marked:
        return "it holds no adapter or model (no adapter_config.json or config.json)"
    return None


def _flags(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError:
        return 0
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        return int(struct.unpack_from("<i", buf)[0])
    except OSError:
        return 0
    finally:
        os.close(fd)


def _undeletable(dest: Path) -> str | None:
    """Why `dest` (an old output to replace) could not be deleted once swapped aside, if it
    could not: a folder this user may not change, or an immutable or append-only entry."""
    seen = 0
    unlisted: list[OSError] = []
    for dirpath, dirs, files in os.walk(dest, onerror=unlisted.append):
        if unlisted:
            break
        if (dirs or files) and not os.access(dirpath, os.W_OK | os.X_OK):
            return f"`{dirpath}` is not writable for this user"
        for name in dirs + files:
            seen += 1
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and _flags(path) & _UNDELETABLE_FLAGS:
                return f"`{path}` is immutable or append-only"
        if seen > _MAX_WALK:
            break
    if unlisted:
        return f"`{unlisted[0].filename}` cannot be listed ({unlisted[0].strerror})"
    return None


def preflight(
    dests: Sequence[StrPath], *, force: bool, inputs: Iterable[StrPath | None] = ()
) -> None:
    """Every check on a command's outputs, before any work: apart from each other and from the
    inputs, an interrupted swap restored, not a symlink, not existing unless `force`, and (with
    `force`) an old output that can be deleted once replaced."""
    inputs = list(inputs)
    check_apart(dests)
    for dest in dests:
        path = output_path(dest)
        check_inputs(path, inputs)
        if path.parent.is_dir():
            recover(path)
        check_output(path, force)
        if force and path.is_dir():
            problem = _undeletable(path)
            if problem is not None:
                raise OutputError(
                    f"cannot replace `{dest}`: {problem}",
                    hint="nothing was written; fix that first",
                )


# -- writing ------------------------------------------------------------------------------------


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


def _remove_tree(path: Path) -> str | None:
    """rmtree, returning what could not be removed (None when all of it was)."""
    problems: list[str] = []

    def failed(_func: object, where: str, info: tuple[type, BaseException, object]) -> None:
        exc = info[1]
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        problems.append(f"`{where}`: {reason}")

    shutil.rmtree(path, onerror=failed)
    return problems[0] if problems else None


class AtomicOutputs:
    """The outputs of one command: `add` gives each a temp directory to fill; leaving the `with`
    block renames them all in (or, on any failure, removes them all and restores what was there)."""

    def __init__(self, *, force: bool, inputs: Iterable[StrPath | None]) -> None:
        self.force = force
        self.inputs = list(inputs)
        self.pairs: list[tuple[Path, Path]] = []  # (temp, destination)
        self._locks: list[int] = []

    def add(self, dest: StrPath) -> Path:
        path = output_path(dest)
        if not path.parent.is_dir():
            raise OutputError(f"cannot write `{path}`: `{path.parent}` is not a directory")
        preflight([*(d for _, d in self.pairs), path], force=self.force, inputs=self.inputs)
        tmp = path.parent / f".{path.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise OutputError(
                f"cannot write `{path}`: {e.strerror}",
                hint=f"check the permissions of `{path.parent}`",
            ) from e
        self.pairs.append((tmp, path))
        fd = _lock(tmp, wait=True)
        if fd is not None:
            self._locks.append(fd)
        return tmp

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is None:
                try:
                    for tmp, _ in self.pairs:
                        fsync_tree(tmp)
                except OSError as e:
                    raise self.write_error(e) from e
                _commit(self.pairs, self.force, self.inputs)
            elif isinstance(exc, OSError):
                raise self.write_error(exc) from exc
        finally:
            for fd in self._locks:
                os.close(fd)
            for tmp, _ in self.pairs:
                shutil.rmtree(tmp, ignore_errors=True)

    def write_error(self, e: OSError) -> OutputError:
        """An OSError while the outputs were written, named after the output it hit (or the
        input, when it names a file outside every temp directory)."""
        reason = e.strerror or str(e)
        where = os.fspath(e.filename) if e.filename else None
        for tmp, dest in reversed(self.pairs):
            if where is None or where == os.fspath(tmp) or where.startswith(f"{tmp}{os.sep}"):
                return OutputError(f"cannot write `{dest}`: {reason}", hint=_hint(e))
        return OutputError(f"cannot read `{where}`: {reason}")


def _hint(e: OSError) -> str | None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space (or write elsewhere) and rerun; nothing was written"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check the permissions of the output's folder; nothing was written"
    return "nothing was written"


@contextlib.contextmanager
def atomic_directory(
    dest: StrPath, *, force: bool = False, inputs: Iterable[StrPath | None] = ()
) -> Iterator[Path]:
    """Yield an empty temp directory; on success it becomes `dest`, on failure it disappears."""
    with AtomicOutputs(force=force, inputs=inputs) as outputs:
        yield outputs.add(dest)


def _commit(pairs: list[tuple[Path, Path]], force: bool, inputs: list[StrPath | None]) -> None:
    """Rename every temp into place; on a failure, undo the ones already in. Old outputs set aside
    are deleted only once all are in; what cannot be deleted is an error naming where it is."""
    done: list[tuple[Path, Path | None, int | None]] = []  # (dest, aside, lock on the aside)
    try:
        try:
            for tmp, dest in pairs:
                check_inputs(dest, inputs)  # the world may have changed while we were writing
                check_output(dest, force)
                done.append((dest, *_swap_in(tmp, dest, force)))
        except BaseException:
            for dest, aside, _ in reversed(done):
                _undo(dest, aside)
            raise
        _fsync_dir(pairs[0][1].parent)
        left = []
        for dest, aside, _ in done:
            problem = _remove_tree(aside) if aside is not None else None
            if problem is not None:
                left.append(f"`{aside}` (the old `{dest.name}`; {problem})")
        if left:
            raise OutputError(
                f"the new output is in place, but the old one could not be deleted: {'; '.join(left)} is left",
                hint="delete it yourself once you have fixed that",
            )
    finally:
        for _, _, fd in done:
            if fd is not None:
                os.close(fd)


def _undo(dest: Path, aside: Path | None) -> None:
    """Take a renamed-in output back out, and put the old one (if any) back."""
    gone = dest.parent / f".{dest.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(OSError):
        os.rename(dest, gone)
        if aside is not None:
            os.rename(aside, dest)
    shutil.rmtree(gone, ignore_errors=True)


def _swap_in(tmp: Path, dest: Path, force: bool) -> tuple[Path | None, int | None]:
    """Rename `tmp` to `dest`; an existing `dest` (only with `force`) goes aside, returned with
    the lock held on it, for the caller to delete once every output is in."""
    # Without `force` an output is never replaced, whatever appeared since the check: the plain
    # rename fails on a non-empty `dest`. (Deciding by a second `dest.exists()` here once let a
    # writer that lost the race swap the winner's output aside as if --force had been given.)
    if force and dest.exists():
        return _replace(tmp, dest)
    try:
        os.rename(tmp, dest)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            if force:  # another process put `dest` there after our check: replace that one
                return _replace(tmp, dest)
            raise OutputError(
                f"output `{dest}` already exists (written by another process meanwhile)",
                hint="pass --force to replace it",
            ) from e
        raise OutputError(f"cannot write `{dest}`: {e.strerror}") from e
    return None, None


def _replace(tmp: Path, dest: Path) -> tuple[Path, int | None]:
    """Swap `tmp` in for an existing `dest` (--force): old aside, new in."""
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
    except OSError as e:
        if old_fd is not None:
            os.close(old_fd)
        raise OutputError(f"cannot replace `{dest}`: {e.strerror}") from e
    except BaseException:
        if old_fd is not None:
            os.close(old_fd)
        raise
    return aside, old_fd
