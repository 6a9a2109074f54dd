"""`convert --portable`: the adapter every serving engine computes as PEFT does.

Engines take one scaling per adapter (vLLM, TGI, LoRAX: lora_alpha / r of the config, patterns
and rslora ignored) or one per tensor (llama.cpp: alpha / the tensor's own rank). Both agree with
PEFT when every module's scaling is 1 and every module has the rank of the config: each module's
true scaling (its r and alpha after the patterns, √r with rslora) is folded into its B factor, and
its factors are zero-padded to one rank R (zero rows of A, zero columns of B add nothing to B·A),
with `r = lora_alpha = R`, `use_rslora: false` and no patterns.

What no engine computes from plain factors is kept as is and named (`not_portable`): DoRA
magnitudes, modules_to_save copies, trained biases and lora_B biases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import DTYPES, Dtype
from adapterctl.format.keys import classify
from adapterctl.format.rawtensor import RawTensor, cast, from_float, numel, to_float64

#: key kind -> what an engine cannot take as plain LoRA factors (kept as is, named)
KEPT_KINDS = {
    "lora_magnitude_vector": "dora",
    "modules_to_save": "modules_to_save",
    "bias": "bias",
    "lora_B.bias": "lora_bias",
    "embedding": "saved_embedding",
    "trainable_tokens_delta": "trainable_tokens",
    "base_layer": "base_layer",
}

#: elements of one factor converted at a time (a piece in float64: 2 MiB)
PIECE = 1 << 18


@dataclass(frozen=True)
class Kept:
    """A tensor (or module) kept as is, that an engine serving plain LoRA does not compute."""

    kind: str  # a KEPT_KINDS value
    name: str  # the module (or, for a key without one, the stored key)

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name}

    def __str__(self) -> str:
        return f"{self.kind} `{self.name}`"


def not_portable(keys: Iterable[str], config: LoraConfig) -> list[Kept]:
    """What of the adapter's `keys` no engine computes from plain LoRA factors: one entry per
    kind and module, in key order."""
    mts = config.modules_to_save or []
    found: dict[tuple[str, str], Kept] = {}
    for key in keys:
        info = classify(key, mts)
        kind = KEPT_KINDS.get(info.kind)
        if kind is not None:
            name = info.module or key
            found.setdefault((kind, name), Kept(kind, name))
    return list(found.values())


def portable_config(config: LoraConfig, rank: int) -> LoraConfig:
    """Scaling 1 for every module at one rank: r = lora_alpha = `rank`, no rslora, no patterns."""
    return config.replace(
        r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}
    )


def common_rank(ranks: Sequence[int], requested: int | None, default: int) -> int:
    """R: the rank asked for (--rank), else the largest module's, else the config's."""
    if requested is not None:
        return requested
    return max(ranks, default=default)


def padded_shape(shape: tuple[int, ...], axis: int, rank: int) -> tuple[int, ...]:
    return tuple(rank if i == axis else d for i, d in enumerate(shape))


def _storage(dtype: Dtype) -> Any:
    import numpy as np

    return np.dtype(dtype.numpy_name or "uint8")


def padded(parts: Sequence[tuple[RawTensor, float]], axis: int, code: str, rank: int) -> RawTensor:
    """`parts` (each times its factor) joined along `axis` (the rank axis: 0 for A, 1 for B),
    in dtype `code`, zero-padded to `rank` along it: written piece by piece into the one output
    array (zero bits are 0.0 in every float dtype). A part whose factor is 1 in its own dtype
    keeps its bits; any other is multiplied in float64 and rounded once, as torch's `.to()`."""
    import numpy as np

    first = parts[0][0]
    shape = padded_shape(first.shape, axis, rank)
    dtype = DTYPES[code]
    out = np.zeros(shape, dtype=_storage(dtype))
    start = 0
    for t, factor in parts:
        width = t.shape[axis]
        raw = t.data.reshape(t.shape)
        rows = max(1, PIECE // max(numel(t.shape[1:]), 1))
        for row in range(0, t.shape[0], rows):
            piece = raw[row : row + rows]
            piece_t = RawTensor(t.dtype, tuple(piece.shape), piece)  # rows: contiguous
            if factor == 1.0:
                values = cast(piece_t, code).data.reshape(piece.shape)
            else:
                wide = to_float64(piece_t)
                with np.errstate(over="ignore", invalid="ignore"):
                    wide *= factor
                values = from_float(wide, code).data
            if axis == 0:
                out[start + row : start + row + piece.shape[0]] = values
            else:
                out[row : row + piece.shape[0], start : start + width] = values
        start += width
    return RawTensor(dtype, shape, out)


def folded_bias(bias: RawTensor, scaling: float, code: str) -> RawTensor:
    """A lora_B bias times the module's scaling (the output's scaling is 1), rounded once."""
    return from_float(scaling * to_float64(bias), code)
