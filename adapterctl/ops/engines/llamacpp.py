"""llama.cpp's rules, read from llama.cpp 0c1e570 (the commit llama-cpp-python 0.3.36 vendors)
and checked against its converter run on PEFT-made adapters (tests/lib/test_llamacpp_oracle.py):

- `convert_lora_to_gguf.py` `get_tensors`: only lora_A/B and lora_embedding_A/B, `.base_layer.`
  `weight` skipped, `_layernorm`/`.norm` full tensors kept, anything else `sys.exit(1)`;
  `modify_tensors`: lm_head raises where the model class drops it (llama.cpp#9065); one
  `lora_alpha` written to the GGUF (`adapter.lora.alpha`);
- `conversion/base.py` `get_model_architecture` and `conversion/__init__.py` `TEXT_MODEL_MAP`
  (`llamacpp_architectures.py`): the base's architecture must map to a model class;
- `src/llama-adapter.h` `get_scale`: alpha / the tensor's own rank (`b->ne[0]`); use_rslora is
  never read; `src/llama-adapter.cpp` refuses a LoRA tensor the base model does not have
  ("does not exist in base model"), e.g. `output.weight` of a tied Llama
  (`src/models/llama.cpp`: `output` is then `token_embd`, TENSOR_DUPLICATED).
"""

from __future__ import annotations

from typing import Any

from adapterctl.ops.engines.facts import (
    EngineTable,
    Facts,
    Rule,
    close,
    resized,
    some,
)
from adapterctl.ops.engines.llamacpp_architectures import LLAMACPP_ARCHITECTURES

COMMIT = "0c1e570"
#: get_model_architecture: these top-level architectures win over text_config's
_TOP_LEVEL = frozenset(
    ("StepVLForConditionalGeneration", "Sarashina2VisionForCausalLM",
     "Exaone4_5_ForConditionalGeneration", "Step3p7ForConditionalGeneration",
     "KimiK3ForConditionalGeneration")
)  # fmt: skip


def architecture(base: dict[str, Any]) -> str | None:
    """The architecture name the converter looks up for a base's config.json (None: none)."""
    arch = None
    archs = base.get("architectures")
    if isinstance(archs, list) and archs:
        arch = archs[0]
    elif isinstance(base.get("ssm_cfg"), dict):
        arch = str(base["ssm_cfg"].get("layer", "Mamba")) + "ForCausalLM"
    if isinstance(arch, str) and arch in _TOP_LEVEL:
        return str(arch)
    text = base.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("architectures"), list):
        arch = text["architectures"][0] if text["architectures"] else None
    return arch if isinstance(arch, str) else None


def _tensors(f: Facts) -> str | None:
    bad = [
        n
        for n, _ in f.extra_tensors()
        if ".base_layer.weight" not in n and "_layernorm" not in n and ".norm" not in n
    ]
    if not bad:
        return None
    full = [n for n in bad if ".embed_tokens.weight" in n or ".lm_head.weight" in n]
    why = " (full embedding copies, from new tokens)" if full else ""
    return f"the converter refuses tensors other than lora_A/lora_B{why}: {some(bad)}"


def _tied(f: Facts) -> str | None:
    text = f.base_text()
    if text is None or f.base is None or not any(m.path.endswith("lm_head") for m in f.lora):
        return None
    if not text.get("tie_word_embeddings", f.base.get("tie_word_embeddings", True)):
        return None
    return (
        "the base ties lm_head to the embeddings: llama.cpp refuses the LoRA on lm_head "
        "(`output.weight` does not exist in the tied model; some converters refuse it already)"
    )


def _architecture(f: Facts) -> str | None:
    if f.base is None:
        return None
    arch = architecture(f.base)
    if arch is None:
        return "the base's config.json names no `architectures`: the converter cannot map it"
    if arch in LLAMACPP_ARCHITECTURES:
        return None
    return f"the converter has no model class for the base's architecture `{arch}`"


def _scale(f: Facts) -> str | None:
    """Per tensor: lora_alpha / its own rank (alpha_pattern and use_rslora never read)."""
    alpha = float(f.config.lora_alpha)
    wrong = [
        m.path
        for m in f.lora
        if m.r and m.scaling is not None and not close(alpha / m.r, m.scaling)
    ]
    if not wrong:
        return None
    why = "ignores use_rslora" if f.config.use_rslora else "ignores alpha_pattern"
    return (
        f"scales each tensor by lora_alpha / its rank and {why}: {len(wrong)} module(s) get "
        f"another scale than PEFT's ({some(wrong)})"
    )


_CONV = f"convert_lora_to_gguf.py@{COMMIT}"
LLAMACPP = EngineTable(
    "llama.cpp",
    (COMMIT,),
    (
        Rule("llama.cpp.tensors", "error", _tensors, f"{_CONV} get_tensors"),
        Rule("llama.cpp.tied_lm_head", "error", _tied,
             f"src/llama-adapter.cpp@{COMMIT} (does not exist in base model), "
             f"src/models/llama.cpp (output TENSOR_DUPLICATED); {_CONV} modify_tensors "
             "(llama.cpp#9065)"),
        Rule("llama.cpp.architecture", "error", _architecture,
             f"conversion/__init__.py@{COMMIT} TEXT_MODEL_MAP, conversion/base.py "
             "get_model_architecture"),
        Rule("llama.cpp.resized_embeddings", "warning", resized,
             f"{_CONV} skips `.base_layer.weight` (--base)"),
        Rule("llama.cpp.scale", "warning", _scale,
             f"src/llama-adapter.h@{COMMIT} llama_adapter_lora_weight::get_scale"),
    ),
    lambda f, v: ["convert_lora_to_gguf.py --base BASE_DIR, then --lora ADAPTER.gguf"],
)  # fmt: skip
