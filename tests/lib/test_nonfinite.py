"""Numbers that are not finite: a transform that makes NaN/Inf out of finite inputs is an error
naming the file and the module (nothing written); NaN and Inf already in the inputs are carried
through casts and joins and pass --verify; a rank reduction refuses them; `inspect --check`
counts them per tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from adapterctl.errors import ConversionError
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.nonfinite import count_nonfinite, nonfinite_mask
from adapterctl.format.rawtensor import RawTensor, to_float32
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops.convert import convert_adapter
from adapterctl.ops.inspect import inspect_adapter
from tests.helpers import P, Q, V, lora_tensors, write_adapter

runner = CliRunner()
ST = "adapter_model.safetensors"
A_KEY, B_KEY = f"{P}{Q}.lora_A.weight", f"{P}{Q}.lora_B.weight"
HEAD = f"{P}lm_head.weight"


def _cli(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl")


def _values(directory: Path) -> dict[str, Any]:
    with SafetensorsReader(directory / ST) as f:
        return {
            k: to_float32(RawTensor(t.dtype, t.shape, f.read_bytes(k)))
            for k, t in f.tensors.items()
        }


def _nothing_left(tmp_path: Path, *kept: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def _with_nonfinite(tmp_path: Path, dtype: Any = np.float32) -> Path:
    tensors = {k: v.astype(dtype) for k, v in lora_tensors(Q).items()}
    tensors.update({k: v.astype(dtype) for k, v in lora_tensors(V, d_out=16).items()})
    tensors[A_KEY][0, 1] = np.nan
    tensors[A_KEY][1, 2] = np.inf
    tensors[B_KEY][3, 0] = -np.inf
    tensors[HEAD] = np.array([[1.0, np.nan], [-np.inf, 2.5]], dtype=dtype)
    config = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    return write_adapter(tmp_path / "src", tensors, config)


# --- results that are not finite where the inputs were: refused --------------------------------


@pytest.mark.parametrize("reduce", [["--rank", "2"], ["--energy", "0.9"]])
def test_huge_alpha_with_rank_reduction_is_refused(tmp_path: Path, reduce: list[str]) -> None:
    src = write_adapter(tmp_path / "src", lora_tensors(Q), {"lora_alpha": 1e308})
    result = _cli("convert", src, tmp_path / "out", *reduce)
    assert result.exit_code == 1, result.stdout
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: "), result.stderr
    assert str(src / ST) in lines[0], lines[0]
    assert Q in lines[0], lines[0]
    assert "NaN or infinite" in lines[0]
    assert all(line.startswith(("error:", "hint:")) for line in lines)
    _nothing_left(tmp_path, "src")
    as_json = _cli("convert", src, tmp_path / "out", *reduce, "--json")
    assert as_json.exit_code == 1
    assert as_json.stdout == ""
    assert json.loads(as_json.stderr)["error"]["type"] == "ConversionError"


def test_huge_alpha_with_initial_names_the_file(tmp_path: Path) -> None:
    """α' = 2α overflows: the error names the trained adapter's file and a module."""
    config = {"lora_alpha": 1e308, "target_modules": ["q_proj"]}
    trained = write_adapter(tmp_path / "t", lora_tensors(Q), {**config, "init_lora_weights": "pissa"})  # fmt: skip
    init = write_adapter(tmp_path / "i", lora_tensors(Q), config)
    result = _cli("convert", trained, tmp_path / "out", "--initial", init)
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]
    assert str(trained / ST) in first, first
    assert Q in first, first
    _nothing_left(tmp_path, "t", "i")


def test_overflowing_residual_rebuild_is_refused(tmp_path: Path) -> None:
    """α finite after doubling, but W_res + s0·B0·A0 overflows float32 in a saved base weight."""
    config = {"lora_alpha": 1e300, "target_modules": ["q_proj"]}
    tensors = {**lora_tensors(Q), f"{P}{Q}.base_layer.weight": np.ones((8, 8), np.float32)}
    trained = write_adapter(tmp_path / "t", tensors, {**config, "init_lora_weights": "pissa"})
    init = write_adapter(tmp_path / "i", lora_tensors(Q), config)
    with pytest.raises(ConversionError, match=r"q_proj` \(base_layer.weight\)") as info:
        convert_adapter(trained, tmp_path / "out", initial=init)
    assert str(trained / ST) in str(info.value)
    _nothing_left(tmp_path, "t", "i")


def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    tensors = lora_tensors(Q)
    tensors[B_KEY][2, 1] = 1e5  # past float16's 65504
    src = write_adapter(tmp_path / "src", tensors)
    result = _cli("convert", src, tmp_path / "out", "--dtype", "float16", "--verify")
    assert result.exit_code == 1
    first, hint = result.stderr.splitlines()
    assert str(src / ST) in first, first
    assert f"`{Q}` (lora_B.weight)" in first, first
    assert "1 value(s)" in first
    assert "F16" in first
    assert "65504" in hint
    _nothing_left(tmp_path, "src")
    assert _cli("convert", src, tmp_path / "out", "--dtype", "bfloat16").exit_code == 0


def test_an_overflow_outside_lora_names_the_tensor(tmp_path: Path) -> None:
    tensors = {**lora_tensors(Q), HEAD: np.full((2, 2), 7e4, np.float32)}
    src = write_adapter(tmp_path / "src", tensors, {"modules_to_save": ["lm_head"]})
    with pytest.raises(ConversionError, match=r"`lm_head` \(weight\): 4 value\(s\)"):
        convert_adapter(src, tmp_path / "out", dtype="float16")
    _nothing_left(tmp_path, "src")


# --- NaN and Inf in the inputs: carried, verified ----------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("stored", [np.float32, np.float16])
def test_nonfinite_inputs_are_carried_and_verified(tmp_path: Path, dtype: str, stored: Any) -> None:
    src = _with_nonfinite(tmp_path, stored)
    result = convert_adapter(src, tmp_path / "out", dtype=dtype, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed, result.verification.worst
    before, after = _values(src), _values(tmp_path / "out")
    for key in (A_KEY, B_KEY, HEAD):
        x, y = before[key], after[key]
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=key)
        np.testing.assert_array_equal(x[np.isinf(x)], y[np.isinf(x)], err_msg=key)
        assert np.isfinite(y[np.isfinite(x)]).all(), key


def test_nonfinite_inputs_through_a_residual_conversion(tmp_path: Path) -> None:
    """[A; A0] and [B, −B0] are joins: a NaN of the trained factors stays where it was."""
    tensors = lora_tensors(Q)
    tensors[A_KEY][0, 0] = np.nan
    trained = write_adapter(tmp_path / "t", tensors, {"init_lora_weights": "pissa"})
    init = write_adapter(tmp_path / "i", lora_tensors(Q), {})
    for extra in ({}, {"dtype": "bfloat16"}):
        out = tmp_path / f"out{len(extra)}"
        result = convert_adapter(trained, out, initial=init, verify_output=True, **extra)
        assert result.verification is not None
        assert result.verification.passed, result.verification.worst
        a = _values(out)[A_KEY]
        assert a.shape == (8, 8)
        assert np.isnan(a[0, 0])
        assert np.isnan(a).sum() == 1


def test_verify_still_fails_a_nan_that_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN must meet NaN: a NaN written one place off is a failed verification."""
    import adapterctl.ops.convert.adapter as mod
    from adapterctl.format.header import read_header
    from adapterctl.ops.convert import VerificationFailed

    src = _with_nonfinite(tmp_path)
    real_write = mod._write

    def write_then_move(plan: Any, directory: Path, total: int, progress: Any) -> int:
        n = real_write(plan, directory, total, progress)
        header = read_header(directory / ST)
        t = header.tensors[A_KEY]
        with open(directory / ST, "r+b") as f:
            f.seek(header.data_start + t.start)
            values = np.frombuffer(f.read(t.nbytes), np.float32).reshape(t.shape).copy()
            values[0, 1], values[0, 2] = values[0, 2], np.nan
            f.seek(header.data_start + t.start)
            f.write(values.tobytes())
        return n

    monkeypatch.setattr(mod, "_write", write_then_move)
    with pytest.raises(VerificationFailed) as info:
        convert_adapter(src, tmp_path / "out", dtype="float32", verify_output=True)
    worst = info.value.result.verification.worst  # type: ignore[union-attr]
    assert worst is not None
    assert worst.name == Q
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reduce", [{"rank": 2}, {"energy": 0.9}])
def test_rank_reduction_refuses_nonfinite_inputs(tmp_path: Path, reduce: dict[str, Any]) -> None:
    src = _with_nonfinite(tmp_path)
    with pytest.raises(ConversionError, match="NaN or infinite") as info:
        convert_adapter(src, tmp_path / "out", **reduce)
    assert str(src / ST) in str(info.value)
    assert f"`{Q}`" in str(info.value)
    _nothing_left(tmp_path, "src")


