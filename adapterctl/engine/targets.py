"""Which modules an adapter targets (docs/peft-format.md §4.4): PEFT's matching rules, on module
paths."""

from __future__ import annotations

from typing import Any

from adapterctl.errors import IncompatibleModelError
from adapterctl.format.config import LoraConfig
from adapterctl.format.newconfig import CONDENSE_FROM, condense
from adapterctl.format.patterns import layer_index, layers_pattern_regex, modules_to_save_regex

#: target_modules PEFT uses when a config leaves it null, by transformers model_type.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "t5": ["q", "v"],
}
SEQ_CLS_HEADS = ("classifier", "score")
ALL_LINEAR = "all-linear"


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    pattern = config.layers_pattern
    index = None
    if not pattern:
        index = layer_index(key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            regex = config.regex(layers_pattern_regex(p), "`layers_pattern`", source=p)
            match = regex.match(key)
            if match:
                index = int(match.group("idx"))
                break
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def is_excluded(config: LoraConfig, key: str) -> bool:
    """exclude_modules, and anything inside a modules_to_save module."""
    if config.in_exclude_modules(key):
        return True
    return any(
        config.regex(modules_to_save_regex(m), "`modules_to_save` entry", source=m).match(key)
        for m in config.modules_to_save or []
    )


def is_target(config: LoraConfig, key: str, target_modules: Any) -> bool:
    """Whether module path `key` is targeted (given the resolved target_modules)."""
    if is_excluded(config, key):
        return False
    if isinstance(target_modules, str):
        return config.regex(target_modules, "`target_modules`").fullmatch(key) is not None
    if key in target_modules:
        return True  # named in full: layers_to_transform is not consulted (as in PEFT)
    if not any(key.endswith("." + t) for t in target_modules):
        return False
    return _layer_index_ok(config, key)


def resolve_target_modules(config: LoraConfig, model: Any) -> Any:
    """target_modules with null and "all-linear" resolved the way PEFT resolves them."""
    from torch import nn

    from adapterctl.engine.layers import LoraLayer, is_conv1d

    tm = config.target_modules
    if tm is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise IncompatibleModelError(
                f"the adapter config has no `target_modules` and adapterctl knows no default for "
                f"model type {model_type!r}",
                hint="set `target_modules` in the config",
            )
        return list(DEFAULT_TARGETS[model_type])
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        names: set[str] = set()
        inside_wrappers: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                inside_wrappers.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
                if module.kind != "embedding":
                    names.add(name)
            elif isinstance(module, nn.Linear) or is_conv1d(module):
                names.add(name)
        excluded = set(inside_wrappers)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None:
            excluded.update(n for n, m in model.named_modules() if m is output)
        elif config.task_type == "SEQ_CLS":
            for head in SEQ_CLS_HEADS:
                module = getattr(model, head, None)
                if module is not None:
                    excluded.update(n for n, m in model.named_modules() if m is module)
                    break
        return sorted(names - excluded)
    return tm


def stored_target_modules(config: LoraConfig, module_names: list[str], resolved: Any) -> Any:
    """target_modules as PEFT keeps them after injecting: all-linear expanded, long lists condensed."""
    if not isinstance(resolved, list) or len(resolved) < CONDENSE_FROM:
        return resolved
    ends = tuple("." + t for t in resolved)
    others = [n for n in module_names if n and n not in resolved and not n.endswith(ends)]
    return condense(resolved, others)
