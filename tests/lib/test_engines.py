"""ops/engines: each serving-engine rule with a minimal adapter that triggers it and one that does
not; the verdicts of PEFT-made adapters against every engine, as a golden table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterctl.errors import InvalidOptionError
from adapterctl.ops.engines import (
    TABLES,
    Verdict,
    evaluate,
    facts_of,
    judge,
    lorax_padded_rank,
    parse_engine,
    read_base_config,
)
from adapterctl.ops.inspect import inspect_adapter
from tests.conftest import GOLDEN
from tests.helpers import P, Q, V, lora_tensors, write_adapter

LLAMA_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 1,
    "vocab_size": 16,
    "tie_word_embeddings": False,
}


def _verdict(path: Path, engine: str, base: dict[str, Any] | None = None) -> Verdict:
    (adapter,) = inspect_adapter(path).adapters
    facts = facts_of(adapter, base)
    assert facts is not None
    return evaluate(facts, engine, [p.message for p in adapter.errors])


def _rules(path: Path, engine: str, base: dict[str, Any] | None = None) -> list[str]:
    return [f.rule for f in _verdict(path, engine, base).findings]


def _vec(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def _two_layers(r0: int, r1: int) -> dict[str, Any]:
    q1 = Q.replace("layers.0", "layers.1")
    return {**lora_tensors(Q, r=r0), **lora_tensors(q1, r=r1)}


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "plain")


# --- one adapter per rule: (engine, rule id, tensors, config, base) ---------------------------

EMB = "model.embed_tokens"
HEAD = "lm_head"
TRIGGERS: dict[str, tuple[str, dict[str, Any] | None, dict[str, Any], dict[str, Any] | None]] = {
    "vllm.modules_to_save": (
        "vllm",
        {**lora_tensors(), f"{P}lm_head.weight": np.zeros((16, 8), np.float32)},
        {"modules_to_save": ["lm_head"]},
        None,
    ),
    # up to 0.30 even a classifier's head
    "vllm.modules_to_save@0.30": (
        "vllm@0.30",
        {**lora_tensors(), f"{P}score.weight": np.zeros((2, 8), np.float32)},
        {"modules_to_save": ["score"]},
        None,
    ),
    "vllm.dora": (
        "vllm",
        {**lora_tensors(), f"{P}{Q}.lora_magnitude_vector": _vec(8)},
        {"use_dora": True},
        None,
    ),
    "vllm.rslora@0.6": ("vllm@0.6", lora_tensors(), {"use_rslora": True}, None),
    "vllm.bias": (
        "vllm", {**lora_tensors(), f"{P}{Q}.bias": _vec(8)}, {"bias": "lora_only"}, None
    ),
    "vllm.bias@0.10": (
        "vllm@0.10", {**lora_tensors(), f"{P}{Q}.bias": _vec(8)}, {"bias": "lora_only"}, None
    ),
    "vllm.bias@0.6": (
        "vllm@0.6", {**lora_tensors(), f"{P}{Q}.lora_B.bias": _vec(8)}, {"lora_bias": True},
        None,
    ),
    "vllm.features": ("vllm", lora_tensors(), {"alora_invocation_tokens": [1, 2]}, None),
    "vllm.max_rank": ("vllm", lora_tensors(r=600), {"r": 600}, None),
    "vllm.max_rank@0.4": ("vllm@0.4", lora_tensors(r=100), {"r": 100}, None),
    "vllm.max_rank@0.7": ("vllm@0.7", lora_tensors(r=300), {"r": 300}, None),
    "vllm.tensors": (
        "vllm", {**lora_tensors(), f"{P}{Q}.lora_B.bias": _vec(8)}, {"lora_bias": True}, None
    ),
    # 0.4-0.5 have no config checks: a DoRA magnitude is an unsupported tensor name
    "vllm.tensors@0.5": (
        "vllm@0.5",
        {**lora_tensors(), f"{P}{Q}.lora_magnitude_vector": _vec(8)},
        {"use_dora": True},
        None,
    ),
    "vllm.tensors@0.30": (
        "vllm@0.30", {**lora_tensors(), f"{P}{Q}.lora_B.bias": _vec(8)}, {"lora_bias": True},
        None,
    ),
    "vllm.vocab": (
        "vllm",
        {
            **lora_tensors(),
            f"{P}{EMB}.lora_embedding_A": np.zeros((4, 17), np.float32),
            f"{P}{EMB}.lora_embedding_B": np.zeros((8, 4), np.float32),
        },
        {"target_modules": ["q_proj", "embed_tokens"]},
        LLAMA_BASE,
    ),
    "vllm.vocab@0.11": (
        "vllm@0.11",
        {
            **lora_tensors(),
            f"{P}{EMB}.lora_embedding_A": np.zeros((4, 600), np.float32),
            f"{P}{EMB}.lora_embedding_B": np.zeros((8, 4), np.float32),
        },
        {"target_modules": ["q_proj", "embed_tokens"]},
        LLAMA_BASE,
    ),
    # rsLoRA: 0.4-0.5 scale by alpha / r
    "vllm.patterns@0.5": ("vllm@0.5", lora_tensors(), {"use_rslora": True}, None),
    "vllm.patterns@0.31": (
        "vllm@0.31",
        {**lora_tensors(), **lora_tensors(V, r=2)},
        {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}},
        None,
    ),
    "tgi.ranks": (
        "tgi", _two_layers(4, 8), {"rank_pattern": {"layers.1.self_attn.q_proj": 8}}, None
    ),
    "tgi.patterns": ("tgi", lora_tensors(), {"alpha_pattern": {"q_proj": 4}}, None),
    "tgi.layer_types": (
        "tgi",
        {**lora_tensors(), **lora_tensors(HEAD, r=4)},
        {"target_modules": ["q_proj", "lm_head"]},
        None,
    ),
    "tgi.partial_layers": ("tgi", lora_tensors(), {}, {**LLAMA_BASE, "num_hidden_layers": 2}),
    "tgi.module_paths": (
        "tgi", lora_tensors("transformer.h.0.mlp.c_fc"), {"target_modules": ["c_fc"]}, None
    ),
    "lorax.architecture": (
        "lorax", lora_tensors(), {}, {**LLAMA_BASE, "model_type": "gpt_neox"}
    ),
    "tgi.tensors": (
        "tgi",
        {**lora_tensors(), f"{P}{Q}.lora_magnitude_vector": _vec(8)},
        {"use_dora": True},
        None,
    ),
    "lorax.ranks": (
        "lorax", _two_layers(8, 24), {"r": 8, "rank_pattern": {"layers.1.self_attn.q_proj": 24}},
        None,
    ),
    "lorax.patterns": ("lorax", lora_tensors(), {"alpha_pattern": {"q_proj": 4}}, None),
    "lorax.layer_types": (
        "lorax",
        {**lora_tensors(), **lora_tensors("model.layers.0.mlp.fc1", r=4)},
        {"target_modules": ["q_proj", "fc1"]},
        None,
    ),
    "lorax.partial_layers": (
        "lorax",
        {**_two_layers(4, 4), **lora_tensors(V, r=4)},
        {"target_modules": ["q_proj", "v_proj"]},
        None,
    ),
    "lorax.tensors": (
        "lorax", {**lora_tensors(), f"{P}{Q}.bias": _vec(8)}, {"bias": "lora_only"}, None
    ),
    "llama.cpp.tensors": (
        "llama.cpp", {**lora_tensors(), f"{P}{EMB}.weight": np.zeros((16, 8), np.float32)}, {},
        None,
    ),
    "llama.cpp.tied_lm_head": (
        "llama.cpp",
        {**lora_tensors(), **lora_tensors(HEAD, r=4)},
        {"target_modules": ["q_proj", "lm_head"]},
        {**LLAMA_BASE, "tie_word_embeddings": True},
    ),
    "llama.cpp.architecture": (
        "llama.cpp", lora_tensors(), {}, {"num_hidden_layers": 1, "vocab_size": 16}
    ),
    "llama.cpp.architecture@unknown": (
        "llama.cpp", lora_tensors(), {}, {**LLAMA_BASE, "architectures": ["FooForCausalLM"]}
    ),
    "llama.cpp.scale": ("llama.cpp", lora_tensors(), {"use_rslora": True}, None),
    "peft.file": (
        "peft", {k.removeprefix(P): v for k, v in lora_tensors().items()}, {}, None
    ),
}  # fmt: skip


def _embedding_copy(rows: int) -> dict[str, Any]:
    return {
        **lora_tensors(),
        f"{P}{EMB}.lora_embedding_A": np.zeros((4, rows), np.float32),
        f"{P}{EMB}.lora_embedding_B": np.zeros((8, 4), np.float32),
        f"{P}{EMB}.base_layer.weight": np.zeros((rows, 8), np.float32),
    }


EMB_CONFIG = {"target_modules": ["q_proj", "embed_tokens"]}
for _engine in ("vllm", "tgi", "lorax", "llama.cpp"):
    TRIGGERS[f"{_engine}.resized_embeddings"] = (_engine, _embedding_copy(16), EMB_CONFIG,
                                                  {**LLAMA_BASE, "vocab_size": 12})  # fmt: skip
# from 0.12, an embedding LoRA narrower than the base's vocabulary is refused too
TRIGGERS["vllm.vocab@0.12"] = ("vllm@0.12", _embedding_copy(12), EMB_CONFIG, LLAMA_BASE)
# up to 0.11, vLLM refuses PEFT's copy of the embedding itself (skipped from 0.12)
for _version in ("0.10", "0.11"):
    TRIGGERS[f"vllm.tensors@{_version}"] = (f"vllm@{_version}", _embedding_copy(16), EMB_CONFIG,
                                            LLAMA_BASE)  # fmt: skip

#: the same adapter with the one thing that triggers the rule taken away (or a near miss)
NEAR_MISSES: dict[str, tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any] | None]] = {
    "vllm.max_rank": (lora_tensors(r=512), {"r": 512}, None),
    "vllm.max_rank@0.4": (lora_tensors(r=64), {"r": 64}, None),
    "vllm.max_rank@0.7": (lora_tensors(r=256), {"r": 256}, None),
    "vllm.vocab": (_embedding_copy(16), EMB_CONFIG, LLAMA_BASE),
    "vllm.vocab@0.11": (
        {
            **lora_tensors(),
            f"{P}{EMB}.lora_embedding_A": np.zeros((4, 16 + 512), np.float32),
            f"{P}{EMB}.lora_embedding_B": np.zeros((8, 4), np.float32),
        },
        {"target_modules": ["q_proj", "embed_tokens"]},
        LLAMA_BASE,
    ),
    # from 0.31 a classifier's head may be saved
    "vllm.modules_to_save": (
        {**lora_tensors(), f"{P}score.weight": np.zeros((2, 8), np.float32)},
        {"modules_to_save": ["score"]},
        None,
    ),
    "vllm.features": (lora_tensors(), {"init_lora_weights": "gaussian"}, None),
    # rsLoRA at r=1: alpha / r is alpha / sqrt(r)
    "vllm.patterns@0.5": (lora_tensors(r=1), {"r": 1, "use_rslora": True}, None),
    # a rank_pattern whose alpha keeps the module's scale: one scale is right
    "vllm.patterns@0.31": (
        {**lora_tensors(), **lora_tensors(V, r=2)},
        {
            "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"v_proj": 4},
        },
        None,
    ),
    # ranks 4 and 8 are both padded to 8: LoRAX stacks them, TGI would not
    "lorax.ranks": (_two_layers(4, 8), {"rank_pattern": {"layers.1.self_attn.q_proj": 8}}, None),
    "tgi.partial_layers": (lora_tensors(), {}, LLAMA_BASE),
    "lorax.partial_layers": (
        {**_two_layers(4, 4), **lora_tensors(V, r=4), **lora_tensors(V.replace(".0.", ".1."))},
        {"target_modules": ["q_proj", "v_proj"]},
        None,
    ),
    "lorax.layer_types": (
        {**lora_tensors(), **lora_tensors(HEAD, r=4)},
        {"target_modules": ["q_proj", "lm_head"]},
        None,
    ),
    # a layernorm under modules_to_save is kept by the converter (mergekit's norms)
    "llama.cpp.tensors": (
        {**lora_tensors(), f"{P}model.layers.0.input_layernorm.weight": _vec(8)},
        {"modules_to_save": ["input_layernorm"]},
        None,
    ),
    "llama.cpp.tied_lm_head": (
        {**lora_tensors(), **lora_tensors(HEAD, r=4)},
        {"target_modules": ["q_proj", "lm_head"]},
        LLAMA_BASE,
    ),
    "llama.cpp.architecture": (lora_tensors(), {}, LLAMA_BASE),
    "llama.cpp.architecture@unknown": (
        lora_tensors(),
        {},
        {**LLAMA_BASE, "architectures": ["GPT2LMHeadModel"]},
    ),
    "tgi.module_paths": (
        lora_tensors("model.layers.0.mlp.down_proj"),
        {"target_modules": ["down_proj"]},
        None,
    ),
    "lorax.architecture": (lora_tensors(), {}, {**LLAMA_BASE, "model_type": "phi3"}),
    # PEFT's copy of the base's own embedding: vLLM skips it from 0.12, and computes the same
    "vllm.tensors": (_embedding_copy(16), EMB_CONFIG, LLAMA_BASE),
    "vllm.tensors@0.30": (_embedding_copy(16), EMB_CONFIG, LLAMA_BASE),
    "vllm.resized_embeddings": (_embedding_copy(16), EMB_CONFIG, LLAMA_BASE),
    "llama.cpp.resized_embeddings": (_embedding_copy(16), EMB_CONFIG, LLAMA_BASE),
    # a rank_pattern alone: lora_alpha / each tensor's own rank is PEFT's scale
    "llama.cpp.scale": (
        {**lora_tensors(), **lora_tensors(V, r=2)},
        {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}},
        None,
    ),
}


def _id(case: str) -> str:
    """A TRIGGERS key (`vllm.tensors@0.30`) -> the rule id."""
    return case.split("@")[0]


def test_every_rule_has_a_trigger() -> None:
    """Every rule, and every release range of a ranged rule, has a case that triggers it."""
    for table in TABLES.values():
        for rule in table.rules:
            versions = [parse_engine(TRIGGERS[c][0])[1] for c in TRIGGERS if _id(c) == rule.id]
            assert any(rule.applies(v) for v in versions), (rule.id, rule.releases)
    ids = {r.id for t in TABLES.values() for r in t.rules} | {"peft.file"}
    assert ids == {_id(c) for c in TRIGGERS}
    assert set(NEAR_MISSES) <= set(TRIGGERS)


@pytest.mark.parametrize("case", sorted(TRIGGERS))
def test_rule_triggers(tmp_path: Path, case: str) -> None:
    engine, tensors, config, base = TRIGGERS[case]
    rule = _id(case)
    path = write_adapter(tmp_path / "a", tensors, config)
    verdict = _verdict(path, engine, base)
    assert rule in [f.rule for f in verdict.findings]
    level = next(f.level for f in verdict.findings if f.rule == rule)
    assert not verdict.same_as_peft
    if level == "error":
        assert not verdict.loads
        assert verdict.needs == ()
    elif all(f.level == "warning" for f in verdict.findings):
        assert verdict.loads


@pytest.mark.parametrize("case", sorted(TRIGGERS))
def test_rule_does_not_trigger(tmp_path: Path, plain: Path, case: str) -> None:
    engine, rule = TRIGGERS[case][0], _id(case)
    assert rule not in _rules(plain, engine, LLAMA_BASE)
    if case in NEAR_MISSES:
        tensors, config, base = NEAR_MISSES[case]
        path = write_adapter(tmp_path / "near", tensors, config)
        assert rule not in _rules(path, engine, base)


@pytest.mark.parametrize("engine", ["vllm", "tgi", "lorax", "llama.cpp", "peft"])
def test_a_plain_adapter_is_served_as_peft_computes_it(plain: Path, engine: str) -> None:
    v = _verdict(plain, engine)
    assert (v.loads, v.same_as_peft, v.findings) == (True, True, ())


def test_vllm_needs_the_smallest_max_lora_rank_that_fits(tmp_path: Path) -> None:
    def needs(r: int) -> tuple[str, ...]:
        path = write_adapter(tmp_path / f"r{r}", lora_tensors(r=r), {"r": r})
        return _verdict(path, "vllm").needs

    assert needs(16) == ("--enable-lora",)
    assert needs(24) == ("--enable-lora", "--max-lora-rank 32")
    assert needs(300) == ("--enable-lora", "--max-lora-rank 320")
    assert needs(600) == ()  # refused: no --max-lora-rank fits

    def needs_at(r: int, version: str) -> tuple[str, ...]:
        path = write_adapter(tmp_path / f"r{r}-{version}", lora_tensors(r=r), {"r": r})
        return _verdict(path, f"vllm@{version}").needs

    assert needs_at(64, "0.4") == ("--enable-lora", "--max-lora-rank 64")
    assert needs_at(100, "0.4") == ()  # 64 is 0.4's largest
    assert needs_at(100, "0.5") == ("--enable-lora", "--max-lora-rank 128")
    assert needs_at(300, "0.7") == ()  # 256 up to 0.7; 320 and 512 from 0.8
    assert needs_at(300, "0.8") == ("--enable-lora", "--max-lora-rank 320")


def test_vllm_needs_the_larger_extra_vocabulary(tmp_path: Path) -> None:
    tensors = {
        **lora_tensors(),
        f"{P}{EMB}.lora_embedding_A": np.zeros((4, 16 + 300), np.float32),
        f"{P}{EMB}.lora_embedding_B": np.zeros((8, 4), np.float32),
    }
    path = write_adapter(tmp_path / "a", tensors, {"target_modules": ["q_proj", "embed_tokens"]})
    v = _verdict(path, "vllm@0.11", LLAMA_BASE)
    assert v.needs == ("--enable-lora", "--lora-extra-vocab-size 512")
    assert _verdict(path, "vllm@0.11").needs == ("--enable-lora",)  # without --base: not known
    # from 0.12 there is no extra vocabulary: the base's rows only
    assert _rules(path, "vllm@0.12", LLAMA_BASE) == ["vllm.vocab"]


def test_vllm_rank_is_the_largest_stored_rank_not_r(tmp_path: Path) -> None:
    tensors = {**lora_tensors(), **lora_tensors(V, r=40)}
    config = {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 40}}
    v = _verdict(write_adapter(tmp_path / "a", tensors, config), "vllm")
    assert "--max-lora-rank 64" in v.needs


def test_lorax_padded_rank() -> None:
    assert [lorax_padded_rank(r) for r in (1, 8, 9, 16, 17, 24, 600)] == [
        8, 8, 16, 16, 32, 32, 608,
    ]  # fmt: skip
    assert lorax_padded_rank(12, world_size=2) == 16


def test_lorax_needs_name_the_padded_rank(tmp_path: Path) -> None:
    v = _verdict(write_adapter(tmp_path / "a", lora_tensors(r=24), {"r": 24}), "lorax")
    assert v.needs == ("rank padded to 32 for SGMV (1 GPU; zeros, same delta)",)
    v = _verdict(write_adapter(tmp_path / "b", lora_tensors(r=16), {"r": 16}), "lorax")
    assert v.needs == ()


def test_llama_cpp_scale_names_the_cause(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", lora_tensors(), {"alpha_pattern": {"q_proj": 4}})
    (finding,) = _verdict(path, "llama.cpp").findings
    assert "ignores alpha_pattern" in finding.message
    path = write_adapter(tmp_path / "b", lora_tensors(r=1), {"r": 1, "use_rslora": True})
    assert _verdict(path, "llama.cpp").findings == ()  # sqrt(1) == 1: the same scale


def test_parse_engine() -> None:
    assert parse_engine("vllm") == ("vllm", TABLES["vllm"].version)
    assert parse_engine("LLAMA.CPP") == ("llama.cpp", TABLES["llama.cpp"].version)
    assert parse_engine("peft") == ("peft", "0.21.2")
    assert parse_engine(f"tgi@{TABLES['tgi'].version}") == ("tgi", TABLES["tgi"].version)
    with pytest.raises(InvalidOptionError, match="unknown engine `trt`"):
        parse_engine("trt")
    with pytest.raises(InvalidOptionError, match=r"no rules for vllm 0\.3") as caught:
        parse_engine("vllm@0.3")
    assert caught.value.hint == "vllm's rules cover releases 0.4 to 0.34"
    assert parse_engine("vllm") == ("vllm", "0.34")  # the newest release read
    assert parse_engine("vllm@0.8") == parse_engine("vllm@0.8.5") == ("vllm", "0.8")
    with pytest.raises(InvalidOptionError, match=r"no rules for vllm 0\.35"):
        parse_engine("vllm@0.35")
    with pytest.raises(InvalidOptionError, match=r"no rules for llama\.cpp 0b03ada"):
        parse_engine("llama.cpp@0b03ada")


def test_other_peft_releases_come_from_peftversions(tmp_path: Path, plain: Path) -> None:
    assert parse_engine("peft@0.10.2") == ("peft", "0.10")
    assert parse_engine("peft@0.21.2") == ("peft", "0.21.2")
    with pytest.raises(InvalidOptionError, match="unknown PEFT version"):
        parse_engine("peft@1.0")
    # a config as PEFT 0.21 writes it holds keys that 0.10 does not know: TypeError there
    assert _rules(plain, "peft@0.10") == ["peft-unknown-key"]
    assert _rules(plain, "peft@0.14") == []  # dropped with a warning, all at their defaults
    minimal = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    tensors = {**lora_tensors(), f"{P}{Q}.lora_magnitude_vector": _vec(8)}
    path = write_adapter(tmp_path / "dora", tensors, raw_config=json.dumps(
        {**minimal, "use_dora": True}))  # fmt: skip
    assert _verdict(path, "peft@0.8").loads is False  # use_dora is first in 0.9
    assert _verdict(path, "peft@0.9").findings == ()


def test_an_adapter_without_config_loads_nowhere(tmp_path: Path) -> None:
    from tests.helpers import write_tensors

    write_tensors(tmp_path / "adapter_model.safetensors", lora_tensors())
    report = judge(inspect_adapter(tmp_path / "adapter_model.safetensors"), ["vllm", "peft"])
    assert [(v.engine, v.loads) for v in report.verdicts[0]] == [("vllm", False), ("peft", False)]
    assert report.failed


def test_read_base_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_BASE))
    assert read_base_config(tmp_path) == LLAMA_BASE
    assert read_base_config(tmp_path / "config.json") == LLAMA_BASE
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(InvalidOptionError, match=r"not a model's config\.json"):
        read_base_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(InvalidOptionError, match=r"not a model's config\.json"):
        read_base_config(tmp_path)


def test_lorax_layer_types_follow_the_base_model_class(tmp_path: Path) -> None:
    """With --base, the layer types are the base's model class's (GPT-2: c_attn; Mixtral:
    attention only); without it, Llama's."""
    gpt2 = write_adapter(tmp_path / "gpt2", lora_tensors("transformer.h.0.attn.c_attn"),
                         {"target_modules": ["c_attn"]})  # fmt: skip
    assert "lorax.layer_types" in _rules(gpt2, "lorax")
    assert _rules(gpt2, "lorax", {"model_type": "gpt2", "n_layer": 1}) == []
    mlp = write_adapter(tmp_path / "mlp", lora_tensors("model.layers.0.mlp.down_proj"),
                        {"target_modules": ["down_proj"]})  # fmt: skip
    assert _rules(mlp, "lorax", LLAMA_BASE) == []
    assert _rules(mlp, "lorax", {**LLAMA_BASE, "model_type": "mixtral"}) == ["lorax.layer_types"]


