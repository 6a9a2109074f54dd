"""ops/convert/dense.py: a whole weight change as LoRA factors, against LAPACK's dense SVD.

The randomized range finder's error bound (Halko, Martinsson and Tropp 2011, section 10: with
oversampling and q power iterations the error approaches the optimal sigma_{k+1..}), as a property
over low-rank-plus-noise matrices with random spectra; and what every path must give: the error it
reports is the error its factors have, exact paths are exact, energy targets keep their energy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterctl.ops.convert.dense import RANDOMIZED_FROM, Target, factor


def _matrix(seed: int, shape: tuple[int, int], rank: int, decay: float, noise: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], rank)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], rank)))
    values = decay ** np.arange(rank)
    return (u * values) @ v.T + noise * rng.standard_normal(shape)


def _optimal(delta: np.ndarray, k: int) -> float:
    values = np.linalg.svd(delta, compute_uv=False)
    return float(np.sqrt((values[k:] ** 2).sum() / (values**2).sum()))


def _actual(delta: np.ndarray, f) -> float:
    return float(np.linalg.norm(delta - f.b @ f.a) / np.linalg.norm(delta))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(RANDOMIZED_FROM, 420),
    cols=st.integers(RANDOMIZED_FROM, 420),
    rank=st.integers(1, 40),
    k=st.integers(1, 40),
    decay=st.floats(0.5, 1.0),
    noise=st.sampled_from([0.0, 1e-4, 1e-2, 1.0]),
)
def test_randomized_error_is_near_optimal_and_reported_exactly(
    seed: int, rows: int, cols: int, rank: int, k: int, decay: float, noise: float
) -> None:
    delta = _matrix(seed, (rows, cols), rank, decay, noise)
    f = factor(delta, Target(rank=k, seed=seed))
    assert f.method == "randomized"
    assert (f.rank, f.b.shape, f.a.shape) == (k, (rows, k), (k, cols))
    optimal, actual = _optimal(delta, k), _actual(delta, f)
    assert actual == pytest.approx(f.relative_error, rel=1e-6, abs=1e-7)
    # Halko et al. (10.8) with q = 4 power iterations and 10 extra columns: within a few percent
    assert actual <= 1.05 * optimal + 1e-7
    assert f.energy == pytest.approx(1 - actual**2, abs=1e-9)


def test_the_same_seed_gives_the_same_factors_and_exact_forces_lapack() -> None:
    delta = _matrix(7, (300, 280), 30, 0.9, 1e-3)
    one, two = factor(delta, Target(rank=8, seed=3)), factor(delta, Target(rank=8, seed=3))
    assert np.array_equal(one.b, two.b)
    assert np.array_equal(one.a, two.a)
    lapack = factor(delta, Target(rank=8, exact=True))
    assert lapack.method == "svd"
    assert lapack.relative_error == pytest.approx(_optimal(delta, 8), rel=1e-9)
    assert lapack.relative_error <= one.relative_error <= 1.05 * lapack.relative_error


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 0.999999])
@pytest.mark.parametrize("size", [(40, 30), (400, 300)])
def test_energy_targets_keep_their_energy_at_the_smallest_rank(energy, size) -> None:
    delta = _matrix(11, size, 25, 0.8, 1e-4)
    f = factor(delta, Target(energy=energy))
    values = np.linalg.svd(delta, compute_uv=False)
    kept = np.cumsum(values**2) / (values**2).sum()
    smallest = int(np.searchsorted(kept, energy * (1 - 1e-12)) + 1)
    assert f.rank == smallest
    assert 1 - _actual(delta, f) ** 2 >= energy * (1 - 1e-9)
    capped = factor(delta, Target(energy=energy, max_rank=2))
    assert capped.rank == min(2, smallest)


def test_no_target_is_exact_at_the_support_without_an_svd() -> None:
    rng = np.random.default_rng(0)
    delta = np.zeros((50, 20))
    delta[[3, 17, 41]] = rng.standard_normal((3, 20))  # three changed rows: rank <= 3
    f = factor(delta)
    assert (f.method, f.rank, f.support) == ("exact", 3, 3)
    assert np.array_equal(f.b @ f.a, delta)
    delta = np.zeros((20, 50))
    delta[:, [0, 9]] = rng.standard_normal((20, 2))  # two changed columns
    f = factor(delta)
    assert (f.rank, f.support) == (2, 2)
    assert np.array_equal(f.b @ f.a, delta)
    dense = rng.standard_normal((12, 9))
    f = factor(dense)
    assert (f.rank, f.full) == (9, 9)
    assert np.array_equal(f.b @ f.a, dense)


def test_ranks_at_or_above_the_support_are_exact_and_padded_above_full_is_full() -> None:
    rng = np.random.default_rng(1)
    delta = np.zeros((30, 40))
    delta[[1, 2, 5, 8]] = rng.standard_normal((4, 40))
    f = factor(delta, Target(rank=6))
    assert (f.rank, f.method, f.capped) == (6, "exact", False)
    assert np.array_equal(f.b @ f.a, delta)
    f = factor(delta, Target(rank=100))
    assert (f.rank, f.capped) == (30, True)
    assert np.array_equal(f.b @ f.a, delta)
    f = factor(delta, Target(rank=2))  # below the support: the SVD of the 4 changed rows only
    assert (f.method, f.rank) == ("svd", 2)
    assert f.relative_error == pytest.approx(_optimal(delta, 2), rel=1e-9)
    assert not f.b[[0, 3, 4, 6, 7, 9]].any()


def test_a_zero_change_is_one_zero_factor() -> None:
    f = factor(np.zeros((8, 5)), Target(rank=3))
    assert f.rank == 3
    assert not f.b.any()
    assert not f.a.any()
    f = factor(np.zeros((8, 5)))
    assert (f.rank, f.energy, f.relative_error) == (1, 1.0, 0.0)
