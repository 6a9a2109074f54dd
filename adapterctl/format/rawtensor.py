"""Tensors as raw bytes (numpy views), the places they are read from, and exact dtype casts.

No torch: a value that is only copied, concatenated or negated keeps its bits, and a cast rounds
to nearest even exactly as torch's `.to()` does (through float32, as torch casts a float64).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from adapterctl.errors import ConversionError
from adapterctl.format.dtypes import DTYPES, Dtype
from adapterctl.format.tensors import SafetensorsReader, bin_arrays

if TYPE_CHECKING:
    import numpy as np

#: the dtypes adapterctl computes with and casts between
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
#: `--dtype` spellings (torch's names) to safetensors codes
CAST_TARGETS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
#: above this many bytes, negating and joining go through numpy (one copy instead of several)
_LARGE = 4 << 20


@dataclass(frozen=True)
class RawTensor:
    """A tensor as its bytes in C order: `raw` is bytes (what a file gives; copying, concatenating
    and negating need nothing else, so exact conversions never import numpy) or a numpy array
    (what a computation gives). `data` is the numpy view, in the dtype's raw storage type."""

    dtype: Dtype
    shape: tuple[int, ...]
    raw: Any  # bytes | bytearray | memoryview | numpy array

    @property
    def nbytes(self) -> int:
        return self.dtype.bits * numel(self.shape) // 8

    @property
    def data(self) -> np.ndarray[Any, Any]:
        import numpy as np

        if isinstance(self.raw, (bytes, bytearray, memoryview)):
            if self.dtype.numpy_name is None:  # sub-byte dtypes: the packed bytes
                return np.frombuffer(self.raw, dtype=np.uint8)
            return np.frombuffer(self.raw, dtype=np.dtype(self.dtype.numpy_name)).reshape(
                self.shape
            )
        storage = np.dtype(self.dtype.numpy_name or "uint8")
        if self.raw.dtype == storage:
            return self.raw  # type: ignore[no-any-return]
        flat = np.ascontiguousarray(self.raw).reshape(-1).view(np.uint8)  # bytes of a join
        return flat.view(storage).reshape(self.shape)

    def buffer(self) -> memoryview:
        """The bytes in C order, for the writer."""
        if isinstance(self.raw, (bytes, bytearray, memoryview)):
            return memoryview(self.raw).cast("B")
        import numpy as np

        return np.ascontiguousarray(self.raw).reshape(-1).view(np.uint8).data


class TensorStore(Protocol):
    """Named tensors whose dtypes and shapes are known before any is read."""

    label: str

    def specs(self) -> Mapping[str, tuple[Dtype, tuple[int, ...]]]: ...

    def get(self, key: str) -> RawTensor: ...


class DictStore:
    """Tensors already in memory."""

    def __init__(self, tensors: Mapping[str, RawTensor], label: str = "<memory>") -> None:
        self.label = label
        self._tensors = dict(tensors)

    def specs(self) -> dict[str, tuple[Dtype, tuple[int, ...]]]:
        return {k: (t.dtype, t.shape) for k, t in self._tensors.items()}

    def get(self, key: str) -> RawTensor:
        return self._tensors[key]


class FileStore:
    """A safetensors file: the header now, each tensor when it is asked for."""

    def __init__(self, reader: SafetensorsReader) -> None:
        self.label = reader.path
        self._reader = reader
        self._specs: dict[str, tuple[Dtype, tuple[int, ...]]] | None = None

    def specs(self) -> dict[str, tuple[Dtype, tuple[int, ...]]]:
        if self._specs is None:  # the header does not change: made once
            self._specs = {k: (t.dtype, t.shape) for k, t in self._reader.tensors.items()}
        return self._specs

    def get(self, key: str) -> RawTensor:
        t = self._reader.tensors[key]
        return RawTensor(t.dtype, t.shape, self._reader.read_bytes(key))

    def get_into(self, key: str, buffer: Any) -> RawTensor:
        """`get`, its bytes read into `buffer` (see `SafetensorsReader.read_into`): valid until
        the buffer is reused."""
        t = self._reader.tensors[key]
        return RawTensor(t.dtype, t.shape, self._reader.read_into(key, buffer))


