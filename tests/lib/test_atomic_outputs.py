"""Several outputs of one command appear together or not at all; the library's save_pretrained
stages every file before renaming any, and never overwrites the initial adapter it converts from;
the real files behind an input's symlinks (a Hub snapshot's blobs) count as inputs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterctl.errors import OutputError
from adapterctl.format import atomic
from adapterctl.format.atomic import AtomicOutputs, check_inputs
from tests.helpers import write_adapter


def _contents(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


def _fill(tmp: Path, text: str) -> None:
    (tmp / "file.txt").write_text(text)


def _write_two(a: Path, b: Path, *, force: bool, fail: OSError | None = None) -> None:
    """One command's two outputs: `fail` raised while the second is being written."""
    with AtomicOutputs(force=force, inputs=[]) as outs:
        _fill(outs.add(a), f"new {a.name}")
        _fill(outs.add(b), f"new {b.name}")
        if fail is not None:
            raise fail


@pytest.mark.parametrize("old", [False, True], ids=["fresh", "replace"])
def test_second_rename_failing_rolls_back_the_first(
    old: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    if old:
        for d in (a, b):
            d.mkdir()
            _fill(d, f"old {d.name}")
            (d / "config.json").write_text("{}")  # old model folders: --force may replace them
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if str(src).startswith(str(tmp_path / ".b.adapterctl-tmp-")):
            raise OSError(5, "Input/output error")  # the second output's temp cannot go in
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OutputError, match=r"cannot (write|replace) `.*/b`: Input/output error"):
        _write_two(a, b, force=True)
    monkeypatch.undo()
    if old:
        assert _contents(a) == {"config.json": "{}", "file.txt": "old a"}
        assert _contents(b) == {"config.json": "{}", "file.txt": "old b"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_the_second_removes_both(tmp_path: Path) -> None:
    full = OSError(28, "No space left on device")
    with pytest.raises(OutputError, match=r"cannot write `.*/b`: No space left on device"):
        _write_two(tmp_path / "a", tmp_path / "b", force=False, fail=full)
    assert list(tmp_path.iterdir()) == []


def test_two_outputs_that_overlap_are_refused(tmp_path: Path) -> None:
    for second in (tmp_path / "a", tmp_path / "a" / "inner", tmp_path):
        (tmp_path / "a").mkdir(exist_ok=True)
        with pytest.raises(OutputError, match="overlap"):
            _write_two(tmp_path / "a", second, force=True)


def test_files_behind_an_inputs_symlinks_are_inputs(tmp_path: Path) -> None:
    """A Hub snapshot holds symlinks into the cache's blobs: replacing the blobs folder would
    destroy the input as surely as replacing the snapshot."""
    blobs = write_adapter(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(f)
    with pytest.raises(
        OutputError, match=r"holds the input `.*snapshot` \(through `.*blobs/[^`]*`\)$"
    ):
        check_inputs(blobs, [snapshot])
    check_inputs(tmp_path / "elsewhere", [snapshot])


@pytest.fixture
def model() -> object:
    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig
    from tests.fixtures import tiny_llama

    config = LoraConfig(r=64, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"])
    return get_adapter_model(tiny_llama(), config)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "full"
    d.mkdir()
    ok = os.geteuid() == 0 and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(d)], capture_output=True
        ).returncode
        == 0
    )
    if not ok:
        pytest.skip("needs root and a tmpfs mount")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, check=False)


@pytest.mark.slow
def test_save_pretrained_on_a_full_disk_leaves_nothing(model: object, full_disk: Path) -> None:
    with pytest.raises(OSError, match="No space left on device"):
        model.save_pretrained(full_disk / "nested" / "out")  # type: ignore[attr-defined]
    assert list(full_disk.iterdir()) == []


@pytest.mark.slow
def test_save_pretrained_never_overwrites_the_initial_adapter(
    model: object, tmp_path: Path
) -> None:
    initial = tmp_path / "init"
    model.save_pretrained(initial)  # type: ignore[attr-defined]
    before = {p.name: p.read_bytes() for p in initial.iterdir()}
    for target in (initial, initial / "sub"):
        with pytest.raises(OutputError, match="the input"):
            model.save_pretrained(  # type: ignore[attr-defined]
                target, path_initial_model_for_weight_conversion=initial
            )
    assert {p.name: p.read_bytes() for p in initial.iterdir()} == before
