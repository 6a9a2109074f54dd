"""The one finiteness check of what a conversion computes: a value that comes out NaN or ±Inf
where the value it was made from is finite (an overflowing cast, scaling or rank reduction) is
an error naming the file and the module; NaN and ±Inf the input already held are carried."""

from __future__ import annotations

from collections.abc import Callable

from adapterctl.errors import ConversionError
from adapterctl.format.nonfinite import has_nonfinite, nonfinite_mask
from adapterctl.format.rawtensor import RawTensor


def refuse_new_nonfinite(
    t: RawTensor,
    origin: Callable[[], RawTensor] | None,
    *,
    label: str,
    key: str,
    module: str | None,
    scaling: float | None,
) -> None:
    """Raise unless every NaN/±Inf of `t` sits where `origin()` (the tensor `t` was made from
    element by element) holds one too; with no `origin` (a tensor mixing its inputs), `t` must
    be finite. Fast where `t` is finite (the common case): `origin` is read only otherwise."""
    if not has_nonfinite(t):
        return
    mask = nonfinite_mask(t)
    assert mask is not None
    if origin is not None:
        before = nonfinite_mask(origin())
        if before is not None and before.shape == mask.shape:
            mask &= ~before
            if not mask.any():
                return  # only what the input already held
    tail = key.split(f"{module}.", 1)[-1] if module and f"{module}." in key else ""
    where = f"`{module}` ({tail})" if tail else f"`{key}`"
    hint = "nothing was written"
    if t.dtype.code == "F16":
        hint += "; float16 holds magnitudes up to 65504: use --dtype bfloat16 or float32"
    if scaling is not None:
        hint += f"; the module's scaling (lora_alpha / r) is {scaling:g}"
    raise ConversionError(
        f"`{label}`: {where}: {int(mask.sum())} value(s) come out NaN or infinite in "
        f"{t.dtype.code} where the values they are made from are finite",
        hint=hint,
    )
