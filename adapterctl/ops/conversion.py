"""PiSSA / OLoRA / CorDA adapters to plain LoRA, from the trained and the initial adapter alone.

W_res + s·B·A = W_orig − s·B0·A0 + s·B·A = W_orig + s'·[B | −B0]·[A ; A0] with r' = 2r and the
scaling kept (α' = 2α, or √2·α with rslora), peft-format.md 7.2. Unlike PEFT nothing is dropped:
DoRA magnitudes, modules_to_save, biases and saved embeddings are carried over, embedding LoRA is
concatenated like A/B, and a saved `<mod>.base_layer.weight` of a module that also has factors
(the RESIDUAL weight) is rebuilt as W_res + s0·B0·A0. Tensors stay raw bytes (numpy views): no
torch, and every value that is only copied or negated is bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterctl.errors import ConversionError
from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import Dtype
from adapterctl.format.keys import classify

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class RawTensor:
    """A tensor as its bytes: `data` is a numpy array of the dtype's raw storage type."""

    dtype: Dtype
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


_SIGN = {16: 0x8000, 32: 0x80000000, 64: 0x8000000000000000}
_FLOATS = ("F16", "BF16", "F32", "F64")


def _negate(t: RawTensor) -> RawTensor:
    """−x by flipping the sign bit: exact for every value, NaN and ±0 included."""
    import numpy as np

    if t.dtype.code not in _FLOATS:
        raise ConversionError(f"cannot negate a {t.dtype.code} tensor")
    bits = t.data.view(np.dtype(f"<u{t.dtype.bits // 8}"))
    return RawTensor(
        t.dtype,
        t.shape,
        (bits ^ np.array(_SIGN[t.dtype.bits], dtype=bits.dtype)).view(t.data.dtype),
    )


def _concat(a: RawTensor, b: RawTensor, axis: int) -> RawTensor:
    import numpy as np

    data = np.concatenate([a.data.reshape(a.shape), b.data.reshape(b.shape)], axis=axis)
    return RawTensor(a.dtype, tuple(data.shape), data)


def to_float32(t: RawTensor) -> np.ndarray[Any, Any]:
    import numpy as np

    raw = t.data.reshape(t.shape)
    if t.dtype.code == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if t.dtype.code in ("F16", "F32", "F64"):
        return raw.astype(np.float32)
    raise ConversionError(f"cannot compute with a {t.dtype.code} tensor")


def from_float32(values: np.ndarray[Any, Any], like: RawTensor) -> RawTensor:
    """Cast back with round-to-nearest-even (torch's .to()); a NaN stays a NaN."""
    import numpy as np

    code = like.dtype.code
    if code == "BF16":
        bits = values.astype(np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded[np.isnan(values)] = 0x7FC0
        return RawTensor(like.dtype, like.shape, rounded)
    numpy_dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[code]
    return RawTensor(like.dtype, like.shape, values.astype(numpy_dtype))


def converted_config(trained: LoraConfig, initial: LoraConfig | None = None) -> LoraConfig:
    """r ×2 (patterns too), α ×2 (√2 with rslora; patterns likewise), init_lora_weights true; the
    base is the initial adapter's (the trained one names the residual base it was trained on)."""
    factor = math.sqrt(2) if trained.use_rslora else 2
    changes: dict[str, Any] = {
        "r": trained.r * 2,
        "lora_alpha": trained.lora_alpha * factor,
        "rank_pattern": {k: v * 2 for k, v in (trained.rank_pattern or {}).items()},
        "alpha_pattern": {k: v * factor for k, v in (trained.alpha_pattern or {}).items()},
        "init_lora_weights": True,
    }
    if initial is not None and initial.base_model_name_or_path:
        changes["base_model_name_or_path"] = initial.base_model_name_or_path
    return trained.replace(**changes)


def _pairs() -> dict[str, int]:
    # LoRA kind -> the axis the rank runs along (A: rows, B: columns)
    return {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}


def convert_tensors(
    trained: Mapping[str, RawTensor],
    initial: Mapping[str, RawTensor],
    trained_config: LoraConfig,
    initial_config: LoraConfig,
) -> dict[str, RawTensor]:
    """The plain-LoRA tensors; anything the pair disagrees on is a ConversionError saying what."""
    mts = trained_config.modules_to_save or []
    axes = _pairs()
    out: dict[str, RawTensor] = {}
    lora_modules = {classify(k, mts).module for k in trained if classify(k, mts).is_lora}
    for key, t in trained.items():
        info = classify(key, mts)
        if info.kind in axes:
            t0 = initial.get(key)
            if t0 is None:
                raise ConversionError(
                    f"`{key}` is in the trained adapter but not in the initial one"
                )
            if (t0.shape, t0.dtype.code) != (t.shape, t.dtype.code):
                raise ConversionError(
                    f"`{key}` differs between the pair: trained {t.dtype.code}{list(t.shape)}, "
                    f"initial {t0.dtype.code}{list(t0.shape)}"
                )
            axis = axes[info.kind]
            out[key] = _concat(t, t0 if axis == 0 else _negate(t0), axis)
        elif info.kind == "lora_B.bias":
            raise ConversionError(f"`{key}`: lora_bias adapters cannot be converted")
        elif info.param == "weight" and info.depth and info.module in lora_modules:
            out[key] = _rebuild_base(key, t, initial, info.module, initial_config)
        else:  # DoRA magnitudes, modules_to_save, biases, saved embeddings: unchanged
            out[key] = t
    missing = [k for k in initial if classify(k, mts).kind in axes and k not in trained]
    if missing:
        raise ConversionError(
            f"`{missing[0]}` is in the initial adapter but not in the trained one"
        )
    return out


def _rebuild_base(
    key: str, w_res: RawTensor, initial: Mapping[str, RawTensor], module: str, config: LoraConfig
) -> RawTensor:
    """A saved residual base weight back to the original one: W_res + s0·(B0·A0)."""
    import numpy as np

    prefix = key[: key.rindex(".base_layer.")]
    embedding = f"{prefix}.lora_embedding_A" in initial
    a0 = initial.get(f"{prefix}.lora_embedding_A" if embedding else f"{prefix}.lora_A.weight")
    b0 = initial.get(f"{prefix}.lora_embedding_B" if embedding else f"{prefix}.lora_B.weight")
    if a0 is None or b0 is None:
        raise ConversionError(
            f"`{key}` holds a residual weight but the initial adapter lacks its factors"
        )
    r = a0.shape[0]
    alpha = config.alpha_for(module)
    s0 = config.scaling(alpha, r)
    delta = s0 * (to_float32(b0).astype(np.float32) @ to_float32(a0).astype(np.float32))
    w = to_float32(w_res)
    delta = delta.T if embedding or delta.shape != w.shape else delta
    if delta.shape != w.shape:
        raise ConversionError(
            f"`{key}` {list(w.shape)} does not fit its factors {list(delta.shape)}"
        )
    return from_float32(w + delta, w_res)