# --- where vLLM's behaviour changed between releases ----------------------------------------

#: case -> (tensors, config, base, {vLLM release: the rules that fire there})
RANGES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None,
                        dict[str, list[str]]]] = {
    "rslora": (lora_tensors(), {"use_rslora": True}, None,
               {"0.5": ["vllm.patterns"], "0.6": ["vllm.rslora"], "0.7": []}),
    "patterns": ({**lora_tensors(), **lora_tensors(V, r=2)},
                 {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}}, None,
                 {"0.4": ["vllm.patterns"], "0.31": ["vllm.patterns"], "0.32": []}),
    "embedding copy": (_embedding_copy(16), EMB_CONFIG, LLAMA_BASE,
                       {"0.4": ["vllm.tensors"], "0.11": ["vllm.tensors"], "0.12": []}),
    "dora": ({**lora_tensors(), f"{P}{Q}.lora_magnitude_vector": _vec(8)}, {"use_dora": True},
             None, {"0.5": ["vllm.tensors"], "0.6": ["vllm.dora"], "0.34": ["vllm.dora"]}),
    "score head": ({**lora_tensors(), f"{P}score.weight": np.zeros((2, 8), np.float32)},
                   {"modules_to_save": ["score"]}, None,
                   {"0.5": ["vllm.tensors"], "0.30": ["vllm.modules_to_save"], "0.31": []}),
    "lora_bias": ({**lora_tensors(), f"{P}{Q}.lora_B.bias": _vec(8)}, {"lora_bias": True},
                  None, {"0.5": ["vllm.tensors"], "0.10": ["vllm.bias"],
                         "0.11": ["vllm.tensors"], "0.32": ["vllm.features", "vllm.tensors"]}),
    "pissa": (lora_tensors(), {"init_lora_weights": "pissa"}, None,
              {"0.31": [], "0.32": ["vllm.features"]}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RANGES))
