"""Our safetensors writer against safetensors' own serializer, byte for byte, and read back."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adapterctl.errors import AdapterFormatError
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.tensors import (
    PT_METADATA,
    SafetensorsReader,
    TensorSource,
    write_safetensors,
)

# Every dtype that both sides can write from a numpy buffer: numpy_name is the buffer's layout
# (bfloat16/float8 as raw unsigned integers), torch_name the name safetensors' TensorSpec takes.
# F4/F6 are left out: TensorSpec has no F6 and counts F4 per byte pair.
SPEC_NAMES = {
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
    "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e8m0fnu", "complex64",
}  # fmt: skip
CODES = sorted(c for c, d in DTYPES.items() if d.numpy_name and d.torch_name in SPEC_NAMES)
# The ones the brief names first; numpy.save can write those whose numpy dtype is the real one.
CORE = ["F32", "F16", "I64", "U8", "BOOL", "BF16"]
NUMPY_NATIVE = [c for c in CODES if np.dtype(DTYPES[c].numpy_name).name == DTYPES[c].torch_name]
# Names from a tiny alphabet share prefixes and straddle the UTF-16 / UTF-8 order difference
# (U+FFFF sorts before U+1F600 in UTF-8 and after it in UTF-16); the writer must sort by UTF-8.
NAMES = st.text(alphabet="a\u00e9\uffff\U0001f600", max_size=3) | st.text(max_size=8).filter(
    lambda s: s != "__metadata__"
)

Tensors = dict[str, tuple[str, np.ndarray]]  # name -> (safetensors code, raw little-endian array)


@st.composite
def tensor_dicts(draw, codes: list[str] = CODES, max_size: int = 6) -> Tensors:
    # Bias towards the brief's dtypes, but cover every one.
    pool = st.sampled_from([c for c in CORE if c in codes]) | st.sampled_from(codes)
    names = draw(st.lists(NAMES, max_size=max_size, unique=True))
    out: Tensors = {}
    for name in names:
        code = draw(pool)
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        arr = draw(hnp.arrays(np.dtype(DTYPES[code].numpy_name), shape))
        out[name] = (code, np.ascontiguousarray(arr))
    return out


METADATA = st.sampled_from([PT_METADATA, None, {}]) | st.dictionaries(
    st.text(max_size=6), st.text(max_size=6), min_size=1, max_size=1
)  # safetensors orders several metadata keys at random (a Rust HashMap): one key at most here


def sources(tensors: Tensors) -> list[TensorSource]:
    return [
        TensorSource(name, DTYPES[code], arr.shape, lambda arr=arr: arr.tobytes())
        for name, (code, arr) in tensors.items()
    ]


def ours(
    tensors: Tensors, metadata: dict[str, str] | None, order: list[int] | None = None
) -> bytes:
    srcs = sources(tensors)
    if order is not None:
        srcs = [srcs[i] for i in order]
    f = io.BytesIO()
    n = write_safetensors(f, srcs, metadata)
    out = f.getvalue()
    assert n == len(out)
    return out


def reference(tensors: Tensors, metadata: dict[str, str] | None) -> bytes:
    """safetensors.serialize over the same buffers (the arrays stay alive in `tensors`)."""
    specs = {
        name: safetensors.TensorSpec(
            dtype=DTYPES[code].torch_name,
            shape=list(arr.shape),
            data_ptr=arr.ctypes.data,
            data_len=arr.nbytes,
        )
        for name, (code, arr) in tensors.items()
    }
    return bytes(safetensors.serialize(specs, metadata=metadata))


@given(tensors=tensor_dicts(), metadata=METADATA, data=st.data())
def test_bytes_equal_safetensors_serialize(
    tensors: Tensors, metadata: dict[str, str] | None, data: st.DataObject
) -> None:
    expected = reference(tensors, metadata)
    if not tensors and metadata == {}:
        # safetensors 0.8.0 writes the invalid header `{},"__metadata__":{}}` here (reported);
        # ours is the one its own serializer writes whenever there is a tensor or a metadata key.
        assert expected[8:].rstrip(b" ") == b'{},"__metadata__":{}}'
        expected = struct.pack("<Q", 24) + b'{"__metadata__":{}}'.ljust(24)
        assert safetensors.deserialize(expected) == []
    assert ours(tensors, metadata) == expected
    # The order tensors are handed over in does not matter.
    order = data.draw(st.permutations(range(len(tensors))), label="order")
    assert ours(tensors, metadata, order) == expected


@given(tensors=tensor_dicts(NUMPY_NATIVE))
def test_bytes_equal_safetensors_numpy_save(tensors: Tensors) -> None:
    arrays = {name: arr for name, (_, arr) in tensors.items()}
    expected = safetensors.numpy.save(arrays, metadata={"format": "pt"})
    assert ours(tensors, PT_METADATA) == expected


@settings(max_examples=20)
@given(tensors=tensor_dicts(CORE))
def test_bytes_equal_safetensors_torch_save(tensors: Tensors) -> None:
    import safetensors.torch
    import torch

    as_torch = {
        name: torch.from_numpy(arr.copy()).view(getattr(torch, DTYPES[code].torch_name))
        for name, (code, arr) in tensors.items()
    }
    expected = safetensors.torch.save(as_torch, metadata={"format": "pt"})
    assert ours(tensors, PT_METADATA) == expected


@settings(max_examples=50)
@given(tensors=tensor_dicts(), metadata=METADATA)
def test_reader_round_trips_what_we_write(
    tensors: Tensors, metadata: dict[str, str] | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path: Path = tmp_path_factory.mktemp("w") / "adapter_model.safetensors"
    path.write_bytes(ours(tensors, metadata))
    with SafetensorsReader(path) as r:
        assert set(r.tensors) == set(tensors)
        assert r.header.metadata == metadata
        for name, (code, arr) in tensors.items():
            info = r.tensors[name]
            assert (info.dtype.code, info.shape) == (code, arr.shape)
            assert r.read_bytes(name) == arr.tobytes()
            buffer = bytearray(b"\xff" * (arr.nbytes + 3))  # one buffer, larger than needed
            assert bytes(r.read_into(name, buffer)) == arr.tobytes()
            got: Any = r.array(name)
            assert got.dtype == arr.dtype
            assert got.shape == arr.shape
            assert got.tobytes() == arr.tobytes()  # NaN-safe equality


def test_writer_rejects_repeated_names_and_wrong_sizes() -> None:
    a = np.zeros(2, np.float32)
    same = TensorSource("w", DTYPES["F32"], (2,), a.tobytes)
    with pytest.raises(AdapterFormatError, match="same name"):
        write_safetensors(io.BytesIO(), [same, same])
    short = TensorSource("w", DTYPES["F32"], (3,), a.tobytes)
    with pytest.raises(AdapterFormatError, match="expected 12"):
        write_safetensors(io.BytesIO(), [short])


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "read-write"])
def test_a_span_of_another_file_is_copied_whole(
    tmp_path: Path, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor given as a span of an open safetensors file (what `merge` copies untouched) is
    written byte for byte among ordinary tensors, by the kernel or, where it refuses (another
    filesystem, an old kernel), through a buffer; progress counts every byte."""
    import errno
    import os

    rng = np.random.default_rng(3)
    big = rng.standard_normal((700, 1300)).astype(np.float32)  # not a multiple of any chunk
    small = rng.standard_normal((3, 5)).astype(np.float32)
    src = tmp_path / "src.safetensors"
    safetensors.numpy.save_file({"big": big}, str(src))
    if not kernel:

        def refuse(*args: Any) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    counted: list[int] = []
    with SafetensorsReader(src) as reader:
        span = reader.span("big")
        f32 = DTYPES["F32"]
        sources = [
            TensorSource("a.big", f32, big.shape, lambda: iter([span])),
            TensorSource("b.small", f32, small.shape, small.tobytes),
        ]
        with open(tmp_path / "out.safetensors", "wb") as f:
            total = write_safetensors(f, sources, progress=counted.append)
            assert f.tell() == total
    loaded = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    assert np.array_equal(loaded["a.big"], big)
    assert np.array_equal(loaded["b.small"], small)
    assert sum(counted) == big.nbytes + small.nbytes


def test_an_array_is_one_piece_and_an_iterator_is_pieces(tmp_path: Path) -> None:
    """`data()` may give the bytes at once (bytes, a memoryview, a numpy array) or an iterator of
    pieces; an array is never taken for pieces (iterating it would walk its rows)."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    f32 = DTYPES["F32"]
    sources = [
        TensorSource("array", f32, a.shape, lambda: a),
        TensorSource("pieces", f32, a.shape, lambda: iter([a[:1].tobytes(), a[1:].tobytes()])),
    ]
    with open(tmp_path / "out.safetensors", "wb") as f:
        write_safetensors(f, sources)
    loaded = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    assert np.array_equal(loaded["array"], a)
    assert np.array_equal(loaded["pieces"], a)
