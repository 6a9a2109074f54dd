"""A config in which modules the adapter saved whole (modules_to_save copies, trainable tokens)
become LoRA targets of scaling 1: `--embeddings-to-lora` (ops/convert/embeddings.py) writes the
config that goes with its new factors here. Each module joins `target_modules` under its full
path (PEFT targets an exact name whatever `layers_to_transform` says; a regex gains it as an
alternative) with r = its rank and alpha = r (alpha = sqrt(r) with rslora) through anchored
rank/alpha patterns placed first; every other module keeps its rank and scaling.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from adapterctl.errors import ConversionError
from adapterctl.format.config import LoraConfig, reload_drift
from adapterctl.format.keys import classify


def targeted_config(
    config: LoraConfig,
    ranks: Mapping[str, int],
    copied: set[str],
    keys: Iterable[str],
    *,
    tokens: bool,
) -> LoraConfig:
    """`config` with each module of `ranks` a LoRA target (its full path) of that rank and
    scaling 1 (anchored rank/alpha patterns, tried first); the `copied` ones out of
    modules_to_save (`keys`: the adapter's tensors, whose copies each entry saves); `tokens`:
    trainable_token_indices dropped."""
    converted = set(ranks)
    kept_mts = []
    for name in config.modules_to_save or []:
        hits = {
            info.module
            for info in (classify(k, [name]) for k in keys)
            if info.kind == "modules_to_save"
        }
        if hits and hits <= copied:
            continue
        if hits & copied:
            raise ConversionError(
                f"modules_to_save entry {name!r} saves {', '.join(sorted(hits))}: converting "
                f"{', '.join(sorted(hits & copied))} alone would leave the entry half true",
                hint="convert the adapter without this option",
            )
        kept_mts.append(name)
    changes: dict[str, Any] = {
        "target_modules": _targets(config, sorted(converted)),
        "modules_to_save": kept_mts or None,
    }
    if tokens:
        changes["trainable_token_indices"] = None
    _refuse_excluded(config, converted)
    out = config.replace(**changes)
    rank_pattern, alpha_pattern = {}, {}
    for module, k in sorted(ranks.items()):
        # scaling alpha/r, or alpha/sqrt(r) with rslora: 1 either way
        alpha = math.sqrt(k) if config.use_rslora else float(k)
        if out.rank_for(module) != k or out.scaling(out.alpha_for(module), k) != 1:
            key = "^" + re.escape(module)
            rank_pattern[key], alpha_pattern[key] = k, (alpha if alpha % 1 else int(alpha))
    if rank_pattern:
        out = out.replace(
            rank_pattern={**rank_pattern, **(config.rank_pattern or {})},
            alpha_pattern={**alpha_pattern, **(config.alpha_pattern or {})},
        )
    wrong = [
        module
        for module, k in ranks.items()
        if out.rank_for(module) != k or out.scaling(out.alpha_for(module), k) != 1
    ]
    drift = reload_drift(out, sorted(converted))
    if wrong or drift:
        raise ConversionError(
            "the config's rank_pattern/alpha_pattern keys also match "
            f"{', '.join(wrong) or drift[0]}: the new modules' ranks cannot be written",
            hint="convert the adapter without this option",
        )
    return out


def _targets(config: LoraConfig, paths: list[str]) -> Any:
    tm = config.target_modules
    if tm is None:
        if config.target_parameters is None:
            raise ConversionError(
                "the config names no target_modules (PEFT picks its defaults for the model "
                "type): the converted modules cannot be added to them",
                hint="write the adapter's target_modules into its config first",
            )
        return paths
    if isinstance(tm, str):
        if tm == "all-linear":
            raise ConversionError(
                'target_modules is "all-linear": the converted modules cannot be added to it',
                hint="write the adapter's targets as a list first",
            )
        return f"(?:{tm})|" + "|".join(re.escape(p) for p in paths)
    return sorted(set(tm) | set(paths))


def _refuse_excluded(config: LoraConfig, modules: set[str]) -> None:
    for module in sorted(modules):
        if config.in_exclude_modules(module):
            raise ConversionError(
                f"exclude_modules excludes `{module}`: it cannot become a LoRA target",
                hint="remove it from exclude_modules first",
            )
