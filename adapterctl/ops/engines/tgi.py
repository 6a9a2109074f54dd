"""TGI's rules: server/text_generation_server/adapters/lora.py@v3.3.7 (prepare_weights: the
scale from config.r/lora_alpha/use_rslora, torch.stack per layer type, `return None` for a type
missing in a layer), server/text_generation_server/models/__init__.py@v3.3.7 (adapter_layers;
the other weights only logged as "unused adapter weights"),
server/text_generation_server/utils/adapter.py@v3.3.7 (build_layer_weight_lookup: the adapter's
module must be `model.layers.N.self_attn.{q,k,v,qkv,o}_proj` or `model.layers.N.mlp.{gate,up,
down}_proj`/`c_fc`/`c_proj`, the same names for every architecture; a GPT-2 `transformer.h.N`
module or a VLM's `model.language_model.layers.N` matches none)."""

from __future__ import annotations

import re

from adapterctl.ops.engines.facts import (
    EngineTable,
    Facts,
    Rule,
    partial_types,
    patterns_ignored,
    resized,
    some,
    stacked_ranks,
    tensors_ignored,
    types_dropped,
)

TGI_LAYERS = frozenset(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
     "c_proj", "c_fc")
)  # fmt: skip

#: utils/adapter.py get_attn_weights/get_mlp_weights: the module names TGI looks up
_PATH = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q|k|v|qkv|o)_proj|mlp\.((gate|up|down)_proj|c_fc|c_proj))"
)


def _paths(f: Facts) -> str | None:
    """A module of a supported type under another path (GPT-2's `transformer.h.0.mlp.c_fc`) is
    never looked up: dropped like an unsupported type."""
    odd = [
        m.path
        for m in f.lora
        if m.path.rsplit(".", 1)[-1] in TGI_LAYERS and not _PATH.fullmatch(m.path)
    ]
    if not odd:
        return None
    return (
        f"looks LoRA modules up as `model.layers.N.self_attn.*`/`model.layers.N.mlp.*` only: "
        f"{len(odd)} module(s) elsewhere are dropped ({some(odd)})"
    )


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
        Rule("tgi.module_paths", "warning", _paths,
             "utils/adapter.py@v3.3.7 build_layer_weight_lookup"),
        Rule("tgi.partial_layers", "warning", partial_types(TGI_LAYERS),
             "adapters/lora.py@v3.3.7 prepare_weights returns None"),
        Rule("tgi.resized_embeddings", "warning", resized,
             "models/__init__.py@v3.3.7 reads only lora_A/lora_B (--base)"),
        Rule("tgi.tensors", "warning", tensors_ignored,
             "models/__init__.py@v3.3.7 unused adapter weights"),
    ),
)  # fmt: skip
