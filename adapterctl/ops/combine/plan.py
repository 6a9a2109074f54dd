"""What a combine writes, decided before a byte is: the options checked, the sources' modules
lined up (which sources take part in each module, its output rank and shapes), the refusals
(unequal ranks for the factor-wise methods, sources made for different bases, modules_to_save in
several sources) and the output config (scale 1 everywhere: r = alpha per module)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from adapterctl.errors import ConversionError, IncompatibleModelError, InvalidOptionError
from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import DTYPES, Dtype
from adapterctl.format.keys import stored_key
from adapterctl.ops.combine.methods import METHODS, SIGN_METHODS
from adapterctl.ops.combine.sources import Source, SourceModule
from adapterctl.ops.convert import reduced_config

log = logging.getLogger(__name__)

#: methods that combine each side (the A's, the B's) on its own: PEFT needs equal ranks
FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: fields that say which modules a config targets: the output names its modules itself
_TARGETING = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")


@dataclass(frozen=True)
class Options:
    method: str
    weights: tuple[float, ...]
    density: float | None
    sign_method: str
    rank: int | None
    seed: int


def check_options(
    method: str,
    weights: Sequence[float],
    sources: int,
    density: float | None,
    sign_method: str,
    rank: int | None,
    seed: int,
) -> Options:
    """The options alone, before any source is read: usage errors."""
    if method not in METHODS:
        raise InvalidOptionError(
            f"unknown method {method!r}", hint=f"use one of {', '.join(METHODS)}"
        )
    if sources < 1:
        raise InvalidOptionError("no source to combine", hint="pass SOURCE [SOURCE ...] OUTPUT")
    if len(weights) != sources:
        raise InvalidOptionError(
            f"{len(weights)} weight{'s' if len(weights) != 1 else ''} for {sources} source"
            f"{'s' if sources != 1 else ''}",
            hint="pass one weight per SOURCE, in order, e.g. --weights "
            + ",".join(["1"] * sources),
        )
    if not all(math.isfinite(w) for w in weights):
        raise InvalidOptionError("the weights must be finite numbers")
    needs_density, uses_sign = METHODS[method]
    if needs_density and density is None:
        raise InvalidOptionError(
            f"--method {method} needs --density", hint="the fraction of values kept, e.g. 0.5"
        )
    if density is not None and not needs_density:
        raise InvalidOptionError(f"--density does nothing with --method {method}")
    if density is not None and not (0.0 < density <= 1.0):
        raise InvalidOptionError(
            f"--density must be a fraction in (0, 1], not {density}", hint="e.g. --density 0.5"
        )
    if sign_method not in SIGN_METHODS:
        raise InvalidOptionError(
            f"unknown majority sign method {sign_method!r}", hint="use total or frequency"
        )
    if sign_method != "total" and not uses_sign:
        raise InvalidOptionError(f"--majority-sign-method does nothing with --method {method}")
    if rank is not None and not method.endswith("svd"):
        raise InvalidOptionError(
            f"--rank does nothing with --method {method}",
            hint="the svd methods cut to --rank; cat adds the ranks up",
        )
    if rank is not None and rank < 1:
        raise InvalidOptionError(f"--rank must be at least 1, not {rank}")
    if seed < 0:
        raise InvalidOptionError(f"--seed must be 0 or more, not {seed}")
    return Options(method, tuple(float(w) for w in weights), density, sign_method, rank, seed)


@dataclass(frozen=True)
class Part:
    """One source's share in a module: its index among the sources, its factors, its weight."""

    index: int
    module: SourceModule
    weight: float


@dataclass(frozen=True)
class ModulePlan:
    module: str
    kind: str  # "linear" | "embedding"
    parts: tuple[Part, ...]
    rank: int  # of the output
    d_out: int
    d_in: int

    @property
    def keys(self) -> tuple[str, str]:
        """The output's stored keys of A and B."""
        a, b = (
            ("lora_embedding_A", "lora_embedding_B")
            if self.kind == "embedding"
            else ("lora_A", "lora_B")
        )
        return stored_key(self.module, a), stored_key(self.module, b)


