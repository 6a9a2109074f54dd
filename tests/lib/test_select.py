"""select_adapters: PEFT's layout, bytes copied as they are, and PEFT computes the same thing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from adapterctl.errors import InvalidOptionError, OutputError, SelectionError
from adapterctl.ops.inspect import inspect_adapter
from adapterctl.ops.select import parse_renames, select_adapters
from tests.fixtures import tiny_llama
from tests.helpers import unprivileged, write_adapter


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _logits(adapter_dir: Path) -> object:
    import torch
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_renamed_to_root_loads_identically_in_peft(
    peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    src = peft_adapters["multi"]
    out = tmp_path / "out"
    result = select_adapters(src, out, ["alpha"], {"alpha": "default"})
    assert _files(out) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (src / "alpha" / name).read_bytes()
    # renamed: the card's adapter facts name the adapter as it is now (issue 11, stale cards)
    assert "\n- `default`: r=" in (out / "README.md").read_text()
    assert [(a.name, a.source_name, a.path) for a in result.adapters] == [("default", "alpha", "")]
    expected, got = _logits(src / "alpha"), _logits(out)
    assert torch.equal(expected, got)  # type: ignore[arg-type]


@pytest.mark.slow
def test_layout_follows_peft(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    src = peft_adapters["multi"]
    select_adapters(src, tmp_path / "two", ["beta", "default"])
    assert _files(tmp_path / "two") == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "beta/adapter_config.json",
        "beta/adapter_model.safetensors",
    ]
    select_adapters(src, tmp_path / "subs", ["beta", "alpha"], {"beta": "b2"})
    assert _files(tmp_path / "subs") == [
        "README.md",
        "alpha/adapter_config.json",
        "alpha/adapter_model.safetensors",
        "b2/adapter_config.json",
        "b2/adapter_model.safetensors",
    ]
    assert [a.name for a in inspect_adapter(tmp_path / "subs").adapters] == ["alpha", "b2"]
    # selecting again from the output is idempotent
    select_adapters(tmp_path / "subs", tmp_path / "again", ["alpha", "b2"])
    for f in _files(tmp_path / "subs"):
        assert (tmp_path / "again" / f).read_bytes() == (tmp_path / "subs" / f).read_bytes()


@pytest.mark.slow
def test_bin_adapter_is_copied(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    select_adapters(peft_adapters["llama_bin"], tmp_path / "o", ["default"])
    assert _files(tmp_path / "o") == ["README.md", "adapter_config.json", "adapter_model.bin"]


def test_single_file_source(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a")
    select_adapters(d / "adapter_model.safetensors", tmp_path / "o", ["default"])
    assert _files(tmp_path / "o") == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    ("adapters", "renames", "message", "error"),
    [
        ([], {}, "no adapter chosen", InvalidOptionError),
        (["default", "default"], {}, "more than once", InvalidOptionError),
        (["nope"], {}, "no adapter named `nope`", SelectionError),  # the source's, not a usage
        (["default"], {"other": "x"}, "renamed but not chosen", InvalidOptionError),
        (["default"], {"default": "../x"}, "invalid adapter name", InvalidOptionError),
        (["default"], {"default": ".hidden"}, "invalid adapter name", InvalidOptionError),
        (["default"], {"default": ""}, "invalid adapter name", InvalidOptionError),
        (["default"], {"default": "a\x1b[2Jb"}, "control or invisible", InvalidOptionError),
        (["b"], {"b": "adapter_config.json"}, "invalid adapter name", InvalidOptionError),
        (["b"], {"b": "README.md"}, "invalid adapter name", InvalidOptionError),
        (["default", "b"], {"b": "default"}, "would both be named", InvalidOptionError),
    ],
)
def test_bad_requests(
    tmp_path: Path, adapters: list[str], renames: dict, message: str, error: type[Exception]
) -> None:
    """What the options ask for wrongly is a usage error (exit 2); what the source lacks, not."""
    src = write_adapter(tmp_path / "src")
    write_adapter(src / "b")
    with pytest.raises(error, match=message):
        select_adapters(src, tmp_path / "out", adapters, renames)
    assert not (tmp_path / "out").exists()


def test_parse_renames() -> None:
    assert parse_renames(["a=b", "c=default"]) == {"a": "b", "c": "default"}
    for bad in (["a"], ["=b"], ["a="]):
        with pytest.raises(InvalidOptionError, match="OLD=NEW"):
            parse_renames(bad)
    with pytest.raises(InvalidOptionError, match="renamed twice"):
        parse_renames(["a=b", "a=c"])


def test_existing_output_needs_force_and_is_swapped_whole(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # an old adapter folder
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        select_adapters(src, out, ["default"])
    assert _files(out) == ["adapter_config.json", "keep.txt"]
    select_adapters(src, out, ["default"], force=True)
    assert _files(out) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("layout", "why"),
    [
        ({"notes.txt": "mine"}, "holds no adapter or model"),
        (
            {"adapter_config.json": "{}", ".git/config": "x"},
            "/.git`, which adapterctl never writes",
        ),
        ({"config.json": "{}", "sub/.ssh/id": "k"}, "/sub/.ssh`, which adapterctl never writes"),
    ],
    ids=["documents", "a-repository", "hidden-deeper"],
)
def test_force_replaces_only_adapter_or_model_folders(
    tmp_path: Path, layout: dict[str, str], why: str
) -> None:
    """--force deletes the old OUTPUT: only an empty folder, or an adapter or model folder with
    nothing hidden in it, is ever replaced (a mistyped OUTPUT such as `~` must not be deleted)."""
    src = write_adapter(tmp_path / "src")
    out = tmp_path / "out"
    for name, text in layout.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _files(out)
    with pytest.raises(OutputError, match="--force will not replace") as info:
        select_adapters(src, out, ["default"], force=True)
    assert why in str(info.value)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_never_replaces_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_adapter(tmp_path / "src")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text("{}")  # even one that looks like a model folder
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputError, match="it is the home folder"):
        select_adapters(src, home, ["default"], force=True)
    assert _files(home) == ["config.json"]


def test_symlink_output_is_refused(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputError, match="symlink"):
        select_adapters(src, tmp_path / "link", ["default"], force=True)
    assert list(real.iterdir()) == []


def test_unwritable_parent(tmp_path: Path) -> None:
    """As an unprivileged user (root writes anywhere): exit 1, one error line, nothing written."""
    import shutil
    import subprocess
    import sys
    import tempfile

    top = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp root is private to root
    top.chmod(0o755)
    src = write_adapter(top / "src")
    ro = top / "ro"
    ro.mkdir(mode=0o555)
    cmd = [*unprivileged(), sys.executable, "-m", "adapterctl", "select", str(src), str(ro / "out")]
    cmd += ["-a", "default"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot write `{ro / 'out'}`: Permission denied")
    assert list(ro.iterdir()) == []
    shutil.rmtree(top)


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    write_adapter(src / "b")
    (src / "b" / "adapter_model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    from adapterctl.errors import AdapterFormatError

    with pytest.raises(AdapterFormatError, match=r"b/adapter_model\.safetensors"):
        select_adapters(src, tmp_path / "out", ["default", "b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_interrupted_copy_leaves_nothing(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        select_adapters(src, tmp_path / "out", ["default"], progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_stale_temp_sibling_is_cleaned_and_aside_copy_restored(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    stale = tmp_path / ".out.adapterctl-tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    aside = tmp_path / ".old.adapterctl-old-99999-deadbeef"
    aside.mkdir()
    (aside / "adapter_config.json").write_text("{}")
    select_adapters(src, tmp_path / "out", ["default"])
    assert not stale.exists()
    # an aside copy whose destination is missing is an interrupted swap: it is put back
    with pytest.raises(OutputError, match="already exists"):
        select_adapters(src, tmp_path / "old", ["default"])
    assert (tmp_path / "old" / "adapter_config.json").read_text() == "{}"


def test_live_temp_sibling_is_left_alone(tmp_path: Path) -> None:
    import fcntl

    src = write_adapter(tmp_path / "src")
    live = tmp_path / ".out.adapterctl-tmp-1-cafe"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        select_adapters(src, tmp_path / "out", ["default"])
        assert live.exists()
    finally:
        os.close(fd)


def test_output_that_holds_the_source_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_adapter(run)
    write_adapter(run / "b")
    (run / "notes.txt").write_text("keep me")
    cases = [(run, run, "is"), (run, tmp_path, "holds"), (run / "b", run / "b", "is"),
             (run, run / "c", "lies inside")]  # fmt: skip
    for source, out, how in cases:
        with pytest.raises(OutputError, match=f"{how} the input"):
            select_adapters(source, out, ["default"], force=True)
    assert (run / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupt_at_the_second_rename_of_a_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """An interrupt just before the new output is renamed in puts the old one back; just after,
    the new one stays. Either way nothing else is left beside it."""
    import adapterctl.format.atomic as atomic

    src = write_adapter(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an old model folder
    (out / "old.txt").write_text("old")
    real_rename = os.rename
    calls = []

    def rename(a: object, b: object) -> None:
        calls.append((a, b))
        if len(calls) == 2 and when == "before":  # dest -> aside done; the new one next
            raise KeyboardInterrupt
        real_rename(a, b)  # type: ignore[arg-type]
        if len(calls) == 2:  # the new one is in; the interrupt comes before the next line
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        select_adapters(src, out, ["default"], force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    if when == "before":
        assert _files(out) == ["config.json", "old.txt"]
    else:
        assert _files(out) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_output_that_appears_after_the_last_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """Another writer's output lands between the final check and the rename (the race two held
    writers hit): without --force it is never replaced; with --force it is replaced whole."""
    import adapterctl.format.atomic as atomic

    src = write_adapter(tmp_path / "src")
    out = tmp_path / "out"
    real_check = atomic.check_output
    checks = []

    def check_then_race(dest: Path, force_: bool) -> None:
        real_check(dest, force_)
        checks.append(dest)
        if len(checks) == 2:  # the check in _swap_in passed; now the other writer wins
            dest.mkdir()
            (dest / "adapter_config.json").write_text("{}")  # another writer's adapter
            (dest / "winner.txt").write_text("theirs")

    monkeypatch.setattr(atomic, "check_output", check_then_race)
    if force:
        select_adapters(src, out, ["default"], force=True)
        assert _files(out) == ["adapter_config.json", "adapter_model.safetensors"]
    else:
        with pytest.raises(OutputError, match="already exists"):
            select_adapters(src, out, ["default"])
        assert (out / "winner.txt").read_text() == "theirs"
        assert _files(out) == ["adapter_config.json", "winner.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_force_replaces_an_output_that_appears_at_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --force, an output another writer puts in place after every check (the rename meets
    it: ENOTEMPTY) is replaced whole, as one that was there from the start would be."""
    import adapterctl.format.atomic as atomic

    src = write_adapter(tmp_path / "src")
    out = tmp_path / "out"
    real_rename = os.rename
    calls: list[tuple[object, object]] = []

    def race_then_rename(a: object, b: object) -> None:
        calls.append((a, b))
        if len(calls) == 1:  # tmp -> out: the other writer got there first
            out.mkdir()
            (out / "winner.txt").write_text("theirs")
        real_rename(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic.os, "rename", race_then_rename)
    select_adapters(src, out, ["default"], force=True)
    monkeypatch.undo()
    assert len(calls) == 3  # the failed rename, then out -> aside and tmp -> out
    assert _files(out) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
