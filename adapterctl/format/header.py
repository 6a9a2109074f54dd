"""The safetensors header, read with the standard library only.

Accepts exactly what safetensors 0.8 accepts (any key order, any JSON whitespace, extra fields in a
tensor entry, the data covered contiguously with no gaps or overlaps, every dtype it defines, the
100 MB header cap), with one deliberate exception: a key repeated anywhere in the header is
rejected (safetensors tolerates an identical repeat of a tensor entry).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from adapterctl.errors import AdapterFormatError, AdapterNotFoundError
from adapterctl.format.dtypes import DTYPES, Dtype
from adapterctl.format.gcpause import gc_paused

MAX_HEADER_SIZE = 100_000_000
_U64_MAX = 2**64 - 1
#: how a Git LFS pointer file starts (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md);
#: a pointer is at most 1024 bytes
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_LFS_MAX = 1024


def is_lfs_pointer(head: bytes) -> bool:
    """Whether `head` (a file's first bytes) is a Git LFS pointer: the version line, then
    `oid sha256:...` and `size N` lines."""
    return head.startswith(LFS_MAGIC) and b"\noid sha256:" in head and b"\nsize " in head


def lfs_pointer_error(label: str) -> AdapterFormatError:
    return AdapterFormatError(
        f"`{label}` is a Git LFS pointer, not the weights: fetch them with `git lfs pull`",
        hint="the repository was cloned without Git LFS; run `git lfs install` and "
        "`git lfs pull` in it",
    )


def check_not_lfs_pointer(f: BinaryIO, label: str) -> None:
    """Raise `lfs_pointer_error` if the open file `f` is a Git LFS pointer; `f` is left at the
    position it had."""
    where = f.tell()
    head = f.read(_LFS_MAX)
    f.seek(where)
    if is_lfs_pointer(head):
        raise lfs_pointer_error(label)


def check_path_not_lfs_pointer(path: str | os.PathLike[str]) -> None:
    """The same for the file at `path`, which must be a regular file (a FIFO would block, a device
    never end); a missing or unreadable file is left to the reader to report."""
    from adapterctl.format.files import NotRegularFileError, UnreadableFileError, open_regular

    try:
        with open_regular(path, "weights file") as f:
            head = f.read(_LFS_MAX)
    except NotRegularFileError:
        raise
    except (OSError, AdapterNotFoundError, UnreadableFileError):
        return
    if is_lfs_pointer(head):
        raise lfs_pointer_error(os.fspath(path))


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: Dtype
    shape: tuple[int, ...]
    start: int  # offset of the first byte, relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in the order the header lists them
    metadata: dict[str, str] | None
    data_start: int  # absolute file offset of the data section
    header_bytes: bytes  # the raw JSON (with any padding), as stored

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class _HeaderError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _HeaderError(f"key `{k}` appears more than once")
            seen.add(k)
    return out


def _object(pairs: list[tuple[str, Any]]) -> Any:
    """A parsed JSON object; a usual tensor entry (`dtype`, `shape`, `data_offsets` in the order
    safetensors writes them, a known dtype, lists of u64) as the tuple (dtype, shape, start,
    end): 100k entries then never exist as dicts of lists. JSON parses to no tuple, so a tuple is
    always such an entry (_as_entry turns it back into the object where one is looked at)."""
    if len(pairs) == 3:
        (k0, code), (k1, shape), (k2, offsets) = pairs
        if (
            k0 == "dtype"
            and k1 == "shape"
            and k2 == "data_offsets"
            and type(code) is str
            and type(shape) is list
            and type(offsets) is list
            and len(offsets) == 2
        ):
            dtype = DTYPES.get(code)
            start, end = offsets
            if (
                dtype is not None
                and type(start) is int
                and type(end) is int
                and 0 <= start <= _U64_MAX
                and 0 <= end <= _U64_MAX
                and all(type(d) is int and 0 <= d <= _U64_MAX for d in shape)
            ):
                return (dtype, tuple(shape), start, end)
    return _no_duplicates(pairs)


def _as_entry(value: Any) -> Any:
    """`value` as the parser gave it: a tuple from _object back into its object."""
    if type(value) is tuple:
        dtype, shape, start, end = value
        return {"dtype": dtype.code, "shape": list(shape), "data_offsets": [start, end]}
    return value


#: the integer literal the default parser reads differently from serde: `-0` (literals beyond
#: u64 are found by _check_values, which a scan of the bytes for 20 digits would cost more than)
_SPECIAL_INT = re.compile(rb"-0(?![.0-9eE])")


def _reject_constant(name: str) -> Any:
    raise _HeaderError(f"`{name}` is not valid JSON")


class _NegativeZero(int):
    """`-0`: serde reads it as a float, so it is no size or offset (but fine in ignored fields)."""


_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def _check_big(value: int) -> None:
    try:
        float(value)  # serde reads such a literal as a float: fine unless out of range
    except OverflowError as e:
        raise _HeaderError(f"number {str(value)[:20]}... is out of range") from e


def _parse_int(literal: str) -> int:
    value = int(literal)
    if literal == "-0":
        return _NegativeZero(0)
    if abs(value) > _U64_MAX:
        try:
            float(value)  # serde reads such a literal as a float: fine unless out of range
        except OverflowError as e:
            raise _HeaderError(f"number {literal[:20]}... is out of range") from e
    return value


def _parse_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _HeaderError(f"number {literal[:20]} is out of range")
    return value


_MAX_DEPTH = 127  # serde_json's recursion limit, as safetensors parses the header


#: the only way valid UTF-8 JSON text spells a lone surrogate: a \uD800-\uDFFF escape
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_values(obj: dict[str, Any], raw: bytes) -> None:
    """Every string valid UTF-8 (no lone surrogates), nesting within serde_json's limit, every
    integer beyond u64 readable as a float (as serde reads it).

    Linear in the header and cheap on the usual one: strings are checked only when `raw` holds a
    surrogate escape at all, and a tensor entry's dtype, shape and data_offsets are not walked
    (_tensor_info accepts only a known dtype and lists of u64 there)."""
    strings = _SURROGATE_ESCAPE.search(raw) is not None
    stack: list[tuple[Any, int]] = []
    for k, entry in obj.items():
        if strings:
            _check_str(k, "a key")
        if type(entry) is tuple:  # a usual entry (_object): a known dtype and u64s, 3 deep
            continue
        if type(entry) is dict and k != "__metadata__":
            for field, v in entry.items():
                if field not in _ENTRY_FIELDS or strings:
                    stack.append(({field: v}, 2))
        else:
            stack.append(([entry], 1))
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _HeaderError(f"header JSON is nested more than {_MAX_DEPTH} levels deep")
        if type(value) is dict:
            if strings:
                for k in value:
                    _check_str(k, "a key")
            children = value.values()
        else:
            children = value
        for v in children:
            t = type(v)
            if t is dict or t is list:
                stack.append((v, depth + 1))
            elif t is tuple and depth + 2 > _MAX_DEPTH:  # an entry (_object): lists inside
                raise _HeaderError(f"header JSON is nested more than {_MAX_DEPTH} levels deep")
            elif strings and t is str:
                _check_str(v, "a string")
            elif t is int and not -_U64_MAX <= v <= _U64_MAX:
                _check_big(v)


def _is_uint(v: Any) -> bool:
    return type(v) is int and 0 <= v <= _U64_MAX


def _check_str(s: str, what: str) -> None:
    # JSON may spell a lone surrogate (\ud800) that Python accepts but no UTF-8 string can hold.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _HeaderError(f"{what} is not valid UTF-8") from e


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    # the name is a key: _check_values has checked it is valid UTF-8
    if not isinstance(entry, dict):
        raise _HeaderError(f"entry for tensor `{name}` is not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise _HeaderError(f"tensor `{name}` has no `{field}`")
    code = entry["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _HeaderError(f"tensor `{name}` has unknown dtype {json.dumps(code)}")
    dtype = DTYPES[code]
    shape = entry["shape"]
    if type(shape) is not list or not all(type(d) is int and 0 <= d <= _U64_MAX for d in shape):
        raise _HeaderError(f"tensor `{name}` has an invalid shape {json.dumps(shape)}")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise _HeaderError(f"tensor `{name}` has invalid data_offsets {json.dumps(offsets)}")
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _expected_nbytes(t: TensorInfo) -> int:
    # Same arithmetic as safetensors: element count folded left in u64, then bits, then bytes.
    n = 1
    for d in t.shape:
        n *= d
        if n > _U64_MAX:
            raise _HeaderError(f"tensor `{t.name}`: shape {list(t.shape)} overflows")
    bits = n * t.dtype.bits
    if bits > _U64_MAX:
        raise _HeaderError(f"tensor `{t.name}`: shape {list(t.shape)} overflows")
    if bits % 8:
        raise _HeaderError(
            f"tensor `{t.name}`: {t.dtype.code} data does not end on a byte boundary"
        )
    return bits // 8


def _usual_tensors(obj: dict[str, Any]) -> tuple[dict[str, TensorInfo], int | None]:
    """The tensors of a usual header in one pass: every entry valid, its data the size its
    dtype and shape need, and each following the one before (the order safetensors writes).
    Stops at the first entry that is not so (the careful path, _tensor_info and _check_layout,
    then finds what is wrong with the same messages); the end of the data when all were. Each
    parsed entry is dropped once read, so the parsed header is never held twice."""
    tensors: dict[str, TensorInfo] = {}
    end = 0
    in_order = True
    for name, entry in obj.items():
        if type(entry) is tuple:  # what _object made of a usual entry
            dtype, shape, start, stop = entry
            if start > stop:
                return tensors, None
        else:
            found = _usual_entry(entry)
            if found is None:
                return tensors, None
            dtype, shape, start, stop = found
        n = 1
        for d in shape:
            n *= d
            if n > _U64_MAX:
                return tensors, None
        bits = n * dtype.bits
        if bits > _U64_MAX or bits % 8 or bits // 8 != stop - start:
            return tensors, None
        in_order = in_order and start == end
        end = stop
        tensors[name] = TensorInfo(name, dtype, shape, start, stop)
        obj[name] = None
    return tensors, end if in_order else None


def _usual_entry(entry: Any) -> tuple[Dtype, tuple[int, ...], int, int] | None:
    """A tensor entry object (fields in any order, maybe more of them) valid on its own, as
    _object's tuple; None for anything else."""
    if type(entry) is not dict:
        return None
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = DTYPES.get(code) if type(code) is str else None
    if dtype is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    start, stop = offsets
    if type(start) is not int or type(stop) is not int or not 0 <= start <= stop <= _U64_MAX:
        return None
    if not all(type(d) is int and 0 <= d <= _U64_MAX for d in shape):
        return None
    return dtype, tuple(shape), start, stop


def _check_layout(tensors: dict[str, TensorInfo]) -> int:
    """The data covered from 0 with no gap or overlap, each tensor the size it needs."""
    end = 0
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != end or t.end < t.start:
            raise _HeaderError(
                f"tensor `{t.name}` has data_offsets [{t.start}, {t.end}]: "
                "tensor data must follow each other with no gap or overlap"
            )
        expected = _expected_nbytes(t)
        if t.nbytes != expected:
            raise _HeaderError(
                f"tensor `{t.name}` spans {t.nbytes} bytes but {t.dtype.display_name}{list(t.shape)} "
                f"needs {expected}"
            )
        end = t.end
    return end


def parse_header(raw: bytes, data_size: int) -> Header:
    """Parse and validate a header's JSON bytes against a data section of `data_size` bytes.

    Raises ValueError (with a message naming the problem) when safetensors would reject it.
    """
    with gc_paused():  # its many objects form no cycles: collecting would double the time
        return _parse(raw, data_size)


def _parse(raw: bytes, data_size: int) -> Header:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _HeaderError(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_object,
            parse_constant=_reject_constant,
            # the int hook costs a call per number: only when a literal needs it
            parse_int=_parse_int if _SPECIAL_INT.search(raw) else None,
            parse_float=_parse_float,
        )
    except _HeaderError:
        raise
    except json.JSONDecodeError as e:
        raise _HeaderError(f"header is not valid JSON ({e.msg} at character {e.pos})") from e
    except ValueError as e:  # e.g. an integer literal with more digits than Python converts
        raise _HeaderError(f"header is not valid JSON ({e})") from e
    except RecursionError as e:
        raise _HeaderError("header JSON is nested too deeply") from e
    except MemoryError as e:  # a legal (<= 100 MB) header of tiny values parses to many objects
        raise _HeaderError(
            f"its {len(raw)}-byte header needs more memory to parse than is available"
        ) from e
    del text  # a 10 MB header's decoded copy is not needed while its objects are built
    obj = _as_entry(obj)
    if not isinstance(obj, dict):
        raise _HeaderError("header is not a JSON object")
    _check_values(obj, raw)
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _HeaderError("`__metadata__` is not a map of strings to strings")
        for k, v in metadata.items():
            _check_str(k, "a metadata key")
            _check_str(v, "a metadata value")
    tensors, end = _usual_tensors(obj)
    if end is None:  # from the first unusual entry on, the careful path (an error, most likely)
        for name, entry in obj.items():
            if name not in tensors:
                tensors[name] = _tensor_info(name, _as_entry(entry))
        end = _check_layout(tensors)
    del obj  # the parsed entries: TensorInfo holds what is kept
    if end != data_size:
        raise _HeaderError(
            f"the header describes {end} bytes of tensor data but the file holds {data_size}"
        )
    return Header(tensors, metadata, 8 + len(raw), raw)


def read_header_from(f: BinaryIO, size: int, label: str) -> Header:
    """Read and validate the header of an open file of `size` bytes; `label` names it in errors."""
    check_not_lfs_pointer(f, label)  # not "header length 8387229609067849078 exceeds ..."
    try:
        if size < 8:
            raise _HeaderError(f"file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_SIZE:
            raise _HeaderError(f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
        if 8 + n > size:
            raise _HeaderError(f"header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
        if len(raw) != n:
            raise _HeaderError("file was truncated while reading")
        return parse_header(raw, size - 8 - n)
    except _HeaderError as e:
        raise AdapterFormatError(
            f"`{label}` is not a valid safetensors file: {e}",
            hint="the file may be truncated or corrupted; re-save or re-download it",
        ) from e


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at `path`."""
    from adapterctl.format.files import open_regular

    try:
        with open_regular(path, "weights file") as f:
            size = os.fstat(f.fileno()).st_size
            return read_header_from(f, size, os.fspath(path))
    except OSError as e:
        raise AdapterFormatError(f"cannot read `{os.fspath(path)}`: {e.strerror}") from e
