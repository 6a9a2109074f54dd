"""dtype casts against torch's `.to()` on random bit patterns (inf, subnormals and NaN included),
and rank reduction against the dense SVD."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adapterctl.format.dtypes import DTYPES
from adapterctl.format.rawtensor import RawTensor, cast
from adapterctl.ops.convert.lowrank import gram, spectrum

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
BITS = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "F64": np.uint64}
SPECIALS = {  # +-0, +-inf, NaN, the smallest subnormal, the largest finite, rounding ties
    "F32": [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 1, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x477FF000],
    "F16": [0, 0x8000, 0x7C00, 0xFC00, 0x7E00, 1, 0x7BFF, 0x3C01],
    "BF16": [0, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 1, 0x7F7F, 0x3F81],
    "F64": [0, 1 << 63, 0x7FF0000000000000, 0x7FF8000000000000, 1, 0x3FF0000010000000, 0x3FF0000000001000],
}  # fmt: skip
PAIRS = [(a, b) for a in TORCH for b in ("F32", "F16", "BF16") if a != b]


@st.composite
def bit_patterns(draw: st.DrawFn, code: str) -> np.ndarray:
    bits = BITS[code]
    random = draw(hnp.arrays(bits, st.integers(1, 64), elements=st.integers(0, np.iinfo(bits).max)))
    return np.concatenate([random, np.array(SPECIALS[code], dtype=bits)])


@given(st.data())
def test_casts_round_like_torch(data: st.DataObject) -> None:
    src, dst = data.draw(st.sampled_from(PAIRS))
    bits = data.draw(bit_patterns(src))
    t = RawTensor(DTYPES[src], (len(bits),), bits.view(np.dtype(DTYPES[src].numpy_name)))
    ours = cast(t, dst)
    assert ours.dtype.code == dst
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    source = torch.from_numpy(bits.view(np.dtype(f"i{bits.itemsize}"))).view(TORCH[src])
    theirs = source.to(TORCH[dst])
    ours_t = torch.frombuffer(bytearray(ours.buffer()), dtype=torch.uint8).view(TORCH[dst])
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours_t), nan)  # a NaN stays a NaN (payload unspecified)
    width = as_int[torch.finfo(TORCH[dst]).bits // 8]
    assert torch.equal(ours_t[~nan].view(width), theirs[~nan].view(width))


@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    r=st.integers(1, 6),
    k=st.integers(1, 6),
    scaling=st.floats(0.01, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_reduction_is_the_best_rank_k(
    m: int, n: int, r: int, k: int, scaling: float, seed: int
) -> None:
    """Factored SVD = dense SVD: the kept factors are the Eckart-Young optimum, the dropped norm
    is the real error, and the factored norm equals the dense one."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((m, r)) * rng.uniform(0.01, 10)
    a = rng.standard_normal((r, n))
    dense = scaling * b @ a
    spec = spectrum(b, a, scaling)
    new_b, new_a, kept, dropped = spec.truncate(k, b, a)
    values = np.linalg.svd(dense, compute_uv=False)
    norm = float(np.linalg.norm(dense))
    tol = 1e-9 * norm + 1e-12
    factored = math.sqrt(
        float((gram([(b, scaling, False)], "B") * gram([(a, 1.0, False)], "A")).sum())
    )
    assert abs(factored - norm) <= tol  # the Gram route --verify takes
    assert np.allclose(spec.values, values[: len(spec.values)], rtol=1e-9, atol=tol)
    error = float(np.linalg.norm(dense - new_b @ new_a))
    optimum = math.sqrt(float((values[k:] ** 2).sum()))
    assert abs(error - optimum) <= tol * 10
    assert abs(dropped - optimum) <= tol * 10
    assert 0.0 <= kept <= 1.0 + 1e-12
    assert new_b.shape[1] == new_a.shape[0] == k  # zero-padded past the delta's rank
