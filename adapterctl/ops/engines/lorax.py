"""LoRAX's rules: server/lorax_server/adapters/lora.py@0.4.0-23-ga7394ba (as TGI, which copied
it), server/lorax_server/utils/punica.py@the same (pad_rank: up to MIN_SGMV_RANK=8, else to a
multiple of SGMV_BLOCK_SIZE=16), server/lorax_server/models/flash_llama.py (ADAPTER_LAYERS)."""

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
        Rule("lorax.layer_types", "warning", types_dropped(LORAX_LAYERS),
             "models/flash_llama.py@0.4.0-23-ga7394ba ADAPTER_LAYERS"),
        Rule("lorax.partial_layers", "warning", partial_types(LORAX_LAYERS),
             "adapters/lora.py@0.4.0-23-ga7394ba load returns None"),
        Rule("lorax.resized_embeddings", "warning", resized,
             "models/model.py@0.4.0-23-ga7394ba reads only lora_A/lora_B (--base)"),
        Rule("lorax.tensors", "warning", tensors_ignored,
             "models/model.py@0.4.0-23-ga7394ba unused adapter weights"),
    ),
    _needs,
)  # fmt: skip
