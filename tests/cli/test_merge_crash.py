"""`adapterctl merge` when things go wrong, with real processes and a real filesystem: a SIGKILL
mid-merge (the writer held by tests/held_writer.py) leaves no OUTPUT and the next run removes the
dead run's temp; `--verify` catches an error planted in a written shard (the writer held once
every tensor is written, a merged value overwritten on disk); a full disk (a small tmpfs, as root)
is one `error:` line and no partial OUTPUT."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import held_writer
from tests.fixtures import merge_oracle, read_checkpoint, tiny_llama

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
#: a base of about 1.6 MB in four shards, so that a merge is well under way at PAUSE_AT
SIZES = {"hidden_size": 128, "intermediate_size": 256, "vocab_size": 512}
PAUSE_AT = 600_000  # bytes of output written
CONFIG = {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge-crash")
    base, adapter, _, _ = merge_oracle(
        lambda: tiny_llama(**SIZES), root / "case", {"default": CONFIG}, shard="500KB"
    )
    return base, adapter


def run(args: list[Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterctl", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".adapterctl-" in p.name)


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("replace", [False, True], ids=["fresh", "replace"])
def test_sigkill_mid_merge_leaves_no_output(
    replace: bool, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Killed mid-merge: no OUTPUT (or, with --force over an old one, the old one whole)."""
    base, adapter = pair
    out = tmp_path / "out"
    args = ["merge", str(base), str(adapter), str(out)]
    old = None
    if replace:
        first = run([*args, "--dtype", "bfloat16"])
        assert first.returncode == 0, first.stderr
        old = digest(out)
        args.append("--force")
    marker = tmp_path / "paused"
    argv = held_writer.command(args, marker=marker, after=PAUSE_AT)
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never reached the pause"
            time.sleep(0.02)
        assert temps(tmp_path), "no temp sibling mid-merge"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (digest(out) if out.exists() else None) == old
    assert temps(tmp_path)  # the dead run's temp, which the next run removes
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert temps(tmp_path) == []
    assert sorted(read_checkpoint(out)) == sorted(read_checkpoint(base))
    assert {t.dtype for t in read_checkpoint(out).values()} == {"F32"}  # the new one


def test_verify_catches_an_error_planted_in_a_written_shard(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    args = ["merge", str(base), str(adapter), str(out), "--verify", "--max-shard-size", "500KB"]
    total = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]
    marker, go = tmp_path / "written", tmp_path / "go"
    argv = held_writer.command(args, marker=marker, after=total["total_size"], until=go)
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never wrote everything"
            time.sleep(0.02)
        # the first shard is complete on disk; one merged value in it becomes wrong
        (tmp,) = (p for p in tmp_path.iterdir() if ".adapterctl-tmp-" in p.name)
        target = "model.layers.0.self_attn.q_proj.weight"
        shards = sorted(tmp.glob("*.safetensors"))
        assert len(shards) > 1
        for shard in shards:
            raw = bytearray(shard.read_bytes())
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8 : 8 + n])
            if target in header:
                break
        assert shard != shards[-1]
        assert header[target]["dtype"] == "F32"
        at = 8 + n + header[target]["data_offsets"][0] + 4 * 17
        (value,) = struct.unpack("<f", raw[at : at + 4])
        raw[at : at + 4] = struct.pack("<f", value + 1e-3)
        shard.write_bytes(bytes(raw))
        go.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err
    assert "model.layers.0.self_attn.q_proj" in err, err
    assert not out.exists()
    assert temps(tmp_path) == []
    clean = run(args)  # the same merge, nothing planted, passes its check
    assert clean.returncode == 0, clean.stderr


def test_full_disk_is_one_error_and_no_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = full / "out"
        proc = run(["merge", base, adapter, out])
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("hint:", "warning:"))]
        lines = [ln.rsplit("\r", 1)[-1] for ln in lines if ln.rsplit("\r", 1)[-1].strip()]
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: cannot write `{out}`"), proc.stderr
        assert "No space left on device" in lines[0], proc.stderr
        assert list(full.iterdir()) == []  # no partial OUTPUT, no temp
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True, check=False)
