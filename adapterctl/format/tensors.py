"""Tensor data as raw bytes: a streaming safetensors reader and writer, and the one `.bin` reader.

Tensors are read one at a time (as bytes or as numpy views of those bytes; bfloat16 and float8 come
out as raw unsigned integers) and written one at a time, so memory stays bounded by the largest
tensor. Only the `.bin` readers import torch, and only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from adapterctl.errors import AdapterFormatError, MissingDependencyError
from adapterctl.format.dtypes import BY_TORCH_NAME, DTYPES, Dtype
from adapterctl.format.header import (
    Header,
    TensorInfo,
    check_path_not_lfs_pointer,
    read_header_from,
)

if TYPE_CHECKING:
    import numpy as np

PT_METADATA = {"format": "pt"}
_CHUNK = 1 << 20


class SafetensorsReader:
    """An open safetensors file: validated header plus per-tensor reads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        from adapterctl.format.files import open_regular

        self._f: BinaryIO = open_regular(self.path, "weights file")  # closed by close()/__exit__
        try:
            size = os.fstat(self._f.fileno()).st_size
            self.header: Header = read_header_from(self._f, size, self.path)
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def read_bytes(self, name: str) -> bytes:
        t = self.header.tensors[name]
        self._f.seek(self.header.data_start + t.start)
        data = self._f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise AdapterFormatError(f"`{self.path}` was truncated while reading `{name}`")
        return data

    def read_into(self, name: str, buffer: Any) -> memoryview:
        """The tensor's bytes read into `buffer` (writable, at least the tensor's size; one
        buffer can serve many reads without a new allocation each): the filled part."""
        t = self.header.tensors[name]
        view = memoryview(buffer).cast("B")[: t.nbytes]
        if len(view) != t.nbytes:
            raise ValueError(f"a buffer of {len(view)} bytes cannot hold `{name}`")
        self._f.seek(self.header.data_start + t.start)
        f = cast("io.BufferedIOBase", self._f)  # what open_regular opens
        done = 0
        while done < t.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise AdapterFormatError(f"`{self.path}` was truncated while reading `{name}`")
            done += n
        return view

    def read_span(self, start: int, end: int, name: str) -> bytes:
        """The data section's bytes `start`..`end` (several neighbouring tensors read at once;
        `name`, the first of them, is named if the file turns out truncated)."""
        self._f.seek(self.header.data_start + start)
        data = self._f.read(end - start)
        if len(data) != end - start:
            raise AdapterFormatError(f"`{self.path}` was truncated while reading `{name}`")
        return data

    def span(self, name: str) -> FileSpan:
        """Where the tensor's bytes are in the open file, for the writer to copy them whole."""
        t = self.header.tensors[name]
        return FileSpan(self._f.fileno(), self.header.data_start + t.start, t.nbytes)

    def iter_bytes(self, name: str, size: int = _CHUNK) -> Iterator[bytes]:
        """The tensor's bytes in pieces of about `size` bytes, cut at element boundaries (memory
        stays one piece, whatever the tensor's size)."""
        t = self.header.tensors[name]
        element = max(1, t.dtype.bits // 8)
        step = max(element, size - size % element)
        self._f.seek(self.header.data_start + t.start)
        left = t.nbytes
        while left > 0:
            data = self._f.read(min(step, left))
            if not data:
                raise AdapterFormatError(f"`{self.path}` was truncated while reading `{name}`")
            left -= len(data)
            yield data

    def array(self, name: str) -> np.ndarray[Any, Any]:
        """The tensor as a numpy array over its raw bytes (bfloat16/float8 as uint16/uint8)."""
        import numpy as np

        t = self.header.tensors[name]
        data = self.read_bytes(name)
        if t.dtype.numpy_name is None:  # sub-byte dtypes: the packed bytes
            return np.frombuffer(data, dtype=np.uint8)
        return np.frombuffer(data, dtype=np.dtype(t.dtype.numpy_name)).reshape(t.shape)


@dataclass(frozen=True)
class FileSpan:
    """`length` bytes at `offset` of the open file `fd`: a piece the writer copies in the kernel
    (copy_file_range), never through Python's memory."""

    fd: int
    offset: int
    length: int


Buffer = bytes | bytearray | memoryview
Piece = Buffer | FileSpan
_SPAN_STEP = 16 << 20  # progress (and a pause point for the crash tests) every 16 MiB copied


@dataclass(frozen=True)
class TensorSource:
    """One tensor to write: its name, dtype, shape and a callable giving its bytes when needed,
    all at once or as an iterator of pieces in order (a large tensor copied without ever being
    whole in memory)."""

    name: str
    dtype: Dtype
    shape: tuple[int, ...]
    data: Callable[[], Buffer | Iterator[Piece]]

    @property
    def nbytes(self) -> int:
        n = self.dtype.bits
        for d in self.shape:
            n *= d
        return n // 8


def _serialize_header(sources: list[TensorSource], metadata: dict[str, str] | None) -> bytes:
    # safetensors' own layout: tensors sorted by dtype (larger first, in the format's dtype order)
    # and then by name, compact JSON, padded with spaces to a multiple of 8 bytes.
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for s in sources:
        header[s.name] = {
            "dtype": s.dtype.code,
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw


def sort_for_writing(sources: Iterable[TensorSource]) -> list[TensorSource]:
    order = {code: i for i, code in enumerate(DTYPES)}
    return sorted(sources, key=lambda s: (-order[s.dtype.code], s.name.encode("utf-8")))


def write_safetensors(
    f: BinaryIO,
    sources: Iterable[TensorSource],
    metadata: dict[str, str] | None = PT_METADATA,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream tensors into `f` in safetensors' own order; returns the bytes written."""
    ordered = sort_for_writing(sources)
    names = [s.name for s in ordered]
    if len(set(names)) != len(names):
        raise AdapterFormatError("two tensors to write have the same name")
    raw = _serialize_header(ordered, metadata)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    total = 8 + len(raw)
    for s in ordered:
        produced = s.data()
        pieces = produced if isinstance(produced, Iterator) else (produced,)  # an array: one
        written = 0
        for piece in pieces:
            if isinstance(piece, FileSpan):
                written += piece.length
                if written > s.nbytes:
                    break
                _copy_span(f, piece, progress)
                continue
            data = memoryview(piece).cast("B")
            written += len(data)
            if written > s.nbytes:
                break
            f.write(data)
            if progress is not None:
                progress(len(data))
            del data, piece  # before the next is made: one piece in memory at a time
        if written != s.nbytes:
            raise AdapterFormatError(
                f"tensor `{s.name}` has {'more than ' if written > s.nbytes else ''}{written} "
                f"bytes, expected {s.nbytes} for {s.dtype.code}{list(s.shape)}"
            )
        total += written
        del produced, pieces
    return total


def _copy_span(f: BinaryIO, span: FileSpan, progress: Callable[[int], None] | None) -> None:
    """`span` appended to `f` by the kernel (os.copy_file_range), where it can; else read and
    written through a 1 MiB buffer. Either way `f` ends positioned after it."""
    f.flush()
    out = f.fileno()
    done = 0
    while done < span.length:
        step = min(_SPAN_STEP, span.length - done)
        try:
            n = os.copy_file_range(span.fd, out, step, span.offset + done)
        except (AttributeError, OSError):  # no such call here, or not across these files
            n = 0
        if n == 0:  # refused, or a filesystem that says 0 instead: read it to be sure
            n = _copy_span_by_reading(out, span, done, step)
        if n <= 0:
            raise AdapterFormatError("a weights file ended while it was being copied")
        done += n
        if progress is not None:
            progress(n)
    f.seek(0, os.SEEK_END)  # the buffered writer learns where the kernel left the file


def _copy_span_by_reading(out: int, span: FileSpan, done: int, step: int) -> int:
    copied = 0
    while copied < step:
        data = os.pread(span.fd, min(_CHUNK, step - copied), span.offset + done + copied)
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
        copied += len(data)
    return copied


def copy_stream(src: BinaryIO, dst: BinaryIO, progress: Callable[[int], None] | None = None) -> int:
    """Copy a file's bytes in fixed-size chunks (memory does not grow with the file)."""
    total = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        total += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return total


@dataclass(frozen=True)
class BinTensor:
    name: str
    dtype_name: str  # torch's name, e.g. "float32"
    shape: tuple[int, ...]
    nbytes: int


def refused_pickle(label: str, e: BaseException) -> AdapterFormatError:
    """The one error line for a `.bin` file that torch.load(weights_only=True) refuses: the
    file and torch's reason, without its paragraphs of advice."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    # torch's first sentences are about its defaults; the reason comes after "WeightsUnpickler error:"
    text = " ".join(lines)
    _, sep, reason = text.partition("WeightsUnpickler error:")
    if sep:
        reason = reason.strip().split(". ")[0].rstrip(".")
    else:
        reason = next((x for x in lines if "Unsupported" in x), lines[0] if lines else "")
    return AdapterFormatError(
        f"`{label}` is not a plain tensor checkpoint: {reason[:300] or type(e).__name__}",
        hint="adapterctl only reads .bin files that hold plain tensors (weights_only)",
    )


def load_bin(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a `.bin` state dict with `torch.load(weights_only=True)`: plain tensors only.

    Anything that would run code or import a module when unpickled is refused, as is any value
    that is not a tensor.
    """
    from adapterctl.format.files import open_regular

    label = os.fspath(path)
    check_path_not_lfs_pointer(path)  # torch would say "invalid load key, 'v'"
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a declared dependency
        raise MissingDependencyError(
            f"reading `{label}` needs torch", hint="pip install torch, or convert to safetensors"
        ) from e
    with open_regular(path, "weights file") as f:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols it reads anyway
                warnings.simplefilter("ignore")
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise refused_pickle(label, e) from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise AdapterFormatError(f"`{label}` does not hold a mapping of names to tensors")
    return obj


def bin_tensors(path: str | os.PathLike[str]) -> Iterator[BinTensor]:
    for name, t in load_bin(path).items():
        dtype_name = str(t.dtype).removeprefix("torch.")
        yield BinTensor(name, dtype_name, tuple(t.shape), t.numel() * t.element_size())


def bin_arrays(path: str | os.PathLike[str]) -> dict[str, tuple[Dtype, tuple[int, ...], Any]]:
    """A `.bin` state dict as (dtype, shape, numpy array over the raw bytes) per tensor."""
    import numpy as np
    import torch

    arrays = {}
    for name, t in load_bin(path).items():
        dtype = BY_TORCH_NAME.get(str(t.dtype).removeprefix("torch."))
        if dtype is None or dtype.numpy_name is None:
            raise AdapterFormatError(f"`{os.fspath(path)}`: tensor `{name}` has dtype {t.dtype}")
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        arrays[name] = (dtype, tuple(t.shape), raw.view(np.dtype(dtype.numpy_name)))
    return arrays


def dtype_for_torch_name(name: str) -> Dtype | None:
    return BY_TORCH_NAME.get(name)
