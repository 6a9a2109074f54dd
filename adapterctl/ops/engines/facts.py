"""What the engine rules look at (`Facts`), what a rule and a table are, and the predicates that
several engines share (each engine's module says which of them its tables use)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterctl.format.config import LoraConfig
from adapterctl.format.keys import KeyInfo
from adapterctl.ops.checks import ModuleEntry, TensorEntry

#: the factor kinds every engine reads; anything else is a full tensor, a bias, a magnitude...
FACTOR_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
#: a layer index of up to 9 digits (a longer one, from an untrusted file, is no layer index)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d{1,9})\.")


@dataclass(frozen=True)
class Facts:
    """One adapter as the rules see it (built from an `inspect` report)."""

    config: LoraConfig
    tensors: tuple[TensorEntry, ...]
    kinds: tuple[tuple[str, str, KeyInfo], ...]  # per tensor: (module path, kind, key info)
    modules: tuple[ModuleEntry, ...]
    base: dict[str, Any] | None = None  # the base's config.json, with --base

    @property
    def lora(self) -> list[ModuleEntry]:
        """The modules with LoRA factors (rank known)."""
        return [m for m in self.modules if m.r is not None]

    def max_rank(self) -> int:
        ranks = [m.r for m in self.lora if m.r is not None]
        return max(ranks, default=int(self.config.r or 0))

    def extra_tensors(self, allowed: Sequence[str] = FACTOR_KINDS) -> list[tuple[str, str]]:
        """(tensor name, kind) of every tensor whose kind is not in `allowed`."""
        return [
            (t.name, k)
            for t, (_, k, _) in zip(self.tensors, self.kinds, strict=True)
            if k not in allowed
        ]

    def global_scaling(self, *, rslora: bool = True) -> float:
        """One scale per adapter, as the serving engines take it: from the global r/lora_alpha
        (`rslora=False`: alpha / r whatever use_rslora says)."""
        c = self.config
        if not rslora:
            return float(c.lora_alpha) / int(c.r)
        return float(c.scaling(float(c.lora_alpha), int(c.r)))

    def layer_types(self) -> dict[str, set[int | None]]:
        """LoRA module type (last path component) -> the layer indices it appears in."""
        found: dict[str, set[int | None]] = {}
        for m in self.lora:
            name = m.path.replace(".base_layer", "")
            match = _LAYER.search(name + ".")
            found.setdefault(name.rsplit(".", 1)[-1], set()).add(
                int(match.group(1)) if match else None
            )
        return found

    def base_text(self) -> dict[str, Any] | None:
        """The base's text config (`text_config` where it has one), with --base."""
        if self.base is None:
            return None
        text = self.base.get("text_config")
        return text if isinstance(text, dict) else self.base

    def vocab_size(self) -> int | None:
        text = self.base_text()
        vocab = text.get("vocab_size") if text else None
        return vocab if isinstance(vocab, int) else None

    def num_layers(self) -> int | None:
        """The base's layer count (--base), else the highest layer index the adapter names + 1."""
        text = self.base_text()
        if text is not None:
            n = text.get("num_hidden_layers") or text.get("n_layer")
            if isinstance(n, int):
                return n
        found = [i for s in self.layer_types().values() for i in s if i is not None]
        return max(found) + 1 if found else None


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def some(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- rules and tables -------------------------------------------------------------------------

Check = Callable[[Facts], str | None]


def release_key(version: str) -> tuple[int, ...]:
    """ "0.12" -> (0, 12), for comparing releases within a range."""
    return tuple(int(p) for p in version.split("."))


@dataclass(frozen=True)
class Rule:
    id: str
    level: str  # "error" | "warning"
    check: Check
    source: str  # the engine file and the releases whose code was read
    releases: tuple[str, str] | None = None  # first and last release it applies to; None: all

    def applies(self, version: str) -> bool:
        if self.releases is None:
            return True
        first, last = (release_key(v) for v in self.releases)
        return first <= release_key(version) <= last


@dataclass(frozen=True)
class EngineTable:
    """An engine's rules; `releases` the versions they cover, oldest first (the default: the
    newest). A rule with `releases` applies to that range only."""

    engine: str
    releases: tuple[str, ...]
    rules: tuple[Rule, ...]
    needs: Callable[[Facts, str], list[str]] = field(default=lambda f, v: [])

    @property
    def version(self) -> str:
        return self.releases[-1]

    def rules_for(self, version: str) -> list[Rule]:
        return [r for r in self.rules if r.applies(version)]


# --- predicates shared by several engines -----------------------------------------------------


def patterns_ignored(f: Facts, *, rslora: bool = True) -> str | None:
    """One scale per adapter from the global r/lora_alpha: modules whose PEFT scaling (patterns
    applied) differs get another delta. `rslora=False`: the engine also ignores use_rslora."""
    one = f.global_scaling(rslora=rslora)
    wrong = [m.path for m in f.lora if m.scaling is not None and not close(m.scaling, one)]
    if not wrong:
        return None
    what = "rank_pattern/alpha_pattern" + ("" if rslora else " and use_rslora")
    formula = "`r` and `lora_alpha`" if rslora else "`lora_alpha / r`"
    return (
        f"takes one scale per adapter ({one:g}, from {formula}) and ignores {what}: "
        f"{len(wrong)} module(s) get another scale than PEFT's ({some(wrong)})"
    )


def stacked_ranks(pad: Callable[[int], int]) -> Check:
    """The factors of one layer type are stacked across layers (torch.stack), after `pad`: ranks
    that differ within a type after padding fail to load."""

    def check(f: Facts) -> str | None:
        per_type: dict[str, set[int]] = {}
        for m in f.lora:
            if m.r is not None:
                kind = m.path.replace(".base_layer", "").rsplit(".", 1)[-1]
                per_type.setdefault(kind, set()).add(pad(m.r))
        mixed = sorted(k for k, ranks in per_type.items() if len(ranks) > 1)
        if not mixed:
            return None
        detail = "; ".join(f"{k}: {sorted(per_type[k])}" for k in mixed)
        return f"stacks each layer type's factors and cannot stack different ranks ({detail})"

    return check


def types_dropped(supported: frozenset[str]) -> Check:
    def check(f: Facts) -> str | None:
        dropped = sorted(t for t in f.layer_types() if t not in supported)
        if not dropped:
            return None
        return f"has no LoRA layer for {some(dropped)}: those modules are dropped (a log line)"

    return check


def partial_types(supported: frozenset[str]) -> Check:
    """A layer type missing from any layer is dropped whole ("no LoRA weight for this layer")."""

    def check(f: Facts) -> str | None:
        n = f.num_layers()
        if n is None:
            return None
        # counted, not compared with set(range(n)): n comes from untrusted files
        partial = sorted(
            t
            for t, layers in f.layer_types().items()
            if t in supported
            and t != "lm_head"
            and sum(1 for i in layers if i is not None and 0 <= i < n) < n
        )
        if not partial:
            return None
        return (
            f"drops a layer type unless every one of the {n} layers has it: {some(partial)} "
            "are dropped in all layers"
        )

    return check


def base_copy(name: str, kind: str) -> bool:
    """PEFT's copy of a targeted embedding's own weight (`embed_tokens.base_layer.weight`, saved
    with save_embedding_layers): the base's weight, unless tokens were added (`resized`)."""
    return kind == "embedding" and name.endswith(".base_layer.weight")


def resized(f: Facts) -> str | None:
    """With --base: an embedding copy whose row count is not the base's vocab_size means tokens
    were added in training; an engine that keeps the base's embeddings has other ones."""
    vocab = f.vocab_size()
    if vocab is None:
        return None
    found = [
        f"`{t.name}` ({t.shape[0]} rows)"
        for t, (_, k, _) in zip(f.tensors, f.kinds, strict=True)
        if base_copy(t.name, k) and t.shape and t.shape[0] != vocab
    ]
    if not found:
        return None
    return (
        f"keeps the base's embeddings (vocab_size {vocab}) and not the adapter's resized copies: "
        + ", ".join(found[:3])
    )


def tensors_ignored(f: Facts) -> str | None:
    extra = [(n, k) for n, k in f.extra_tensors(("lora_A", "lora_B")) if not base_copy(n, k)]
    if not extra:
        return None
    kinds = sorted({k for _, k in extra})
    return (
        f"reads only lora_A/lora_B and ignores {len(extra)} other tensor(s) ({', '.join(kinds)}: "
        f"{some([n for n, _ in extra])}); PEFT applies them"
    )


def feature(field_name: str, text: str) -> Check:
    def check(f: Facts) -> str | None:
        value = getattr(f.config, field_name)
        on = bool(value) and value != "none"
        return text.format(value=value) if on else None

    return check


def embedding_rows(f: Facts) -> int:
    """The most token rows an embedding LoRA holds (0: none)."""
    rows = [
        t.shape[1]
        for t, (_, k, _) in zip(f.tensors, f.kinds, strict=True)
        if k == "lora_embedding_A" and len(t.shape) == 2
    ]
    return max(rows, default=0)
