"""Never lose or half-write data (issue 11, section 4), with real processes and real filesystems.

- An output that is, holds or lies inside an input is refused by every writer, --force or not,
  however the path is spelt: a bind mount (`mount --bind`, as root), a symlinked parent, `..`.
- A full disk (a real 1 MiB tmpfs as root; else RLIMIT_FSIZE, which gives EFBIG) is one `error:`
  line naming the output, exit 1, and nothing left: no partial output, no hidden sibling, the old
  output (with --force) untouched; `save`'s two outputs appear together or not at all.
- A SIGKILL between the two renames of a --force swap: `inspect` explains it, the next writer
  puts the old output back.
- --force over an output that cannot be deleted (immutable file, folder not writable for the
  user) is refused before anything is written; when it becomes undeletable meanwhile, exit 1
  names what is left where.
- `select` checks its copy: a source rewritten during the copy is an error, never a bad output.
- An unreadable README.md is blamed on the README, not on the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import held_writer
from tests.helpers import Q, V, lora_tensors, unprivileged, write_adapter

ROOT = Path(__file__).resolve().parents[2]
BIG = {"r": 64, "target_modules": ["q_proj", "v_proj"]}
Preexec = Callable[[], None] | None


def run(
    args: list[str | Path], *, env: dict[str, str] | None = None, preexec: Preexec = None,
    user: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = [*(user or []), sys.executable, "-m", "adapterctl", *map(str, args)]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, **(env or {})}, preexec_fn=preexec,
    )  # fmt: skip


def digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".adapterctl-" in p.name)


def one_error(proc: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("hint:", "warning:"))]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0], (part, proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "src", config={"target_modules": ["q_proj"]})


@pytest.fixture
def big(tmp_path: Path) -> Path:
    tensors = {**lora_tensors(Q, 64, 4096, 4096), **lora_tensors(V, 64, 4096, 4096)}
    return write_adapter(tmp_path / "big", tensors, BIG)


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[bool]:
    target = args[-1]
    ok = _mount(*args)
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


@contextlib.contextmanager
def limited_disk(d: Path, size: int) -> Iterator[tuple[Preexec, str]]:
    """`d` as a tmpfs of `size` bytes (ENOSPC) where root may mount one; else a file-size limit
    of `size` bytes for the child (EFBIG, with SIGXFSZ ignored so the write fails instead)."""
    with mounted("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)) as ok:
        if ok:
            yield None, "No space left on device"
            return

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    yield limit, "File too large"


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A folder outside pytest's root-only tmp root, writable by everybody (no sticky bit)."""
    top = Path(tempfile.mkdtemp(dir="/tmp"))
    top.chmod(0o777)
    yield top
    subprocess.run(["chmod", "-R", "u+rwx", str(top)], capture_output=True, check=False)
    shutil.rmtree(top, ignore_errors=True)


# -- 1. an output never touches an input ---------------------------------------------------------

SELECT = ["select", "{src}", "{out}", "-a", "default"]
CONVERT = ["convert", "{src}", "{out}", "--dtype", "bfloat16"]


def _args(template: list[str], source: Path, out: Path | str) -> list[str]:
    return [a.format(src=source, out=out) for a in template]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("template", [SELECT, CONVERT], ids=["select", "convert"])
@pytest.mark.parametrize(
    "spell",
    ["itself", "parent", "inside", "symlinked-parent", "dotdot", "symlink-to-parent"],
)
def test_output_overlapping_the_source_is_refused(
    spell: str, template: list[str], force: bool, src: Path, tmp_path: Path
) -> None:
    write_adapter(src / "beta")
    (src / "notes.txt").write_text("keep me")
    before = digest(tmp_path)
    (tmp_path / "via").symlink_to(src)
    (tmp_path / "up").symlink_to(tmp_path)
    out, how = {
        "itself": (src, "is the input"),
        "parent": (tmp_path, "holds the input"),
        "inside": (src / "new", "lies inside the input"),
        "symlinked-parent": (tmp_path / "via" / "new", "lies inside the input"),
        "dotdot": (f"{src}/beta/../new", "lies inside the input"),
        "symlink-to-parent": (tmp_path / "up" / "src", "is the input"),
    }[spell]
    source = src
    args = _args(template, source, out) + (["--force"] if force else [])
    proc = run(args)
    one_error(proc, f"output `{os.path.abspath(out)}`", how, f"`{source}`")
    assert digest(tmp_path) == before  # nothing written, nothing replaced
    assert hidden(src) == []
    assert hidden(tmp_path) == []