# --- inspect --check -----------------------------------------------------------------------


def test_inspect_check_counts_nonfinite_values(tmp_path: Path) -> None:
    src = _with_nonfinite(tmp_path)
    result = _cli("inspect", src, "--check")
    assert result.exit_code == 0, result.stderr  # warnings, not errors
    # problem lines wrap at the terminal's width: joined again, one warning each
    text = " ".join(result.stdout.split()).replace(" warning: ", "\nwarning: ")
    warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert f"warning: `{A_KEY}` holds 1 NaN, 1 +Inf (of 32 values)" in "\n".join(warnings)
    assert any(f"`{B_KEY}` holds 1 -Inf" in w for w in warnings)
    assert any(f"`{HEAD}` holds 1 NaN, 1 -Inf" in w for w in warnings)
    assert not any(f"{P}{V}" in w for w in warnings)
    doc = json.loads(_cli("inspect", src, "--check", "--json").stdout)
    counts = {t["name"]: t["nonfinite"] for t in doc["adapters"][0]["tensors"]}
    assert counts[A_KEY] == {"nan": 1, "posinf": 1, "neginf": 0}
    assert counts[B_KEY] == {"nan": 0, "posinf": 0, "neginf": 1}
    assert counts[f"{P}{V}.lora_A.weight"] == {"nan": 0, "posinf": 0, "neginf": 0}
    messages = [p["message"] for p in doc["adapters"][0]["problems"]]
    assert sum("NaN" in m or "Inf" in m for m in messages) == 3
    plain = json.loads(_cli("inspect", src, "--json").stdout)  # header only: no counts
    assert all("nonfinite" not in t for t in plain["adapters"][0]["tensors"])
    assert not any("NaN" in p["message"] for p in plain["adapters"][0]["problems"])