class _Closing(Protocol):
    def close(self) -> None: ...


class OpenStore:
    """`with OpenStore(path) as store:` a safetensors or `.bin` weights file as a TensorStore."""

    def __init__(self, path: str | os.PathLike[str], fmt: str) -> None:
        self._path = path
        self._fmt = fmt
        self._reader: SafetensorsReader | None = None

    def __enter__(self) -> TensorStore:
        if self._fmt == "bin":  # torch.load(weights_only=True): plain tensors only
            arrays = {k: RawTensor(*v) for k, v in bin_arrays(self._path).items()}
            return DictStore(arrays, os.fspath(self._path))
        self._reader = SafetensorsReader(self._path)
        return FileStore(self._reader)

    def __exit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.close()


def negate(t: RawTensor) -> RawTensor:
    """−x by flipping the sign bit of every (little-endian) element: exact for every value, NaN
    and ±0 included; one XOR over the whole buffer as a single integer."""
    if t.dtype.code not in FLOAT_CODES:
        raise ConversionError(f"cannot negate a {t.dtype.display_name} tensor")
    size = t.dtype.bits // 8
    raw = t.buffer()
    if len(raw) > _LARGE:  # one copy instead of the integer's three
        import numpy as np

        bits = np.frombuffer(raw, dtype=np.dtype(f"<u{size}"))
        flipped_array = bits ^ np.array(1 << (8 * size - 1), dtype=bits.dtype)
        return RawTensor(t.dtype, t.shape, flipped_array.view(np.uint8))
    mask = int.from_bytes((bytes(size - 1) + b"\x80") * (len(raw) // size), "little")
    flipped = (int.from_bytes(raw, "little") ^ mask).to_bytes(len(raw), "little")
    return RawTensor(t.dtype, t.shape, flipped)


def _joined_shape(a: RawTensor, b: RawTensor, axis: int) -> tuple[int, ...]:
    return (*a.shape[:axis], a.shape[axis] + b.shape[axis], *a.shape[axis + 1 :])


def concat_negated(a: RawTensor, b: RawTensor, axis: int) -> RawTensor:
    """[a, −b] along `axis`: for large tensors the sign flip is written straight into the
    joined array (no negated copy of `b`)."""
    if a.nbytes + b.nbytes <= _LARGE or a.dtype != b.dtype or a.dtype.code not in FLOAT_CODES:
        return concat(a, negate(b), axis)
    import numpy as np

    size = a.dtype.bits // 8
    bits = np.dtype(f"<u{size}")
    shape = _joined_shape(a, b, axis)
    out = np.empty(shape, dtype=bits)
    index = (slice(None),) * axis
    out[(*index, slice(0, a.shape[axis]))] = np.frombuffer(a.buffer(), bits).reshape(a.shape)
    np.bitwise_xor(
        np.frombuffer(b.buffer(), bits).reshape(b.shape),
        np.array(1 << (8 * size - 1), dtype=bits),
        out=out[(*index, slice(a.shape[axis], None))],
    )
    return RawTensor(a.dtype, shape, out.reshape(-1).view(np.uint8))


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def concat(a: RawTensor, b: RawTensor, axis: int) -> RawTensor:
    """`a` and `b` joined along `axis` (C order), on the bytes."""
    if (
        a.dtype != b.dtype
        or a.shape[:axis] + a.shape[axis + 1 :] != b.shape[:axis] + b.shape[axis + 1 :]
    ):
        raise ConversionError(
            f"cannot join {a.dtype.display_name}{list(a.shape)} and "
            f"{b.dtype.display_name}{list(b.shape)} "
            f"along axis {axis}"
        )
    shape = _joined_shape(a, b, axis)
    ma, mb = a.buffer(), b.buffer()
    if len(ma) + len(mb) > _LARGE:  # one copy, in C
        import numpy as np

        def view(m: memoryview, t: RawTensor) -> np.ndarray[Any, Any]:
            return np.frombuffer(m, dtype=np.uint8).reshape(*t.shape[:axis], -1)

        joined = np.concatenate([view(ma, a), view(mb, b)], axis=axis)
        return RawTensor(a.dtype, shape, joined.reshape(-1))
    outer = numel(a.shape[:axis])
    if outer == 1:
        return RawTensor(a.dtype, shape, bytes(ma) + bytes(mb))
    ca, cb = len(ma) // outer, len(mb) // outer  # bytes per outer index
    if ca + cb >= outer:  # few long rows: one slice per row
        parts = (m[i * c : (i + 1) * c] for i in range(outer) for m, c in ((ma, ca), (mb, cb)))
        return RawTensor(a.dtype, shape, b"".join(parts))
    # many short rows (B of LoRA: out x r): one strided copy per byte column, ca + cb in all
    out, step = bytearray(len(ma) + len(mb)), ca + cb
    for src, width, offset in ((bytes(ma), ca, 0), (bytes(mb), cb, ca)):
        for j in range(width):
            out[offset + j :: step] = src[j::width]
    return RawTensor(a.dtype, shape, out)


def to_float32(t: RawTensor) -> np.ndarray[Any, Any]:
    import numpy as np

    raw = t.data.reshape(t.shape)
    if t.dtype.code == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    if t.dtype.code == "F32":
        return raw  # a view: no copy
    if t.dtype.code in FLOAT_CODES:
        return raw.astype(np.float32)
    raise ConversionError(f"cannot compute with a {t.dtype.display_name} tensor")


def to_float64(t: RawTensor) -> np.ndarray[Any, Any]:
    import numpy as np

    if t.dtype.code == "F64":
        return t.data.reshape(t.shape).astype(np.float64)
    return to_float32(t).astype(np.float64)


def to_floats(t: RawTensor) -> np.ndarray[Any, Any]:
    """The values in the narrowest exact float type: a view of float32 storage (no copy),
    float64 for F64, float32 for the 16-bit floats."""
    return to_float64(t) if t.dtype.code == "F64" else to_float32(t)


def from_float(values: np.ndarray[Any, Any], code: str) -> RawTensor:
    """float32/float64 values as a `code` tensor, rounded to nearest even as torch's `.to()`
    rounds (a float64 goes through float32 first, as torch casts it); a NaN stays a NaN."""
    import numpy as np

    dtype = DTYPES[code]
    shape = tuple(values.shape)
    if code == "F64":
        return RawTensor(dtype, shape, values.astype(np.float64))
    with np.errstate(over="ignore"):
        f32 = np.ascontiguousarray(values, dtype=np.float32)
    if code == "BF16":  # round to nearest even on the bits, in place on one temporary
        bits = f32.view(np.uint32)
        work = bits >> 16
        work &= 1
        work += 0x7FFF
        work += bits
        work >>= 16
        rounded = work.astype(np.uint16)
        del work
        rounded[np.isnan(f32)] = 0x7FC0
        return RawTensor(dtype, shape, rounded)
    if code == "F16":
        with np.errstate(over="ignore"):  # overflow gives ±inf, as in torch
            return RawTensor(dtype, shape, f32.astype(np.float16))
    if code == "F32":
        return RawTensor(dtype, shape, f32)
    raise ConversionError(f"cannot write a {code} tensor from computed values")


def cast(t: RawTensor, code: str) -> RawTensor:
    """`t` as dtype `code`; the same tensor when it already is one, or is not a float tensor."""
    if t.dtype.code == code or t.dtype.code not in FLOAT_CODES:
        return t
    if t.dtype.code == "F64" and code != "F64":
        import numpy as np

        with np.errstate(over="ignore"):  # overflow gives ±inf, as in torch
            narrowed = t.data.reshape(t.shape).astype(np.float32)
        return from_float(narrowed, code)
    return from_float(to_float32(t), code)
