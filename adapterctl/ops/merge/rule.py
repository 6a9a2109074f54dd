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
- lora_bias: `bias += s·b`, rounded once.

The weights come in and go out as float32 (or float64) values in the base's storage orientation;
`store` rounds values to the storage dtype (and returns them as float32 again), so several
adapters merged one after another are rounded after each, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Callable
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


def merge_step(
    kind: Kind,
    weight: Array,
    a: Array,
    b: Array,
    scaling: float,
    *,
    store: Round,
    norm: Norm,
    magnitude: Array | None = None,
    original: Array | None = None,
    delta_store: Round = _same,
) -> Array:
    """`weight` (float values, storage orientation) with one adapter merged in, rounded by `store`.

    `magnitude` makes it DoRA; `original` is then the unmerged base weight (defaults to `weight`).
    `norm(x, axis)` is the 2-norm along `axis`. `delta_store` rounds the delta where PEFT computes
    it in the factors' own half precision (factors not autocast to float32).
    """
    d = delta_store(delta(a, b, scaling))
    if kind != "linear":
        d = d.T  # Conv1D (in, out); Embedding (vocab, dim)
    if magnitude is None:
        if kind == "embedding":  # PEFT casts an embedding's delta to the weight's dtype first
            return store(weight + store(d))
        return store(weight + d)
    base = weight if original is None else original
    axis = 1 if kind == "linear" else 0  # the input dimension (the vocabulary for an embedding)
    factor = magnitude / norm(base + d, axis)
    shaped = factor.reshape(-1, 1) if kind == "linear" else factor.reshape(1, -1)
    return store(shaped * (weight + d))


def bias_step(bias: Array, lora_bias: Array, scaling: float, *, store: Round) -> Array:
    """A base bias with a lora_B bias merged in (lora_bias=True): `bias + s·b`, rounded once."""
    return store(bias + lora_bias * scaling)
