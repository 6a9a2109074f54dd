"""llama.cpp's own converter (tests/llamacpp_env.py) as the oracle of the `llama.cpp` rules: on
the golden table's PEFT-made adapters and on tiny GPT-2, BERT and Llama bases, the converter
accepts exactly what `loads` says llama.cpp loads; the scale each written tensor gets
(`adapter.lora.alpha` / its rank) is PEFT's exactly where `llama.cpp.scale` stays silent.

One converter process runs every case (about 15 s); skipped when the converter is not extracted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from adapterctl.ops.engines import Verdict, judge, read_base_config
from adapterctl.ops.inspect import inspect_adapter
from tests import llamacpp_env
from tests.lib.test_engines import MATRIX

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not llamacpp_env.ready(),
        reason="llama.cpp's converter is not extracted: .venv/bin/python -m tests.llamacpp_env",
    ),
]

#: rules whose refusal comes from llama.cpp's loader, after the converter accepted the adapter
LOADER_RULES = {"llama.cpp.tied_lm_head"}
#: extra cases: name -> (base builder name, base config edits, adapter builder, LoraConfig kwargs)
ARCH_CASES: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {}, "gpt2", {"r": 8, "target_modules": ["c_attn"]}),
    "bert": ("bert", {}, "bert", {"r": 8, "target_modules": ["query", "value"]}),
    "llama": ("llama", {}, "llama", {"r": 8, "target_modules": ["q_proj"]}),
    "unknown architecture": (
        "llama", {"architectures": ["FooForCausalLM"]}, "llama",
        {"r": 8, "target_modules": ["q_proj"]},
    ),
    "no architectures": ("llama", {"architectures": None}, "llama",
                         {"r": 8, "target_modules": ["q_proj"]}),
    "tied lm_head": ("llama-tied", {}, "llama-tied", {"r": 8, "target_modules": ["q_proj", "lm_head"]}),
}  # fmt: skip


def _model(kind: str, overrides: dict[str, Any] | None = None) -> Any:
    from tests.fixtures import tiny_bert, tiny_gpt2, tiny_llama

    if kind == "gpt2":
        return tiny_gpt2()
    if kind == "bert":
        return tiny_bert()
    if kind == "llama-tied":
        return tiny_llama(tie_word_embeddings=True)
    return tiny_llama(**(overrides or {}))


def _save_base(kind: str, overrides: dict[str, Any], edits: dict[str, Any], out: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _model(kind, overrides).save_pretrained(str(out))
    if edits:
        config = json.loads((out / "config.json").read_text())
        for key, value in edits.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def oracle(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Verdict, dict[str, Any], Path]]:
    """Every case: (our llama.cpp verdict with the base's config, the converter's result, the
    adapter)."""
    from tests.fixtures import peft_save

    work = tmp_path_factory.mktemp("llamacpp")
    cases: dict[str, tuple[Path, Path]] = {}
    for i, (name, (overrides, cfg)) in enumerate(MATRIX.items()):
        base = _save_base("llama", overrides, {}, work / f"base{i}")
        task = {"default": {"task_type": "CAUSAL_LM", **cfg}}
        adapter = peft_save(lambda o=overrides: _model("llama", o), work / f"m{i}", task)
        cases[name] = (adapter, base)
    for j, (name, (kind, edits, model, cfg)) in enumerate(ARCH_CASES.items()):
        base = _save_base(kind, {}, edits, work / f"arch-base{j}")
        task = {"default": cfg if kind == "bert" else {"task_type": "CAUSAL_LM", **cfg}}
        adapter = peft_save(lambda k=model: _model(k), work / f"arch{j}", task)
        cases[f"arch: {name}"] = (adapter, base)
    runs = [(a, b, work / f"out{n}.gguf") for n, (a, b) in enumerate(cases.values())]
    results = llamacpp_env.run_many(runs, work)
    found = {}
    for (name, (adapter, base)), result in zip(cases.items(), results, strict=True):
        (verdict,) = judge(
            inspect_adapter(adapter), ["llama.cpp"], read_base_config(base)
        ).verdicts[0]
        found[name] = (verdict, result, adapter)
    return found


CASES = [*MATRIX, *(f"arch: {n}" for n in ARCH_CASES)]


@pytest.mark.parametrize("case", CASES)
def test_the_converter_accepts_what_loads_says(oracle: Any, case: str) -> None:
    verdict, result, _ = oracle[case]
    converter_refusals = [
        f for f in verdict.findings if f.level == "error" and f.rule not in LOADER_RULES
    ]
    assert (result["rc"] == 0) == (not converter_refusals), (verdict, result["errors"])


def test_the_refusals_are_the_ones_we_name(oracle: Any) -> None:
    """Where the converter refuses, its error names what our finding names."""
    for case in ("dora", "modules_to_save", "bias", "lora_bias"):
        verdict, result, _ = oracle[case]
        (finding,) = [f for f in verdict.findings if f.level == "error"]
        assert finding.rule == "llama.cpp.tensors"
        (unexpected,) = [e for e in result["errors"] if e.startswith("Unexpected name")]
        named = unexpected.split("'")[1]
        assert f"`{named}`" in finding.message, (finding.message, unexpected)
    verdict, result, _ = oracle["arch: unknown architecture"]
    assert [f.rule for f in verdict.findings] == ["llama.cpp.architecture"]
    assert result["rc"] == 1


def test_a_tied_lm_head_passes_the_converter_and_not_the_loader(oracle: Any) -> None:
    """The Llama converter writes the lm_head LoRA as `output.weight.lora_a/b`; a tied Llama has
    no `output.weight` (src/models/llama.cpp: token_embd, TENSOR_DUPLICATED), so llama.cpp's
    adapter loader refuses it ("does not exist in base model"): we say it does not load."""
    verdict, result, _ = oracle["arch: tied lm_head"]
    assert result["rc"] == 0
    assert "output.weight.lora_a" in result["gguf"]["tensors"]
    assert [f.rule for f in verdict.findings] == ["llama.cpp.tied_lm_head"]
    assert not verdict.loads


_NAMES = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj", "attn_k": "self_attn.k_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}  # fmt: skip


def _llamacpp_scales(gguf: dict[str, Any]) -> dict[str, float]:
    """Module path -> the scale llama.cpp applies: adapter.lora.alpha / lora_b's ne0 (its rank)."""
    alpha = float(gguf["keys"]["adapter.lora.alpha"])
    scales = {}
    for name, shape in gguf["tensors"].items():
        if name.startswith("blk.") and name.endswith(".weight.lora_b"):
            _, layer, kind = name.split(".")[:3]
            scales[f"model.layers.{layer}.{_NAMES[kind]}"] = alpha / shape[0]
    return scales


@pytest.mark.parametrize("case", ["plain r=8", "patterns", "rslora", "mlp (all linear)", "r=64"])
def test_the_written_scale_is_peft_s_where_no_scale_rule_fires(oracle: Any, case: str) -> None:
    """The GGUF holds one alpha (the config's lora_alpha, never alpha_pattern) and each tensor's
    rank; alpha / rank is PEFT's scaling for exactly the modules `llama.cpp.scale` does not name."""
    verdict, result, path = oracle[case]
    gguf = result["gguf"]
    assert gguf["keys"]["adapter.lora.alpha"] == float(MATRIX[case][1].get("lora_alpha", 8))
    theirs = _llamacpp_scales(gguf)
    (adapter,) = inspect_adapter(path).adapters
    ours = {m.path: m.scaling for m in adapter.modules if m.scaling is not None}
    assert set(theirs) == set(ours)
    differ = sorted(p for p in ours if not math.isclose(theirs[p], ours[p], rel_tol=1e-6))
    scale = [f for f in verdict.findings if f.rule == "llama.cpp.scale"]
    if differ:
        (finding,) = scale
        assert f"{len(differ)} module(s)" in finding.message
        assert f"`{differ[0]}`" in finding.message
    else:
        assert scale == []