def test_vllm_rules_follow_the_release_ranges(tmp_path: Path, case: str) -> None:
    tensors, config, base, expected = RANGES[case]
    path = write_adapter(tmp_path / "a", tensors, config)
    found = {v: sorted(_rules(path, f"vllm@{v}", base)) for v in expected}
    assert found == expected


def test_vllm_bias_messages_name_the_release_behaviour(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", {**lora_tensors(), f"{P}{Q}.bias": _vec(8)},
                         {"bias": "lora_only"})  # fmt: skip
    (old,) = _verdict(path, "vllm@0.10").findings
    (new,) = _verdict(path, "vllm@0.11").findings
    assert "unless served with --enable-lora-bias" in old.message
    assert new.message == "does not support bias='lora_only'"
    assert (old.rule, new.rule) == ("vllm.bias", "vllm.bias")


def test_every_vllm_release_has_one_rule_of_each_ranged_id() -> None:
    """The ranges of one rule id do not overlap (no release gets two max_rank rules)."""
    table = TABLES["vllm"]
    for version in table.releases:
        ids = [r.id for r in table.rules_for(version)]
        assert len(ids) == len(set(ids)), (version, ids)


# --- the golden matrix: PEFT-made adapters x engines ------------------------------------------

QV = ["q_proj", "v_proj"]
MATRIX: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (tiny_llama overrides, LoraConfig kwargs)
    "plain r=8": ({}, {"r": 8, "lora_alpha": 16, "target_modules": QV}),
    "patterns": ({}, {"r": 8, "lora_alpha": 16, "target_modules": QV,
                      "rank_pattern": {"v_proj": 24}, "alpha_pattern": {"q_proj": 32}}),
    "rslora": ({}, {"r": 8, "lora_alpha": 16, "target_modules": QV, "use_rslora": True}),
    "dora": ({}, {"r": 8, "lora_alpha": 16, "target_modules": QV, "use_dora": True}),
    "modules_to_save": ({}, {"r": 8, "target_modules": QV, "modules_to_save": ["lm_head"]}),
    "bias": ({"attention_bias": True}, {"r": 8, "target_modules": QV, "bias": "lora_only"}),
    "lora_bias": ({}, {"r": 8, "target_modules": QV, "lora_bias": True}),
    "embeddings": ({}, {"r": 8, "target_modules": ["q_proj", "embed_tokens"]}),
    "lm_head": ({}, {"r": 8, "target_modules": ["q_proj", "lm_head"]}),
    "mlp (all linear)": ({}, {"r": 8, "target_modules": "all-linear"}),
    "one layer": ({}, {"r": 8, "target_modules": QV, "layers_to_transform": [0]}),
    "r=24": ({}, {"r": 24, "lora_alpha": 48, "target_modules": QV}),
    "r=64": ({}, {"r": 64, "lora_alpha": 128, "target_modules": QV}),
    "r=600": ({}, {"r": 600, "lora_alpha": 1200, "target_modules": QV}),
}  # fmt: skip
#: `vllm` is the newest release read; the older columns show where its rules changed
ENGINES = ["vllm", "vllm@0.31", "vllm@0.11", "vllm@0.5", "tgi", "lorax", "llama.cpp", "peft"]


