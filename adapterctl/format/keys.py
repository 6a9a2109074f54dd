"""Stored tensor keys <-> module paths <-> kinds (docs/peft-format.md §2): the one place for
them.

A stored key is `base_model.model.` + module path + suffix. The adapter name never appears in a
stored key; in memory PEFT inserts it before the last component (`lora_A.default.weight`) or appends
it (ParameterDict entries such as `lora_embedding_A.default`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "base_model.model."

# kind -> stored suffix after the module path
LORA_SUFFIXES: dict[str, str] = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_B.bias": "lora_B.bias",
    "lora_embedding_A": "lora_embedding_A",
    "lora_embedding_B": "lora_embedding_B",
    "lora_magnitude_vector": "lora_magnitude_vector",
}
_SUFFIX_TO_KIND = {v: k for k, v in LORA_SUFFIXES.items()}
TOKENS_SUFFIX = "token_adapter.trainable_tokens_delta"

#: Kinds of full tensors (not LoRA factors) that an adapter file may carry.
FULL_KINDS = ("bias", "modules_to_save", "embedding", "base_layer")
#: Module names PEFT treats as embeddings when deciding what to save (save_embedding_layers).
EMBEDDING_NAMES = ("embed_tokens", "lm_head")
#: The vocabulary-sized input embeddings of transformers models, by module name (what
#: get_input_embeddings returns): the one list every command reads.
TOKEN_EMBEDDINGS = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in", "shared"})
#: The output layers that map to the vocabulary (get_output_embeddings).
OUTPUT_HEADS = frozenset({"lm_head", "embed_out"})
_KNOWN_EMBEDDING_MODULES = TOKEN_EMBEDDINGS | OUTPUT_HEADS


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a stored key means.

    kind: one of LORA_SUFFIXES' keys, "trainable_tokens_delta", a FULL_KINDS entry, or "unknown".
    module: the module path inside the wrapped model, `.base_layer` wrappers removed.
    param: for full tensors, the parameter name (`weight`, `bias`); else "".
    depth: how many `.base_layer` wrappers the key names (nested target_parameters wrappers).
    prefixed: whether the key starts with `base_model.model.` (PEFT ignores keys that do not).
    """

    key: str
    kind: str
    module: str
    param: str = ""
    depth: int = 0
    prefixed: bool = True

    @property
    def is_lora(self) -> bool:
        return self.kind in LORA_SUFFIXES

    @property
    def base_key(self) -> str:
        """For full tensors: the base model's own key (no prefix, no `.base_layer`)."""
        return f"{self.module}.{self.param}" if self.param else self.module


def _strip_base_layers(path: str) -> tuple[str, int]:
    if "base_layer" not in path:
        return path, 0
    parts = path.split(".")
    kept = [p for p in parts if p != "base_layer"]
    return ".".join(kept), len(parts) - len(kept)


def module_matches(name: str, module: str) -> bool:
    """PEFT's rule for `modules_to_save` names: the module, or one of its ancestors, has a path that
    ends with `name` (a plain string suffix, as PEFT matches: "layernorm" saves `input_layernorm`)."""
    parts = module.split(".")
    return any(".".join(parts[:i]).endswith(name) for i in range(1, len(parts) + 1))


def classify(key: str, modules_to_save: Iterable[str] = ()) -> KeyInfo:
    """Classify one stored key. `modules_to_save` comes from the adapter's config."""
    prefixed = key.startswith(PREFIX)
    rest = key[len(PREFIX) :] if prefixed else key
    idx = rest.rfind(".lora_")
    if idx > 0:
        suffix = rest[idx + 1 :]
        kind = _SUFFIX_TO_KIND.get(suffix)
        if kind is not None:
            module, depth = _strip_base_layers(rest[:idx])
            # one string for a module's A and B (and the rest): 100k keys, half the copies
            return KeyInfo(key, kind, sys.intern(module), depth=depth, prefixed=prefixed)
    if rest.endswith("." + TOKENS_SUFFIX):
        module = rest[: -len(TOKENS_SUFFIX) - 1]
        return KeyInfo(key, "trainable_tokens_delta", module, prefixed=prefixed)
    path, depth = _strip_base_layers(rest)
    module, _, param = path.rpartition(".")
    if not module or ".lora_" in rest:
        return KeyInfo(key, "unknown", path, prefixed=prefixed)
    if any(module_matches(name, module) for name in modules_to_save):
        kind = "modules_to_save"
    elif param == "bias":
        kind = "bias"
    elif module.rsplit(".", 1)[-1] in _KNOWN_EMBEDDING_MODULES and param == "weight":
        kind = "embedding"
    elif depth:
        kind = "base_layer"
    else:
        kind = "unknown"
    return KeyInfo(key, kind, module, param, depth, prefixed)


def stored_key(module: str, kind: str, *, depth: int = 0) -> str:
    """The stored key for a LoRA tensor (or trainable-token delta) of `module`."""
    path = module + ".base_layer" * depth
    if kind == "trainable_tokens_delta":
        return f"{PREFIX}{path}.{TOKENS_SUFFIX}"
    return f"{PREFIX}{path}.{LORA_SUFFIXES[kind]}"


def to_memory_key(stored: str, adapter_name: str) -> str:
    """Insert the adapter name as PEFT does in memory (LoRA tensors and token deltas only)."""
    info = classify(stored)
    if info.kind in ("lora_embedding_A", "lora_embedding_B", "trainable_tokens_delta"):
        return f"{stored}.{adapter_name}"
    if info.kind == "lora_magnitude_vector":
        return f"{stored}.{adapter_name}.weight"
    if info.is_lora:
        head, _, last = stored.rpartition(".")
        return f"{head}.{adapter_name}.{last}"
    raise ValueError(f"`{stored}` is not an adapter-owned key")


def to_stored_key(memory: str, adapter_name: str) -> str:
    """Remove the adapter name from an in-memory key (docs/peft-format.md §2.3)."""
    tag = "." + adapter_name
    msave = f".modules_to_save{tag}."
    if msave in memory:
        return memory.replace(msave, ".", 1)
    if memory.endswith(f".lora_magnitude_vector{tag}.weight"):
        return memory[: -len(f"{tag}.weight")]
    if memory.endswith(tag):
        return memory[: -len(tag)]
    head, _, last = memory.rpartition(".")
    if head.endswith(tag):
        return f"{head[: -len(tag)]}.{last}"
    return memory
