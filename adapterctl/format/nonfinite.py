"""NaN and ±Inf found from the bits of raw little-endian floats (no float conversion): whether a
tensor holds any, where, and how many of each; and, without numpy, whether a run of bytes may
hold one at all (what lets `inspect --check` pass over 100k tiny finite tensors cheaply)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from adapterctl.format.rawtensor import RawTensor

#: code -> (unsigned storage, exponent bits, mantissa bits, sign bit) of the floats whose
#: all-ones exponent means NaN (mantissa not zero) or ±Inf (mantissa zero)
_IEEE = {
    "F16": ("<u2", 0x7C00, 0x03FF, 0x8000),
    "BF16": ("<u2", 0x7F80, 0x007F, 0x8000),
    "F32": ("<u4", 0x7F800000, 0x007FFFFF, 0x80000000),
    "F64": ("<u8", 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 0x8000000000000000),
    "F8_E5M2": ("u1", 0x7C, 0x03, 0x80),
}
#: float8 e4m3fn has no infinity: exponent and mantissa all ones is its NaN
_E4M3_NAN = 0x7F
#: the dtypes whose values can be NaN or ±Inf (and are counted)
NONFINITE_CODES = (*_IEEE, "F8_E4M3")


@dataclass(frozen=True)
class NonFinite:
    """How many values of a tensor are NaN, +Inf and -Inf."""

    nan: int = 0
    posinf: int = 0
    neginf: int = 0

    @property
    def total(self) -> int:
        return self.nan + self.posinf + self.neginf

    def __add__(self, other: NonFinite) -> NonFinite:
        return NonFinite(
            self.nan + other.nan, self.posinf + other.posinf, self.neginf + other.neginf
        )

    def to_dict(self) -> dict[str, int]:
        return {"nan": self.nan, "posinf": self.posinf, "neginf": self.neginf}

    def describe(self) -> str:
        parts = [(self.nan, "NaN"), (self.posinf, "+Inf"), (self.neginf, "-Inf")]
        return ", ".join(f"{n} {name}" for n, name in parts if n)


def _bits(raw: Any, code: str) -> np.ndarray[Any, Any]:
    import numpy as np

    storage = _IEEE[code][0] if code in _IEEE else "u1"
    return np.frombuffer(raw, dtype=np.dtype(storage))


def has_nonfinite(t: RawTensor, piece: int = 1 << 16) -> bool:
    """Whether `t` holds any NaN or ±Inf: the largest magnitude bits, piece by piece through one
    small buffer (no tensor-sized temporaries; a cast's output is checked at memory speed)."""
    import numpy as np

    code = t.dtype.code
    if code not in _IEEE:
        mask = nonfinite_mask(t)
        return mask is not None and bool(mask.any())
    _, exponent, mantissa, _ = _IEEE[code]
    bits = _bits(t.buffer(), code)
    magnitude = bits.dtype.type(exponent | mantissa)
    buffer = np.empty(min(bits.size, piece), bits.dtype)
    for start in range(0, bits.size, piece):
        chunk = bits[start : start + piece]
        out = buffer[: chunk.size]
        np.bitwise_and(chunk, magnitude, out=out)
        if out.max() >= exponent:
            return True
    return False


def nonfinite_mask(t: RawTensor) -> np.ndarray[Any, Any] | None:
    """Where `t` holds NaN or ±Inf (flat, from the bits: no float conversion), or None for a
    dtype without such values."""
    code = t.dtype.code
    if code == "F8_E4M3":
        return (_bits(t.buffer(), code) & _E4M3_NAN) == _E4M3_NAN  # type: ignore[no-any-return]
    if code not in _IEEE:
        return None
    _, exponent, _, _ = _IEEE[code]
    bits = _bits(t.buffer(), code)
    return (bits & bits.dtype.type(exponent)) == exponent  # type: ignore[no-any-return]


#: code -> (bytes per value, the bits of its top byte that are all set in every NaN and ±Inf)
_TOP_BYTE = {"F16": (2, 0x7C), "BF16": (2, 0x7F), "F32": (4, 0x7F), "F64": (8, 0x7F),
             "F8_E5M2": (1, 0x7C), "F8_E4M3": (1, 0x7F)}  # fmt: skip
#: code -> the top-byte values that no NaN or ±Inf has (deleted: what is left may be one)
_NEVER_SPECIAL = {
    code: bytes(b for b in range(256) if b & mask != mask) for code, (_, mask) in _TOP_BYTE.items()
}


def may_hold_nonfinite(raw: bytes | memoryview, code: str) -> bool:
    """False when the little-endian values in `raw` are surely all finite, from their top bytes
    alone (no numpy: 100k tiny tensors with no NaN are checked without importing it); True
    when one may be NaN or ±Inf (then count_nonfinite counts). Only dtypes in NONFINITE_CODES."""
    width, _ = _TOP_BYTE[code]
    top = bytes(raw)[width - 1 :: width] if width > 1 else bytes(raw)
    return bool(top.translate(None, _NEVER_SPECIAL[code]))


def count_nonfinite(raw: Any, code: str) -> NonFinite:
    """NaN, +Inf and -Inf in the raw little-endian bytes of a `code` tensor (or of a piece of
    it, cut at element boundaries); nothing for dtypes without such values."""
    import numpy as np

    if code == "F8_E4M3":
        bits = _bits(raw, code)
        return NonFinite(nan=int(np.count_nonzero((bits & _E4M3_NAN) == _E4M3_NAN)))
    if code not in _IEEE:
        return NonFinite()
    _, exponent, mantissa, sign = _IEEE[code]
    bits = _bits(raw, code)
    kind = bits.dtype.type
    special = bits[(bits & kind(exponent)) == exponent]
    if not special.size:
        return NonFinite()
    infinite = special[(special & kind(mantissa)) == 0]
    negative = int(np.count_nonzero(infinite & kind(sign)))
    return NonFinite(special.size - infinite.size, infinite.size - negative, negative)