def _cell(v: Verdict) -> str:
    return "same" if v.same_as_peft else ("differs" if v.loads else "refused")


@pytest.mark.slow
def test_golden_engine_matrix(tmp_path: Path, llama_base: Path, update_golden: bool) -> None:
    from tests.fixtures import peft_save, tiny_llama

    base = read_base_config(llama_base)
    rows: list[list[str]] = []
    notes: list[str] = []
    plain: dict[str, tuple[str, ...]] = {}  # each engine's needs for the plain adapter
    for name, (overrides, cfg) in MATRIX.items():
        path = peft_save(lambda o=overrides: tiny_llama(**o), tmp_path / str(len(rows)),
                         {"default": {"task_type": "CAUSAL_LM", **cfg}})  # fmt: skip
        verdicts = judge(inspect_adapter(path), ENGINES, base).verdicts[0]
        rows.append([name, *(_cell(v) for v in verdicts)])
        for spec, v in zip(ENGINES, verdicts, strict=True):
            plain.setdefault(spec, v.needs)
            rules = ", ".join(f.rule for f in v.findings)
            needs = "; ".join(v.needs) if v.needs != plain[spec] else ""
            if rules or needs:
                notes.append(
                    f"{name} / {spec}: {rules or '-'}" + (f" (needs {needs})" if needs else "")
                )
    width = [
        max(len(r[i]) for r in [["adapter", *ENGINES], *rows]) for i in range(len(ENGINES) + 1)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip()
             for r in [["adapter", *ENGINES], *rows]]  # fmt: skip
    text = "\n".join([*lines, "", *notes]) + "\n"
    golden = GOLDEN / "engines.txt"
    if update_golden:
        golden.write_text(text)
    assert text == golden.read_text()


