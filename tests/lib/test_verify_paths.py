"""--verify of a module that was only cast takes the float32 difference path (`cast_grams`): it
must report what the general float64 path reports, error and threshold alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adapterctl.ops.convert.verify as verify_mod
from adapterctl.errors import AdapterFormatError
from adapterctl.format.rawtensor import from_float, to_float32
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops.convert import convert_adapter
from adapterctl.ops.convert.lowrank import cast_grams
from tests.helpers import P, Q, V, write_adapter


@pytest.mark.parametrize(
    ("stored", "dtype"),
    [(np.float32, "bfloat16"), (np.float32, "float16"), (np.float16, "float32"),
     (np.float16, "bfloat16"), (np.float32, "float32")],
)  # fmt: skip
def test_cast_path_equals_the_general_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: type, dtype: str
) -> None:
    rng = np.random.default_rng(7)
    tensors = {}
    for module, (out_dim, in_dim) in {Q: (96, 64), V: (40, 64)}.items():
        tensors[f"{P}{module}.lora_A.weight"] = rng.standard_normal((8, in_dim)).astype(stored)
        b = rng.standard_normal((out_dim, 8)) * np.logspace(0, -3, 8)  # ill-conditioned B
        tensors[f"{P}{module}.lora_B.weight"] = b.astype(stored)
    src = write_adapter(tmp_path / "src", tensors, {"r": 8, "target_modules": ["q_proj", "v_proj"]})
    fast = convert_adapter(src, tmp_path / "fast", dtype=dtype, verify_output=True).verification
    monkeypatch.setattr(verify_mod, "_NARROW", ())  # every module through the general path
    slow = convert_adapter(src, tmp_path / "slow", dtype=dtype, verify_output=True).verification
    assert fast is not None
    assert slow is not None
    assert fast.passed
    assert slow.passed
    assert fast.worst is not None
    assert slow.worst is not None
    assert fast.worst.name == slow.worst.name
    assert fast.worst.threshold == pytest.approx(slow.worst.threshold, rel=1e-5)
    assert fast.worst.error == pytest.approx(slow.worst.error, rel=1e-3, abs=1e-9)
    if dtype != "float32":  # a real rounding was measured, not a vacuous zero
        assert fast.worst.error > 0
    else:  # widening (or the same dtype) is exact
        assert fast.worst.error == slow.worst.error == 0.0


@pytest.mark.parametrize("side", ["B", "A"])
@pytest.mark.parametrize(("stored", "written"), [("F32", "BF16"), ("F16", "F32"), ("F32", "F16")])
def test_cast_grams_piece_by_piece_equals_one_piece(side: str, stored: str, written: str) -> None:
    """The verification reads a long factor in pieces (float32 buffers reused from piece to
    piece, a bfloat16 widened by a shift): any piece size gives the float64 Gram matrices of
    [B, B − B'] / [A − A'; A'] and |B'| / |A'|, a last piece shorter than the others included."""
    rng = np.random.default_rng(3)
    b = rng.standard_normal((1000, 6)) * np.logspace(0, -3, 6)  # B: (out, r); A: (r, in)
    values = np.ascontiguousarray(b if side == "B" else b.T).astype(np.float32)
    source = values.astype(np.float16) if stored == "F16" else values
    widened = source.astype(np.float32)
    if written == "BF16":
        output = from_float(widened, "BF16").data
        written_values = to_float32(from_float(widened, "BF16"))
    else:
        output = widened.astype(np.float16) if written == "F16" else widened
        written_values = output.astype(np.float32)
    x, y = widened.astype(np.float64), written_values.astype(np.float64)
    if side == "B":
        stacked, own, magnitude = np.hstack([x, x - y]), x, np.abs(y)
        expected = [stacked.T @ stacked, own.T @ own, magnitude.T @ magnitude]
    else:
        stacked, own, magnitude = np.vstack([x - y, y]), x, np.abs(y)
        expected = [stacked @ stacked.T, own @ own.T, magnitude @ magnitude.T]
    assert (x != y).any() or written == "F32"  # a real rounding where one was made
    for piece in (6, 6 * 7, 6 * 333, 1 << 18):  # one row/column at a time .. all at once
        got = cast_grams(source, output, side, (stored, written), piece)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7 * np.abs(e).max())


def test_threads_and_one_thread_find_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cast-only modules are checked on two threads (where two cores are there and the factors
    are small enough): the checks, their order (the first of equal ratios is the worst), and
    the progress are those of one thread; a module holding NaN (carried by the cast) still goes
    the elementwise way, after the others."""
    rng = np.random.default_rng(11)
    tensors: dict[str, np.ndarray] = {}
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    for k, module in enumerate(modules):
        a = rng.standard_normal((8, 64)).astype(np.float32)
        b = (rng.standard_normal((48, 8)) * 10.0 ** -(k % 3)).astype(np.float32)
        if k == 5:
            b[3, 2] = np.nan
        tensors[f"{P}{module}.lora_A.weight"] = a
        tensors[f"{P}{module}.lora_B.weight"] = b
    src = write_adapter(tmp_path / "src", tensors, {"r": 8, "target_modules": ["q_proj", "v_proj"]})
    found = []
    for workers, limit in ((2, verify_mod._TWO_THREADS), (2, 0), (1, verify_mod._TWO_THREADS)):
        monkeypatch.setattr(verify_mod, "_workers", lambda w=workers: w)
        monkeypatch.setattr(verify_mod, "_TWO_THREADS", limit)
        events: list[tuple[int, int, str]] = []

        def progress(n: int, total: int, phase: str = "converting") -> None:
            events.append((n, total, phase))  # noqa: B023 - called before the loop moves on

        result = convert_adapter(
            src, tmp_path / f"out-{workers}-{limit}", dtype="bfloat16", verify_output=True,
            progress=progress,
        )  # fmt: skip
        assert result.verification is not None
        verifying = [e for e in events if e[2] == "verifying"]
        assert sum(n for n, _, _ in verifying) == len(modules)
        found.append(result.verification.to_dict())
    assert found[0]["passed"]
    assert found[0]["checked"] == len(modules)
    assert found[0]["worst"]["error"] > 0
    assert found[0] == found[1] == found[2]


def test_read_into_refuses_a_short_buffer_and_a_truncated_file(tmp_path: Path) -> None:
    """The verification reads factors into reused buffers: a buffer too small is a bug (an
    error, never a partial read), and a file cut short is the same error as `read_bytes`."""
    values = np.arange(8 * 4096, dtype=np.float32).reshape(8, 4096)  # past any read-ahead
    src = write_adapter(
        tmp_path / "src",
        {f"{P}{Q}.lora_A.weight": values, f"{P}{Q}.lora_B.weight": values.T.copy()},
        {"r": 8, "target_modules": ["q_proj"]},
    )
    path = src / "adapter_model.safetensors"
    key = f"{P}{Q}.lora_B.weight"
    with SafetensorsReader(path) as reader:
        with pytest.raises(ValueError, match="cannot hold"):
            reader.read_into(key, bytearray(values.nbytes - 1))
        data = path.read_bytes()
        path.write_bytes(data[:-5])  # the last tensor (lora_B) loses its tail under the reader
        with pytest.raises(AdapterFormatError, match="truncated while reading"):
            reader.read_into(key, bytearray(values.nbytes))