def test_bind_mount_alias_of_the_source_is_refused(src: Path, tmp_path: Path) -> None:
    """The report's case: `select SOURCE ALIAS -a beta --force`, ALIAS a bind mount of SOURCE,
    deleted SOURCE's default adapter. Paths differ; device and inode do not."""
    write_adapter(src / "beta")
    alias = tmp_path / "alias"
    alias.mkdir()
    before = digest(src)
    with mounted("--bind", str(src), str(alias)) as ok:
        if not ok:
            pytest.skip("needs root and mount --bind")
        for out in (alias, alias / "new"):
            proc = run(["select", src, out, "-a", "beta", "--force"])
            one_error(proc, f"output `{out}`", f"the input `{src}`")
    assert digest(src) == before
    assert hidden(tmp_path) == []


# `load --merge-to` and `save` (and its --residual-out) refuse their inputs too; a full disk
# writes neither of save's outputs.


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures import tiny_llama

    d = tmp_path_factory.mktemp("dl-base") / "llama"
    tiny_llama().save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def adapter(base: Path) -> Path:
    out = base.parent / "adapter"
    proc = run(["save", base, out, "--r", "4", "--target", "q_proj,v_proj"])
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("which", ["base", "adapter", "parent"])
@pytest.mark.slow
def test_merge_to_an_input(which: str, base: Path, adapter: Path) -> None:
    out = {"base": base, "adapter": adapter, "parent": base.parent}[which]
    before = digest(base.parent)
    proc = run(["load", base, adapter, "--merge-to", out, "--force"])
    one_error(proc, f"output `{out}`", "the input")
    assert digest(base.parent) == before


@pytest.mark.parametrize("which", ["output", "residual", "both"])
@pytest.mark.slow
def test_save_onto_its_base(which: str, base: Path, tmp_path: Path) -> None:
    before = digest(base)
    args: list[str | Path] = ["save", base, base if which == "output" else tmp_path / "a"]
    args += ["--r", "2", "--target", "q_proj", "--init", "pissa", "--force"]
    if which == "both":
        args += ["--residual-out", tmp_path / "a"]
    else:
        args += ["--residual-out", base if which == "residual" else tmp_path / "res"]
    proc = run(args)
    one_error(proc, "overlap" if which == "both" else "is the input")
    assert digest(base) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_disk_full_save_writes_neither_output(base: Path, tmp_path: Path) -> None:
    """The report's case: the adapter was written, the residual base not, and the rerun
    refused. Now neither appears, and the rerun (with room) succeeds."""
    full = tmp_path / "full"
    full.mkdir()
    with limited_disk(full, 48 << 10) as (preexec, reason):
        args: list[str | Path] = [
            "save", base, full / "adapter", "--r", "2", "--target", "q_proj",
            "--init", "pissa", "--residual-out", full / "residual",
        ]  # fmt: skip
        proc = run(args, preexec=preexec)
        one_error(proc, f"cannot write `{full / 'residual'}`", reason)
        assert list(full.iterdir()) == []
    again = run(args)  # with room now: the same folder on the real disk, no limit
    assert again.returncode == 0, again.stderr
    assert (full / "adapter").is_dir()
    assert (full / "residual").is_dir()


@pytest.mark.slow
def test_disk_full_save_bin(base: Path, tmp_path: Path) -> None:
    """torch.save hides the OSError of a full disk ("unexpected pos"): still one error line."""
    full = tmp_path / "full"
    full.mkdir()
    with limited_disk(full, 48 << 10) as (preexec, reason):
        proc = run([
            "save", base, full / "adapter", "--r", "64", "--no-safe-serialization",
            "--target", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        ], preexec=preexec)  # fmt: skip
        one_error(proc, f"cannot write `{full / 'adapter'}`", reason)
        assert list(full.iterdir()) == []