class Plan:
    def __init__(self, sources: list[Source], options: Options) -> None:
        self.sources = sources
        self.options = options
        self.warnings: list[str] = []
        # PEFT combines a single adapter linearly whatever the method (its pruning included):
        # model.py, _check_add_weighted_adapter; cat and svd keep their own meaning
        self.method = options.method
        if len(sources) == 1 and self.method not in ("cat", "linear", "svd"):
            self.method = "linear"
            self.warnings.append(
                f"one source: combined linearly, as PEFT's add_weighted_adapter does "
                f"(--method {options.method} needs two sources or more)"
            )
        self._check_sources()
        # PEFT's default: the largest r or rank_pattern value of any source's config
        # (model.py, _check_add_weighted_adapter: max(adapter_ranks) with rank_pattern values)
        self.svd_rank = options.rank or max(
            max([int(s.config.r or 1), *(int(v) for v in (s.config.rank_pattern or {}).values())])
            for s in sources
        )
        self.modules = [self._module(name) for name in self._names()]
        self.carried = self._carried()
        self.base_copies = self._base_copies()
        self.dtype = self._dtype()
        self.config = self._config()
        for message in self.warnings:
            log.warning("%s", message)

    def _check_sources(self) -> None:
        first = self.sources[0]
        for s in self.sources[1:]:
            if bool(s.config.fan_in_fan_out) != bool(first.config.fan_in_fan_out):
                raise IncompatibleModelError(
                    f"`{first.label}` and `{s.label}` differ in `fan_in_fan_out`: they were made "
                    "for different base models",
                    hint="combine adapters of one base model",
                )
        bases = {s.config.base_model_name_or_path for s in self.sources} - {None}
        if len(bases) > 1:
            self.warnings.append(
                "the sources name different base models ("
                + ", ".join(f"`{b}`" for b in sorted(bases))
                + "); the output's config and card name none"
            )

    def _names(self) -> list[str]:
        return sorted({name for s in self.sources for name in s.modules})

    def _module(self, name: str) -> ModulePlan:
        weights = self.options.weights
        parts = tuple(
            Part(i, s.modules[name], weights[i])
            for i, s in enumerate(self.sources)
            if name in s.modules
        )
        first = parts[0].module
        d_out, d_in = first.b_shape[0], first.a_shape[1]
        for p in parts[1:]:
            m = p.module
            if (m.kind, m.b_shape[0], m.a_shape[1]) != (first.kind, d_out, d_in):
                raise IncompatibleModelError(
                    f"`{name}` is {_described(first)} in `{self.sources[parts[0].index].label}` "
                    f"but {_described(m)} in `{self.sources[p.index].label}`: the sources were "
                    "made for different base models",
                    hint="combine adapters of one base model",
                )
        ranks = [p.module.rank for p in parts]
        if self.method in FACTORWISE and len(set(ranks)) > 1:
            listed = ", ".join(f"{p.module.rank} in `{self.sources[p.index].label}`" for p in parts)
            raise ConversionError(
                f"--method {self.method} combines the A's and the B's separately, so every "
                f"source needs the same rank, but `{name}` has rank {listed}",
                hint="use --method cat (exact) or svd, which take any ranks",
            )
        if self.method == "cat":
            rank = sum(ranks)
        elif self.method.endswith("svd"):
            rank = self.svd_rank
        else:
            rank = ranks[0]
        return ModulePlan(name, first.kind, parts, rank, d_out, d_in)

    def _carried(self) -> Source | None:
        holding = [s for s in self.sources if s.saved]
        if len(holding) > 1:
            raise ConversionError(
                "modules_to_save (full trained copies of modules) are in "
                + " and ".join(f"`{s.label}`" for s in holding)
                + ": two full copies of a module cannot be combined",
                hint="remove them from all sources but one",
            )
        if not holding:
            return None
        s = holding[0]
        self.warnings.append(
            f"the modules_to_save of `{s.label}` ({', '.join(s.config.modules_to_save or [])}) "
            "are carried over as they are: only that source has them"
        )
        return s

    def _base_copies(self) -> dict[str, Source]:
        """Saved copies of base weights (`save_embedding_layers`) -> the source whose copy is
        written: the same bytes in every source that has one (the base's own weight, or one
        resized embedding), else refused."""
        out: dict[str, Source] = {}
        for s in self.sources:
            for key in s.base_copies:
                if key not in out:
                    out[key] = s
                elif bytes(out[key].store.get(key).buffer()) != bytes(s.store.get(key).buffer()):
                    raise ConversionError(
                        f"`{key}` differs between `{out[key].label}` and `{s.label}`: they saved "
                        "different copies of a base weight (a resized or trained embedding), "
                        "which cannot be combined",
                        hint="combine adapters saved on the same base weights",
                    )
        if out:
            self.warnings.append(
                f"{len(out)} saved copies of base weights (PEFT's save_embedding_layers: "
                f"{', '.join(sorted(out))}) are carried over as they are"
            )
        return out

    def _dtype(self) -> Dtype:
        codes = {d.code for s in self.sources for m in s.modules.values() for d in m.dtypes}
        return DTYPES[codes.pop()] if len(codes) == 1 else DTYPES["F32"]

    def _target_modules(self) -> list[str]:
        """The sources' own target_modules where they are plain lists (their union targets
        exactly the modules combined), else every combined module by its full name."""
        configs = [s.config for s in self.sources]
        lists = all(isinstance(c.target_modules, list) for c in configs)
        if lists and not any(getattr(c, f) for c in configs for f in _TARGETING):
            return sorted({t for c in configs for t in c.target_modules})
        return [m.module for m in self.modules]

    def _config(self) -> LoraConfig:
        first = self.sources[0].config
        saved = self.carried.config.modules_to_save if self.carried is not None else None
        bases = {s.config.base_model_name_or_path for s in self.sources} - {None}
        config = first.replace(
            base_model_name_or_path=bases.pop() if len(bases) == 1 else None,
            target_modules=self._target_modules(),
            modules_to_save=saved,
            **dict.fromkeys(_TARGETING),
        )
        return reduced_config(config, {m.module: m.rank for m in self.modules})


def _described(m: SourceModule) -> str:
    what = "an Embedding LoRA" if m.kind == "embedding" else "a LoRA"
    return f"{what} of shape {m.b_shape[0]} x {m.a_shape[1]}"