def test_huge_layer_counts_are_counted_not_built(tmp_path: Path) -> None:
    """partial_types compares counts: a base's num_hidden_layers of 10**12, or a 9-digit layer
    index in the file, is judged at once (no set of that many layers)."""
    import time

    start = time.monotonic()
    base = {**LLAMA_BASE, "num_hidden_layers": 10**12}
    assert "tgi.partial_layers" in _rules(write_adapter(tmp_path / "a"), "tgi", base)
    far = Q.replace("layers.0", "layers.999999999")
    path = write_adapter(tmp_path / "b", {**lora_tensors(), **lora_tensors(far)})
    assert "tgi.partial_layers" in _rules(path, "tgi")
    assert time.monotonic() - start < 5


def test_a_layer_index_of_thousands_of_digits_is_no_layer_index(tmp_path: Path) -> None:
    """A 5000-digit index (beyond int()'s digit limit) is not read as a layer index: the
    adapter is judged, no ValueError; the module counts as outside the layers."""
    far = Q.replace("0", "1" * 5000, 1)
    path = write_adapter(tmp_path / "a", {**lora_tensors(), **lora_tensors(far)})
    (adapter,) = inspect_adapter(path).adapters
    facts = facts_of(adapter, None)
    assert facts is not None
    assert facts.layer_types() == {"q_proj": {0, None}}
    assert facts.num_layers() == 1
    assert "tgi.partial_layers" not in _rules(path, "tgi")


@pytest.mark.parametrize("archs", [[{}], [["LlamaForCausalLM"]], [None]])
def test_llama_cpp_architecture_of_a_hostile_base_is_none(archs: list[Any]) -> None:
    from adapterctl.ops.engines.llamacpp import architecture

    assert architecture({"architectures": archs}) is None
    assert architecture({"text_config": {"architectures": archs}}) is None
    assert architecture({"architectures": archs, "text_config": {"architectures": archs}}) is None
