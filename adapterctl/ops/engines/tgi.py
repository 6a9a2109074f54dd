"""TGI's rules: server/text_generation_server/adapters/lora.py@v3.3.7 (prepare_weights: the
scale from config.r/lora_alpha/use_rslora, torch.stack per layer type, `return None` for a type
missing in a layer), server/text_generation_server/models/__init__.py@v3.3.7 (adapter_layers;
the other weights only logged as "unused adapter weights")."""

from __future__ import annotations

from adapterctl.ops.engines.facts import (
    EngineTable,
    Rule,
    partial_types,
    patterns_ignored,
    resized,
    stacked_ranks,
    tensors_ignored,
    types_dropped,
)

TGI_LAYERS = frozenset(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
     "c_proj", "c_fc")
)  # fmt: skip

TGI = EngineTable(
    "tgi",
    ("3.3",),
    (
        Rule("tgi.ranks", "error", stacked_ranks(lambda r: r),
             "adapters/lora.py@v3.3.7 LoraWeights torch.stack"),
        Rule("tgi.patterns", "warning", patterns_ignored,
             "adapters/lora.py@v3.3.7 get_scaling_factor(config.lora_alpha, config.r)"),
        Rule("tgi.layer_types", "warning", types_dropped(TGI_LAYERS),
             "models/__init__.py@v3.3.7 adapter_layers"),
        Rule("tgi.partial_layers", "warning", partial_types(TGI_LAYERS),
             "adapters/lora.py@v3.3.7 prepare_weights returns None"),
        Rule("tgi.resized_embeddings", "warning", resized,
             "models/__init__.py@v3.3.7 reads only lora_A/lora_B (--base)"),
        Rule("tgi.tensors", "warning", tensors_ignored,
             "models/__init__.py@v3.3.7 unused adapter weights"),
    ),
)  # fmt: skip