@pytest.mark.slow
def test_disk_full_merge(base: Path, adapter: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    with limited_disk(full, 48 << 10) as (preexec, reason):
        proc = run(["load", base, adapter, "--merge-to", full / "merged"], preexec=preexec)
        one_error(proc, f"cannot write `{full / 'merged'}`", reason)
        assert list(full.iterdir()) == []


# -- 3. a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, Preexec, str]]:
    d = tmp_path / "small"
    d.mkdir()
    with limited_disk(d, 1 << 20) as (preexec, reason):
        yield d, preexec, reason


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "replace"])
@pytest.mark.parametrize("template", [SELECT, CONVERT], ids=["select", "convert"])
def test_disk_full_is_one_error_and_leaves_nothing(
    template: list[str], force: bool, big: Path, src: Path,
    small_disk: tuple[Path, Preexec, str],
) -> None:  # fmt: skip
    disk, preexec, reason = small_disk
    out = disk / "out"
    old = None
    if force:  # a small old output that fits: it must survive whole
        assert run(["select", src, out, "-a", "default"]).returncode == 0
        old = digest(out)
    args = _args(template, big, out) + (["--force"] if force else [])
    proc = run(args, preexec=preexec)
    one_error(proc, f"cannot write `{out}`", reason)
    assert (digest(out) if out.exists() else None) == old
    assert hidden(disk) == []


