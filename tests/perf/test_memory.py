"""A header that claims 100 GB of tensors, read under a 1 GiB address-space limit (RLIMIT_AS): each
torch-free command exits 1 with one error line, never a MemoryError or exit 3, because nothing is
allocated from what the header only claims."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import raw_safetensors, write_adapter

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (GIB, GIB))


@pytest.fixture
def liar(tmp_path: Path) -> Path:
    src = write_adapter(tmp_path / "src")
    claimed = 100_000_000_000
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header = {key: {"dtype": "F32", "shape": [25_000, 1_000_000], "data_offsets": [0, claimed]}}
    (src / "adapter_model.safetensors").write_bytes(raw_safetensors(header, b"\0" * 64))
    return src


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{src}", "--check"],
        ["select", "{src}", "{out}", "-a", "default"],
        ["convert", "{src}", "{out}", "--dtype", "bfloat16"],
        ["convert", "{src}", "{out}", "--rank", "2"],
    ],
    ids=["inspect", "select", "convert-dtype", "convert-rank"],
)
def test_claimed_100_gb_under_1_gib(args: list[str], liar: Path, tmp_path: Path) -> None:
    argv = [a.format(src=liar, out=tmp_path / "out") for a in args]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl", *argv], capture_output=True, text=True, cwd=ROOT,
        env=env, preexec_fn=_limit, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: "), proc.stderr
    assert "100000000000 bytes" in lines[0], proc.stderr
    assert "MemoryError" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_legal_header_too_big_for_memory(tmp_path: Path) -> None:
    """A header within the 100 MB limit made of tiny JSON values parses to far more memory than
    its size: under the limit it is one error line (exit 1), not a MemoryError (exit 3)."""
    src = write_adapter(tmp_path / "src")
    body = b'{"x":[' + b"[]," * 33_000_000 + b"[]]}"
    (src / "adapter_model.safetensors").write_bytes(raw_safetensors(None, raw=body))
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl", "inspect", str(src), "--check"], capture_output=True,
        text=True, cwd=ROOT, preexec_fn=_limit, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: "), proc.stderr
    assert f"{len(body)}-byte header needs more memory" in proc.stderr.splitlines()[0]
