"""THE merge rule: one LoRA adapter merged into one base weight, per variant, written once for
numpy arrays (`adapterctl merge`, streaming) and torch tensors (`AdapterModel.merge_and_unload`,
`load --merge-to`). Only operations both support are used (`@`, `.T`, `*`, `+`, `/`, `reshape`).

PEFT 0.21.2's arithmetic (peft/tuners/lora/layer.py `merge`, variants.py `merge_unsafe`), with the
factors in float32 (its `autocast_adapter_dtype=True`):

- Linear / Conv1D: `weight += s·(B@A)` (transposed for Conv1D), the float32 delta added to the
  stored weight in place: computed in float32 and rounded to the storage dtype ONCE;
- Embedding: `weight += (s·(B@A)ᵀ).to(weight.dtype)`: the delta is rounded to the storage dtype
  first, then the sum is rounded again;
- DoRA: `m / ‖W0 + ΔW‖ · (W + ΔW)`, the norm over the input dimension (per output feature; for an
  embedding over the vocabulary, per embedding dimension) of the UNMERGED base weight W0, the
  product rounded once;
- lora_bias: `bias += s·b`, rounded once;
- several adapters on one layer are merged one after another, each rounded to the storage dtype.
  Before a DoRA adapter is merged onto a layer that already holds merged adapters, PEFT takes them
  out (`_unmerged_base_weight`: unmerged in reverse order, a LoRA by `weight -= ΔW.to(dtype)`, a
  DoRA by `weight / factor - ΔW`), takes that weight for the norm, and merges them back in: the
  roundings of that round trip are part of its result, and `merge_sequence` replays them.


The weights come in and go out as float32 (or float64) values in the base's storage orientation;
`store` rounds values to the storage dtype (and returns them as float32 again), so several
adapters merged one after another are rounded after each, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

#: how a layer stores its weight: Linear (out, in), GPT-2 Conv1D (in, out), Embedding (vocab, dim)
Kind = Literal["linear", "conv1d", "embedding"]
KINDS: tuple[Kind, ...] = ("linear", "conv1d", "embedding")

Array = Any  # a numpy array or a torch tensor
Round = Callable[[Array], Array]
Norm = Callable[[Array, int], Array]


def _same(x: Array) -> Array:
    return x


def delta(a: Array, b: Array, scaling: float) -> Array:
    """s·(B@A), shape (out, in), from A (r, in) and B (out, r)."""
    return (b @ a) * scaling


def bias_sequence(
    bias: Array, steps: list[tuple[Array | None, float, bool]], *, store: Round
) -> Array:
    """A layer's bias through its adapters in order, each (lora_B's bias or None, scaling, DoRA):
    `bias + s·b` rounded once per lora_bias adapter; a DoRA adapter takes the ones merged before
    out (in reverse order) and back in, as `merge_sequence` does with the weight."""
    merged: list[Array] = []
    for lora_bias, scaling, dora in steps:
        if dora and merged:
            for x in reversed(merged):
                bias = store(bias - x)
            for x in merged:
                bias = store(bias + x)
        if lora_bias is not None:
            x = lora_bias * scaling
            bias = store(bias + x)
            merged.append(x)
    return bias


@dataclass(frozen=True)
class Step:
    """One adapter of a layer, as `merge_sequence` takes it (float factors, A (r, in), B (out, r))."""

    a: Array
    b: Array
    scaling: float
    magnitude: Array | None = None  # DoRA
    delta_store: Round = _same


def _delta(kind: Kind, step: Step) -> Array:
    d = step.delta_store(delta(step.a, step.b, step.scaling))
    return d if kind == "linear" else d.T


def _factor(kind: Kind, magnitude: Array, base: Array, d: Array, norm: Norm) -> Array:
    axis = 1 if kind == "linear" else 0
    factor = magnitude / norm(base + d, axis)
    return factor.reshape(-1, 1) if kind == "linear" else factor.reshape(1, -1)


def merge_sequence(
    kind: Kind, weight: Array, steps: list[Step], *, store: Round, norm: Norm
) -> Array:
    """`weight` with `steps` merged one after another, as PEFT's `merge_and_unload` merges
    several adapters into one layer (the DoRA round trip above included)."""
    merged: list[tuple[Step, Array, Array | None]] = []  # (step, delta, its DoRA factor)
    w = weight
    for step in steps:
        d = _delta(kind, step)
        if step.magnitude is None:
            w = store(w + store(d)) if kind == "embedding" else store(w + d)
            merged.append((step, d, None))
            continue
        base = w
        if merged:  # out in reverse order, the norm from what is left, back in order
            for _, dj, fj in reversed(merged):
                w = store(w - store(dj)) if fj is None else store(w / fj - dj)
            base = w
            replayed = []
            for sj, dj, fj in merged:
                if fj is None:
                    w = store(w + store(dj)) if kind == "embedding" else store(w + dj)
                    replayed.append((sj, dj, None))
                else:
                    f = _factor(kind, sj.magnitude, base, dj, norm)
                    w = store(f * (w + dj))
                    replayed.append((sj, dj, f))
            merged = replayed
        f = _factor(kind, step.magnitude, base, d, norm)
        w = store(f * (w + d))
        merged.append((step, d, f))
    return w
