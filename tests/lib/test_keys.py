"""The key rules (docs/peft-format.md §2) against PEFT's own in-memory and stored key names."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from adapterctl.format.keys import classify, stored_key, to_memory_key, to_stored_key
from adapterctl.format.tensors import SafetensorsReader
from tests.fixtures import CASES

P = "base_model.model."


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["llama_dora_patterns", "llama_embed", "llama_bias", "gpt2_conv1d", "multi"]
)
def test_memory_and_stored_keys_match_peft(peft_adapters: dict[str, Path], case: str) -> None:
    from peft import PeftModel

    model_fn, configs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_fn(), str(peft_adapters[case]))
    memory = set(model.state_dict())
    with SafetensorsReader(peft_adapters[case] / "adapter_model.safetensors") as f:
        stored = list(f.tensors)
    mts = configs["default"].get("modules_to_save") or []
    if configs["default"].get("task_type") == "SEQ_CLS":
        mts = [*mts, "classifier", "score"]
    for key in stored:
        info = classify(key, mts)
        assert info.prefixed
        if info.is_lora:
            mem = to_memory_key(key, "default")
            assert mem in memory, mem
            assert to_stored_key(mem, "default") == key
            assert stored_key(info.module, info.kind, depth=info.depth) == key
        elif info.kind == "modules_to_save":
            mem = f"{P}{info.module}.modules_to_save.default.{info.param}"
            assert mem in memory, mem
            assert to_stored_key(mem, "default") == key
        else:
            assert info.kind in ("bias", "embedding"), key
            assert key in memory  # full tensors load straight into the base model's own keys


@pytest.mark.parametrize(
    ("key", "kind", "module", "depth"),
    [
        (
            f"{P}model.layers.0.self_attn.q_proj.lora_A.weight",
            "lora_A",
            "model.layers.0.self_attn.q_proj",
            0,
        ),
        (f"{P}lm_head.lora_B.weight", "lora_B", "lm_head", 0),
        (f"{P}m.q.lora_B.bias", "lora_B.bias", "m.q", 0),
        (f"{P}model.embed_tokens.lora_embedding_A", "lora_embedding_A", "model.embed_tokens", 0),
        (f"{P}m.v.lora_magnitude_vector", "lora_magnitude_vector", "m.v", 0),
        (f"{P}m.experts.base_layer.lora_A.weight", "lora_A", "m.experts", 1),
        (
            f"{P}model.embed_tokens.token_adapter.trainable_tokens_delta",
            "trainable_tokens_delta",
            "model.embed_tokens",
            0,
        ),
        (f"{P}model.embed_tokens.base_layer.weight", "embedding", "model.embed_tokens", 1),
        (f"{P}transformer.wte.weight", "embedding", "transformer.wte", 0),
        (f"{P}m.q.base_layer.bias", "bias", "m.q", 1),
        (f"{P}transformer.h.0.ln_1.bias", "bias", "transformer.h.0.ln_1", 0),
        (f"{P}model.norm.weight", "unknown", "model.norm", 0),
        (f"{P}m.lora_C.weight", "unknown", "m.lora_C.weight", 0),
    ],
)
def test_classify(key: str, kind: str, module: str, depth: int) -> None:
    info = classify(key)
    assert (info.kind, info.module, info.depth) == (kind, module, depth)


def test_adapter_named_like_a_module_segment() -> None:
    # docs/peft-format.md §2.3: only the segment before the last component is the adapter's
    mem = f"{P}model.layers.0.self_attn.q_proj.lora_A.self_attn.weight"
    assert to_stored_key(mem, "self_attn") == f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"
    assert to_memory_key(f"{P}model.layers.0.self_attn.q_proj.lora_A.weight", "self_attn") == mem


def test_modules_to_save_classification() -> None:
    info = classify(f"{P}classifier.dense.weight", ["classifier"])
    assert (info.kind, info.module, info.param) == ("modules_to_save", "classifier.dense", "weight")
    assert (
        to_stored_key(f"{P}score.modules_to_save.default.weight", "default") == f"{P}score.weight"
    )
