"""`convert --portable` against PEFT 0.21.2: the output has one rank, no patterns, lora_alpha == r
and no rslora, every module's delta is unchanged, and PEFT computes the same logits with it."""

from __future__ import annotations

import copy
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterctl.format.config import LoraConfig
from adapterctl.format.rawtensor import CAST_TARGETS, OpenStore, RawTensor, to_float64
from adapterctl.ops.convert import convert_adapter
from adapterctl.ops.convert.plan import Options, Plan
from adapterctl.ops.convert.portable import padded
from tests.fixtures import peft_save, residual_pair, tiny_llama
from tests.helpers import lora_deltas, read_raw

ST = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "patterns": {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 6, "layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"v_proj": 3},
    },
    "rslora_patterns": {
        "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "o_proj"],
        "rank_pattern": {"o_proj": 8}, "alpha_pattern": {"q_proj": 5},
    },
    "embedding": {
        "r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["embed_tokens", "q_proj"],
        "rank_pattern": {"embed_tokens": 2},
    },
}  # fmt: skip


def _worst(before: dict[str, Any], after: dict[str, Any]) -> float:
    assert set(before) == set(after)
    return max(float(np.linalg.norm(after[m] - d) / np.linalg.norm(d)) for m, d in before.items())


def _logits(model_fn: Any, adapter: Path) -> Any:
    import warnings

    import torch
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_fn(), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits


def _assert_portable(directory: Path, rank: int | None = None) -> int:
    """One rank everywhere (the config's), no patterns, lora_alpha == r, no rslora."""
    config = LoraConfig.from_file(directory / CONFIG)
    assert config.lora_alpha == config.r
    assert config.use_rslora is False
    assert not config.rank_pattern
    assert not config.alpha_pattern
    ranks = {
        k: t.shape[0] for k, t in read_raw(directory).items() if k.endswith(("lora_A.weight", "_A"))
    } | {
        k: t.shape[1] for k, t in read_raw(directory).items() if k.endswith(("lora_B.weight", "_B"))
    }
    assert set(ranks.values()) == {config.r}, ranks
    if rank is not None:
        assert config.r == rank
    return int(config.r)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(VARIANTS))