def test_read_only_filesystem(src: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    with mounted("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)) as ok:
        if not ok:
            pytest.skip("needs root and a tmpfs mount")
        proc = run(["select", src, ro / "out", "-a", "default"])
        one_error(proc, f"cannot write `{ro / 'out'}`", "Read-only file system")


# -- 4. SIGKILL between the two renames of a --force swap ---------------------------------------


def _paused(
    args: list[str | Path], marker: Path, *, after: int | None = None, until: Path | None = None
) -> subprocess.Popen[str]:
    """`adapterctl ARGS` held once `after` bytes are written, or else between the swap renames."""
    argv = held_writer.command(
        list(map(str, args)), marker=marker, after=after, at_swap=after is None, until=until
    )
    return subprocess.Popen(
        argv, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait(marker: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the writer never reached the pause"
        time.sleep(0.02)


@pytest.mark.parametrize("rerun", ["inspect-then-plain", "force"])
def test_sigkill_between_the_swap_renames(rerun: str, src: Path, big: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(["select", src, out, "-a", "default"]).returncode == 0
    old = digest(out)
    marker = tmp_path / "at-swap"
    proc = _paused(["select", big, out, "-a", "default", "--force"], marker)
    try:
        _wait(marker, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert not out.exists()
    (aside,) = (p for p in tmp_path.iterdir() if p.name.startswith(".out.adapterctl-old-"))
    assert digest(aside) == old
    if rerun == "force":
        again = run(["select", big, out, "-a", "default", "--force"])
        assert again.returncode == 0, again.stderr
        assert digest(out) == digest(big)
    else:
        shown = run(["inspect", out])
        one_error(shown, f"`{out}` is missing", f"`{aside}`", "interrupted --force replace")
        again = run(["select", big, out, "-a", "default"])  # restores, then: it exists
        one_error(again, "already exists")
        assert "restored" in again.stderr
        assert digest(out) == old
    assert hidden(tmp_path) == []


# -- 5. --force over an output that cannot be deleted -------------------------------------------


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[bool]:
    ok = (
        os.geteuid() == 0
        and shutil.which("chattr") is not None
        and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


def test_force_over_an_immutable_file_is_refused_first(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(["select", src, out, "-a", "default"]).returncode == 0
    (out / "keep.txt").write_text("locked")
    old = digest(out)
    with immutable(out / "keep.txt") as ok:
        if not ok:
            pytest.skip("needs root and chattr on this filesystem")
        proc = run(["convert", src, out, "--dtype", "float16", "--force"])
        one_error(proc, f"cannot replace `{out}`", f"`{out / 'keep.txt'}` is immutable")
        assert digest(out) == old
        assert hidden(tmp_path) == []


def test_force_over_a_folder_the_user_cannot_change(src: Path, world_dir: Path) -> None:
    drop = unprivileged()
    if not drop:
        pytest.skip("runs as root, dropping to nobody")
    source = write_adapter(world_dir / "src")
    out = world_dir / "out"
    assert run(["select", source, out, "-a", "default"]).returncode == 0  # owned by root
    out.chmod(0o755)
    old = digest(out)
    proc = run(["select", source, out, "-a", "default", "--force"], user=drop)
    one_error(proc, f"cannot replace `{out}`", "not writable for this user")
    assert digest(out) == old
    assert hidden(world_dir) == []


def test_old_output_becoming_undeletable_meanwhile_is_an_error(
    src: Path, big: Path, tmp_path: Path
) -> None:
    """The pre-check passed, then a file in the old output was made immutable while the new one
    was written: the new output is in place, and exit 1 says what is left where."""
    out = tmp_path / "out"
    assert run(["select", src, out, "-a", "default"]).returncode == 0
    (out / "keep.txt").write_text("locked later")
    go, marker = tmp_path / "go", tmp_path / "paused"
    proc = _paused(
        ["select", big, out, "-a", "default", "--force"], marker, after=1_500_000, until=go
    )
    try:
        _wait(marker, proc)
        with immutable(out / "keep.txt") as ok:
            go.touch()
            _, err = proc.communicate(timeout=60)
            if not ok:
                pytest.skip("needs root and chattr on this filesystem")
            left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.adapterctl-old-")]
            assert proc.returncode == 1, err
            assert err.startswith("error: the new output is in place"), err
            assert len(left) == 1, err
            assert f"`{left[0]}`" in err, err
            assert "keep.txt" in err, err
            assert digest(out) == digest(big)
    finally:
        proc.kill()


# -- 6. select checks its copy -------------------------------------------------------------------


@pytest.mark.parametrize("rewrite", ["truncated", "other-adapter"])
def test_source_rewritten_during_the_copy(rewrite: str, big: Path, tmp_path: Path) -> None:
    weights = big / "adapter_model.safetensors"
    other = write_adapter(tmp_path / "other", lora_tensors(Q, 8, 4096, 4096), BIG)
    go, marker = tmp_path / "go", tmp_path / "paused"
    out = tmp_path / "out"
    proc = _paused(["select", big, out, "-a", "default"], marker, after=1_500_000, until=go)
    try:
        _wait(marker, proc)
        data = weights.read_bytes()
        new = (
            data[: len(data) // 2]
            if rewrite == "truncated"
            else (other / weights.name).read_bytes()
        )
        with open(weights, "r+b") as f:  # in place: the copy's open file sees it
            f.write(new)
            f.truncate(len(new))
        go.touch()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert err.startswith(f"error: `{weights}` changed while it was being copied"), err
    assert not out.exists()
    assert hidden(tmp_path) == []


def test_select_under_a_concurrent_rewriter_never_writes_a_bad_copy(
    big: Path, tmp_path: Path
) -> None:
    """The report's stress case (7 invalid copies in 20 with exit 0; 4 in 20 here before the
    fix): another process truncates and rewrites the source in place, slowly, over and over.
    Every run that exits 0 wrote a valid file; the others are one error line."""
    import threading

    from adapterctl.format.header import read_header

    weights = big / "adapter_model.safetensors"
    data = weights.read_bytes()
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            with open(weights, "r+b") as f:
                f.truncate(0)
                for k in range(0, len(data), 1 << 19):
                    f.write(data[k : k + (1 << 19)])
                    f.flush()
                    time.sleep(0.002)
            time.sleep(0.01)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for n in range(20):
            out = tmp_path / f"out{n}"
            proc = run(["select", big, out, "-a", "default"])
            if proc.returncode == 0:
                assert read_header(out / weights.name).header_bytes is not None
                assert (out / weights.name).stat().st_size == len(data)
            else:
                one_error(proc)
                assert not out.exists()
    finally:
        stop.set()
        writer.join()
    assert hidden(tmp_path) == []


# -- 7. an unreadable README is the README's fault -----------------------------------------------


@pytest.mark.parametrize("template", [SELECT, CONVERT], ids=["select", "convert"])
def test_readme_that_is_a_directory(template: list[str], src: Path, tmp_path: Path) -> None:
    (src / "README.md").mkdir()
    proc = run(_args(template, src, tmp_path / "out"))
    one_error(proc, f"`{src / 'README.md'}`", "not a regular file")
    assert not (tmp_path / "out").exists()
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("template", [SELECT, CONVERT], ids=["select", "convert"])
def test_readme_the_user_may_not_read(template: list[str], world_dir: Path) -> None:
    drop = unprivileged()
    source = write_adapter(world_dir / "src")
    for p in [source, *source.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    readme = source / "README.md"
    readme.write_text("# secret\n")
    readme.chmod(0)
    if not drop and os.access(readme, os.R_OK):
        pytest.skip("this user reads everything")
    proc = run(_args(template, source, world_dir / "out"), user=drop)
    one_error(proc, f"`{readme}`", "Permission denied")
    assert not (world_dir / "out").exists()
