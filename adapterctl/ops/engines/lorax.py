"""LoRAX's rules: server/lorax_server/adapters/lora.py@0.4.0-23-ga7394ba (as TGI, which copied
it), server/lorax_server/utils/punica.py@the same (pad_rank: up to MIN_SGMV_RANK=8, else to a
multiple of SGMV_BLOCK_SIZE=16), server/lorax_server/models/*.py (each model class's
ADAPTER_LAYERS, `supports_adapter_loading`), models/__init__.py (get_model: model_type -> class),
models/model.py (load_adapter: "This model does not support adapter loading")."""

from __future__ import annotations

from adapterctl.ops.engines.facts import (
    EngineTable,
    Facts,
    Rule,
    partial_types,
    patterns_ignored,
    resized,
    stacked_ranks,
    tensors_ignored,
    types_dropped,
)

LORAX_LAYERS = frozenset(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
)
_DENSE = frozenset(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
#: base model_type -> the module types (last name component) its model class takes LoRA on,
#: from ADAPTER_LAYERS of models/flash_*.py, bloom.py, mllama.py (text) and flash_roberta.py
#: (adapter_layers); a model_type not here has no class with `supports_adapter_loading`.
LORAX_LAYERS_BY_MODEL_TYPE: dict[str, frozenset[str]] = {
    "llama": LORAX_LAYERS, "mistral": LORAX_LAYERS, "cohere": LORAX_LAYERS,
    "granite": LORAX_LAYERS, "qwen2": LORAX_LAYERS, "mllama": LORAX_LAYERS,
    "gemma": _DENSE, "gemma2": _DENSE, "solar": _DENSE,
    "mixtral": frozenset(("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi": frozenset(("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head")),
    "phi-msft": frozenset(("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head")),
    "phi3": frozenset(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "gpt2": frozenset(("c_attn", "c_proj", "c_fc")),
    "qwen": frozenset(("c_attn", "c_proj", "w1", "w2", "lm_head")),
    "dbrx": frozenset(("Wqkv", "out_proj", "lm_head")),
    "bloom": frozenset(("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "xlm-roberta": frozenset(("query", "key", "value")),
}  # fmt: skip


def _model_type(f: Facts) -> str | None:
    text = f.base_text()
    kind = (text or {}).get("model_type") or (f.base or {}).get("model_type")
    return kind if isinstance(kind, str) else None


def _layers(f: Facts) -> frozenset[str]:
    """The base's model class's layer types (--base), else Llama's."""
    return LORAX_LAYERS_BY_MODEL_TYPE.get(_model_type(f) or "llama", LORAX_LAYERS)


def _no_adapters(f: Facts) -> str | None:
    kind = _model_type(f)
    if kind is None or kind in LORAX_LAYERS_BY_MODEL_TYPE:
        return None
    return f"does not load adapters for model_type `{kind}` (no LoRA support in its model class)"


def lorax_padded_rank(r: int, world_size: int = 1) -> int:
    """LoRAX's SGMV rank: at least 8 (x world size), above that the next multiple of 16."""
    low = 8 * world_size
    return low if r <= low else -(-r // 16) * 16


def _needs(f: Facts, version: str) -> list[str]:
    padded = sorted({lorax_padded_rank(m.r) for m in f.lora if m.r is not None})
    ranks = sorted({m.r for m in f.lora if m.r is not None})
    if padded == ranks:
        return []
    return [f"rank padded to {', '.join(map(str, padded))} for SGMV (1 GPU; zeros, same delta)"]


LORAX = EngineTable(
    "lorax",
    ("0.4",),
    (
        Rule("lorax.ranks", "error", stacked_ranks(lorax_padded_rank),
             "adapters/lora.py@0.4.0-23-ga7394ba torch.stack after pad_rank"),
        Rule("lorax.patterns", "warning", patterns_ignored,
             "adapters/lora.py@0.4.0-23-ga7394ba get_scaling_factor(config.lora_alpha, config.r)"),
        Rule("lorax.architecture", "error", _no_adapters,
             "models/model.py@0.4.0-23-ga7394ba load_adapter, models/__init__.py get_model "
             "(--base)"),
        Rule("lorax.layer_types", "warning", lambda f: types_dropped(_layers(f))(f),
             "models/flash_*.py@0.4.0-23-ga7394ba ADAPTER_LAYERS (the base's model_type with "
             "--base, else Llama's)"),
        Rule("lorax.partial_layers", "warning", lambda f: partial_types(_layers(f))(f),
             "adapters/lora.py@0.4.0-23-ga7394ba load returns None"),
        Rule("lorax.resized_embeddings", "warning", resized,
             "models/model.py@0.4.0-23-ga7394ba reads only lora_A/lora_B (--base)"),
        Rule("lorax.tensors", "warning", tensors_ignored,
             "models/model.py@0.4.0-23-ga7394ba unused adapter weights"),
    ),
    _needs,
)  # fmt: skip