def test_peft_computes_the_same_logits(case: str, tmp_path: Path) -> None:
    src = peft_save(tiny_llama, tmp_path / "src", {"default": VARIANTS[case]})
    result = convert_adapter(src, tmp_path / "out", portable=True, verify_output=True)
    cfg = VARIANTS[case]
    largest = max([cfg["r"], *cfg.get("rank_pattern", {}).values()])
    assert _assert_portable(tmp_path / "out") == largest
    assert result.verification is not None
    assert result.verification.passed
    assert result.verification.worst is not None
    assert result.verification.worst.error <= 1e-6
    assert _worst(lora_deltas(src), lora_deltas(tmp_path / "out")) <= 1e-6
    # PEFT saves the embedding layer it targets in full (save_embedding_layers="auto"): kept
    saved = (
        [{"kind": "saved_embedding", "name": "model.embed_tokens"}] if case == "embedding" else []
    )
    assert result.to_dict()["not_portable"] == saved
    assert result.to_dict()["portable"] is True
    before, after = _logits(tiny_llama, src), _logits(tiny_llama, tmp_path / "out")
    assert (before - after).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_energy_output_made_portable(tmp_path: Path) -> None:
    """--energy writes per-module ranks through patterns; with --portable (in the same run, or on
    its output) one rank, and PEFT computes what the --energy output computes."""
    src = peft_save(tiny_llama, tmp_path / "src", {"default": VARIANTS["patterns"]})
    reduced = convert_adapter(src, tmp_path / "energy", energy=0.8)
    assert LoraConfig.from_file(tmp_path / "energy" / CONFIG).rank_pattern  # per-module ranks
    ranks = [m.r for m in reduced.modules]
    both = convert_adapter(src, tmp_path / "both", energy=0.8, portable=True, verify_output=True)
    after = convert_adapter(tmp_path / "energy", tmp_path / "after", portable=True)
    assert both.verification is not None
    assert both.verification.passed
    expected = _logits(tiny_llama, tmp_path / "energy")
    for out, result in ((tmp_path / "both", both), (tmp_path / "after", after)):
        assert _assert_portable(out) == max(ranks)
        assert [m.r for m in result.modules] == [max(ranks)] * len(ranks)
        assert _worst(lora_deltas(tmp_path / "energy"), lora_deltas(out)) <= 1e-6
        assert (_logits(tiny_llama, out) - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_rank_reduces_then_pads_to_it(tmp_path: Path) -> None:
    """--rank N --portable: modules above N are reduced to N, those below are padded to N."""
    src = peft_save(tiny_llama, tmp_path / "src", {"default": VARIANTS["patterns"]})
    reduced = convert_adapter(src, tmp_path / "reduced", rank=3)
    result = convert_adapter(src, tmp_path / "out", rank=3, portable=True, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    assert _assert_portable(tmp_path / "out", rank=3) == 3
    small = [m for m in result.modules if m.r_in == 2]
    assert small
    assert all("padded 2->3" in m.actions for m in small)
    assert _worst(lora_deltas(tmp_path / "reduced"), lora_deltas(tmp_path / "out")) <= 1e-6
    assert [m.relative_error for m in result.modules] == [m.relative_error for m in reduced.modules]


@pytest.mark.slow
def test_with_initial_to_plain_portable_lora(tmp_path: Path) -> None:
    """PiSSA with patterns to plain LoRA, made portable in the same run."""
    cfg = {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"q_proj": 12},
    }  # fmt: skip
    trained_model, init, trained, _ = residual_pair(tmp_path, "pissa", **cfg)
    plain = convert_adapter(trained, tmp_path / "plain", initial=init)
    result = convert_adapter(
        trained, tmp_path / "out", initial=init, portable=True, verify_output=True
    )
    assert result.verification is not None
    assert result.verification.passed
    assert _assert_portable(tmp_path / "out") == 12  # 2 x the largest rank
    assert result.method == "pissa"
    assert _worst(lora_deltas(tmp_path / "plain"), lora_deltas(tmp_path / "out")) <= 1e-6
    import torch

    with torch.no_grad():
        expected = trained_model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits
    assert (_logits(tiny_llama, tmp_path / "out") - expected).abs().max().item() <= 1e-4
    assert [m.r for m in plain.modules] != [m.r for m in result.modules]


@pytest.mark.slow
def test_bfloat16_within_its_rounding(tmp_path: Path) -> None:
    src = peft_save(tiny_llama, tmp_path / "src", {"default": VARIANTS["rslora_patterns"]})
    result = convert_adapter(
        src, tmp_path / "out", portable=True, dtype="bfloat16", verify_output=True
    )
    assert result.verification is not None
    assert result.verification.passed
    assert result.verification.worst is not None
    assert 1e-6 < result.verification.worst.error <= result.verification.worst.threshold
    assert {t.dtype.code for t in read_raw(tmp_path / "out").values()} == {"BF16"}
    _assert_portable(tmp_path / "out")
    assert _worst(lora_deltas(src), lora_deltas(tmp_path / "out")) <= 2 * 2.0**-8 * 4
    # a bfloat16 source without --dtype: B rounded once to bfloat16, still verified
    convert_adapter(src, tmp_path / "bf16", dtype="bfloat16")
    half = convert_adapter(tmp_path / "bf16", tmp_path / "out16", portable=True, verify_output=True)
    assert half.verification is not None
    assert half.verification.passed


@pytest.mark.slow
def test_dora_modules_to_save_and_biases_are_kept_and_named(tmp_path: Path) -> None:
    """What engines cannot take as plain LoRA is copied bit for bit and named; PEFT still
    computes the same logits (DoRA's norm is of W + s·B·A, which folding leaves unchanged)."""
    dora = {
        "r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6},
        "modules_to_save": ["lm_head"],
    }  # fmt: skip
    src = peft_save(tiny_llama, tmp_path / "src", {"default": dora})
    result = convert_adapter(src, tmp_path / "out", portable=True, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    _assert_portable(tmp_path / "out", rank=4)
    kinds = {k.kind for k in result.not_portable}
    assert kinds == {"dora", "modules_to_save"}
    names = {k.name for k in result.not_portable if k.kind == "dora"}
    assert names == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    assert {"kind": "modules_to_save", "name": "lm_head"} in result.to_dict()["not_portable"]
    before, after = read_raw(src), read_raw(tmp_path / "out")
    for key, t in before.items():
        if "lora_magnitude_vector" in key or "lm_head" in key:
            assert after[key].data.tobytes() == t.data.tobytes(), key
    expected = _logits(tiny_llama, src)
    assert (_logits(tiny_llama, tmp_path / "out") - expected).abs().max().item() <= 1e-5

    biased = {"r": 4, "lora_alpha": 12, "target_modules": ["q_proj"], "lora_bias": True}
    src = peft_save(lambda: tiny_llama(attention_bias=True), tmp_path / "b", {"default": biased})
    result = convert_adapter(src, tmp_path / "b_out", portable=True, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    assert {k.kind for k in result.not_portable} == {"lora_bias"}
    model_fn = lambda: tiny_llama(attention_bias=True)  # noqa: E731
    before, after = _logits(model_fn, src), _logits(model_fn, tmp_path / "b_out")
    assert (before - after).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("dora", "dtype", "rank"), [(True, None, None), (True, "bfloat16", None), (False, None, 5)]
)
def test_the_plan_is_complete_before_anything_is_written(
    dora: bool, dtype: str | None, rank: int | None, tmp_path: Path
) -> None:
    from tests.helpers import P, Q, V, lora_tensors, write_adapter

    tensors = {**lora_tensors(Q), **lora_tensors(V, r=6, d_out=16)}
    if dora:
        tensors[f"{P}{Q}.lora_magnitude_vector"] = np.ones(8, dtype=np.float32)
    src = write_adapter(
        tmp_path / "src",
        tensors,
        {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 6}, "use_dora": dora},
    )
    config = LoraConfig.from_file(src / CONFIG)
    options = Options(dtype=CAST_TARGETS[dtype] if dtype else None, rank=rank, portable=True)
    with OpenStore(src / ST, "safetensors") as store:
        plan = Plan(store, config, options)
        planned = copy.deepcopy(([r.to_dict() for r in plan.reports], plan.not_portable))
        shapes = {o.name: o.shape for o in plan.outputs}
        for o in plan.outputs:
            assert o.produce().shape == shapes[o.name]
        assert ([r.to_dict() for r in plan.reports], plan.not_portable) == planned
    r = rank or 6
    assert plan.config.r == plan.config.lora_alpha == r
    assert shapes[f"{P}{Q}.lora_A.weight"] == (r, 8)
    assert shapes[f"{P}{V}.lora_B.weight"] == (16, r)
    assert [str(k) for k in planned[1]] == ([f"dora `{Q}`"] if dora else [])
    assert all(rep["r"] == rep["alpha"] == r for rep in planned[0])
    result = convert_adapter(src, tmp_path / "out", dtype=dtype, rank=rank, portable=True)
    assert [m.to_dict() for m in result.modules] == planned[0]


def test_padding_writes_into_the_output_alone() -> None:
    """A large B scaled and padded: the values exact to one rounding, and the memory it takes
    is the output array and a small piece, not copies of the factor."""
    from adapterctl.format.dtypes import DTYPES

    rng = np.random.default_rng(0)
    b = rng.standard_normal((1 << 16, 64)).astype(np.float32)  # 16 MiB
    t = RawTensor(DTYPES["F32"], b.shape, b.tobytes())
    tracemalloc.start()
    out = padded([(t, 0.3)], 1, "F32", 128)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.shape == (1 << 16, 128)
    assert peak <= out.nbytes + (8 << 20)  # the output and one piece: no copy of the factor
    values = out.data.reshape(out.shape)
    assert (values[:, 64:] == 0).all()
    assert np.array_equal(values[:, :64], (b.astype(np.float64) * 0.3).astype(np.float32))
    a = padded([(RawTensor(DTYPES["F32"], (64, 8), b[:64, :8].tobytes()), 1.0)], 0, "F32", 80)
    assert a.data.reshape(80, 8)[:64].tobytes() == b[:64, :8].tobytes()
    assert not a.data.reshape(80, 8)[64:].any()


def test_verify_compares_deltas_not_factors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A B written without its scaling (shapes and config as planned) fails --verify: nothing
    is written."""
    import adapterctl.ops.convert.plan as plan_mod
    from adapterctl.ops.convert import VerificationFailed
    from tests.helpers import Q, lora_tensors, write_adapter

    src = write_adapter(tmp_path / "src", lora_tensors(Q), {"lora_alpha": 12})
    assert convert_adapter(src, tmp_path / "ok", portable=True, verify_output=True).verification
    real = plan_mod.padded

    def unscaled(parts: Any, axis: int, code: str, rank: int) -> RawTensor:
        return real([(t, 1.0) for t, _ in parts], axis, code, rank)

    monkeypatch.setattr(plan_mod, "padded", unscaled)
    with pytest.raises(VerificationFailed) as e:
        convert_adapter(src, tmp_path / "bad", portable=True, verify_output=True)
    assert e.value.result.verification is not None
    assert e.value.result.verification.worst is not None
    assert e.value.result.verification.worst.name == Q
    assert not (tmp_path / "bad").exists()


def test_convolutions_pad_and_grouped_ones_are_refused(tmp_path: Path) -> None:
    from adapterctl.errors import ConversionError
    from tests.helpers import P, Q, lora_tensors, write_adapter

    rng = np.random.default_rng(1)
    conv = "model.conv"
    tensors = {
        **lora_tensors(Q, r=4),
        f"{P}{conv}.lora_A.weight": rng.standard_normal((2, 3, 3, 3)).astype(np.float32),
        f"{P}{conv}.lora_B.weight": rng.standard_normal((5, 2, 1, 1)).astype(np.float32),
    }
    config = {"target_modules": ["q_proj", "conv"], "rank_pattern": {"conv": 2}}
    src = write_adapter(tmp_path / "src", tensors, config)
    result = convert_adapter(src, tmp_path / "out", portable=True, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    out = read_raw(tmp_path / "out")
    assert out[f"{P}{conv}.lora_A.weight"].shape == (4, 3, 3, 3)
    assert out[f"{P}{conv}.lora_B.weight"].shape == (5, 4, 1, 1)
    b = to_float64(out[f"{P}{conv}.lora_B.weight"])
    assert not b[:, 2:].any()
    expected = 4 * to_float64(RawTensor(out[f"{P}{conv}.lora_B.weight"].dtype, (5, 2, 1, 1),
                                        tensors[f"{P}{conv}.lora_B.weight"].tobytes()))  # fmt: skip
    assert np.array_equal(b[:, :2], expected)  # 8 / 2: a power of two, exact
    tensors[f"{P}{conv}.lora_B.weight"] = rng.standard_normal((6, 1, 1, 1)).astype(np.float32)
    grouped = write_adapter(tmp_path / "grouped", tensors, config)
    with pytest.raises(ConversionError, match="grouped convolution"):
        convert_adapter(grouped, tmp_path / "g_out", portable=True)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_nan_and_inf_are_carried_and_verified(dtype: str | None, tmp_path: Path) -> None:
    """NaN/±Inf in SOURCE stay where they were (B's times the scaling), and --verify compares
    such a module factor by factor against the scaled, padded source."""
    from tests.helpers import P, Q, V, lora_tensors, write_adapter

    tensors = {**lora_tensors(Q, r=2), **lora_tensors(V, r=4)}
    tensors[f"{P}{Q}.lora_B.weight"][0, 0] = np.nan
    tensors[f"{P}{Q}.lora_A.weight"][1, 1] = -np.inf
    config = {"r": 4, "lora_alpha": 12, "target_modules": ["q_proj", "v_proj"]}
    src = write_adapter(tmp_path / "src", tensors, {**config, "rank_pattern": {"q_proj": 2}})
    result = convert_adapter(src, tmp_path / "out", portable=True, dtype=dtype, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    out = read_raw(tmp_path / "out")
    b, a = to_float64(out[f"{P}{Q}.lora_B.weight"]), to_float64(out[f"{P}{Q}.lora_A.weight"])
    assert b.shape == (8, 4)
    assert np.isnan(b[0, 0])
    assert a[1, 1] == -np.inf
    assert np.isfinite(np.delete(b.reshape(-1), 0)).all()
    assert not b[:, 2:].any()
    assert not a[2:].any()
    expected = 6 * tensors[f"{P}{Q}.lora_B.weight"][1:, :2].astype(np.float64)  # 12 / 2
    assert np.allclose(b[1:, :2], expected, rtol=2.0**-8 if dtype else 2.0**-24, atol=0)


SERVING = ["vllm", "tgi", "lorax", "llama.cpp"]


def _serving_verdicts(directory: Path) -> dict[str, tuple[bool, bool]]:
    """(loads, same_as_peft) per serving engine, from `inspect --engine`'s library call."""
    from adapterctl.ops.engines import judge
    from adapterctl.ops.inspect import inspect_adapter

    judged = judge(inspect_adapter(directory), SERVING)
    (verdicts,) = judged.verdicts
    return {v.engine: (v.loads, v.same_as_peft) for v in verdicts}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "patterns", "rslora_patterns"])
def test_every_serving_engine_then_computes_what_peft_computes(case: str, tmp_path: Path) -> None:
    """What `--portable` is for: where patterns or rslora made an engine compute something else,
    `inspect --engine` says every serving engine computes the portable output as PEFT does."""
    src = peft_save(tiny_llama, tmp_path / "src", {"default": VARIANTS[case]})
    before = _serving_verdicts(src)
    if case != "plain":
        assert not all(same for _, same in before.values()), before
    convert_adapter(src, tmp_path / "out", portable=True)
    after = _serving_verdicts(tmp_path / "out")
    assert after == dict.fromkeys(SERVING, (True, True)), after