def test_scan_reads_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts over pieces cut anywhere at element boundaries equal the whole tensor's."""
    from adapterctl.format import tensors as tensors_mod

    rng = np.random.default_rng(3)
    values = rng.standard_normal((40, 50)).astype(np.float32)
    values.flat[rng.choice(values.size, 60, replace=False)] = np.nan
    values.flat[rng.choice(values.size, 30, replace=False)] = -np.inf
    src = write_adapter(tmp_path / "src", {**lora_tensors(Q), HEAD: values}, {"modules_to_save": ["lm_head"]})  # fmt: skip
    whole = inspect_adapter(src, scan=True).adapters[0]
    monkeypatch.setattr(tensors_mod, "_CHUNK", 12)
    pieces = inspect_adapter(src, scan=True).adapters[0]
    assert whole.tensors == pieces.tensors
    head = next(t for t in pieces.tensors if t.name == HEAD)
    assert head.nonfinite is not None
    assert head.nonfinite.nan == int(np.isnan(values).sum())
    assert head.nonfinite.neginf == int(np.isneginf(values).sum())


@pytest.mark.parametrize(
    ("code", "storage"), [("F16", np.uint16), ("BF16", np.uint16), ("F32", np.uint32), ("F64", np.uint64)]
)  # fmt: skip
def test_counts_from_bits_equal_numpy(code: str, storage: Any) -> None:
    """Every bit pattern class (NaN payloads of either sign, ±Inf, subnormals, zeros)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, np.iinfo(storage).max, 5000, dtype=storage, endpoint=True)
    exponent = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F800000, "F64": 0x7FF0000000000000}[code]
    bits[::7] |= storage(exponent)  # many specials
    bits[::11] &= ~storage(exponent >> 1)
    if code == "BF16":
        floats = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        floats = bits.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[code])
    counts = count_nonfinite(bits.tobytes(), code)
    assert counts.nan == int(np.isnan(floats).sum())
    assert counts.posinf == int(np.isposinf(floats).sum())
    assert counts.neginf == int(np.isneginf(floats).sum())
    mask = nonfinite_mask(RawTensor(DTYPES[code], (bits.size,), bits.tobytes()))
    assert mask is not None
    np.testing.assert_array_equal(mask, ~np.isfinite(floats))


@pytest.mark.parametrize("code", ["F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "I32"])
def test_has_nonfinite_agrees_with_the_mask(code: str) -> None:
    """The fast any-check, over pieces of every size, says what the full mask says."""
    from adapterctl.format.nonfinite import has_nonfinite

    dtype = DTYPES[code]
    rng = np.random.default_rng(1)
    size = dtype.bits // 8
    for trial in range(40):
        raw = bytearray(rng.integers(0, 256, 64 * size, dtype=np.uint8).tobytes())
        if trial % 2:  # most trials: only finite values (clear the top exponent bit)
            for i in range(size - 1, len(raw), size):
                raw[i] &= 0x3F
        t = RawTensor(dtype, (64,), bytes(raw))
        mask = nonfinite_mask(t)
        expected = mask is not None and bool(mask.any())
        for piece in (1, 5, 64, 1 << 16):
            assert has_nonfinite(t, piece) == expected, (code, trial, piece)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_huge_scaling_does_not_break_verification_of_a_cast(tmp_path: Path, dtype: str) -> None:
    """The scaling cancels in --verify's ratios: alpha 1e308 (a scaling of 2.5e307) must not
    turn them into inf/inf (a NaN allowance, reported as a bug)."""
    src = write_adapter(
        tmp_path / "src", {**lora_tensors(Q), **lora_tensors(V)}, {"lora_alpha": 1e308}
    )
    result = convert_adapter(src, tmp_path / "out", dtype=dtype, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    assert result.verification.worst is not None
    assert 0 <= result.verification.worst.threshold < 0.1  # finite: bfloat16 allows ~1e-2
