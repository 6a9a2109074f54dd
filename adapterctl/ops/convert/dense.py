"""A weight change given whole (d_out x d_in, float64) written as plain LoRA factors with scaling 1:
B (d_out x k) · A (k x d_in). One rule for every whole-matrix change: `--dora-to-lora`'s
W_dora - W, `--embeddings-to-lora`'s copy - base, `extract`'s TUNED - BASE.

- Only the change's support is factored: the rows and columns that hold a nonzero value. Its rank
  is at most `support` = min(changed rows, changed columns); that many factors are always exact.
- No target (`Target()`): exact, at rank `support`, without an SVD: the changed rows beside a
  one-hot B, or the changed columns beside a one-hot A (a dense change: itself beside an identity).
- `rank=N`: the best rank-min(N, d_out, d_in) approximation (exact where N >= support; zero-padded
  past the change's own rank). A rank above min(d_out, d_in) is that full rank (`Factored.capped`).
- `energy=E` (with `max_rank`): the smallest rank keeping the fraction E of ||ΔW||²_F.
- The SVD: exact (LAPACK, of the support only), or for a rank small against the support a
  randomized range finder (Halko, Martinsson and Tropp 2011, algorithm 4.4: Gaussian test
  matrix from `numpy.random.default_rng(seed)`, oversampling, power iterations with
  re-orthonormalisation). Its reported error is exact either way: B·A is the orthogonal
  projection of ΔW onto span(B), so ||ΔW - B·A||² = ||ΔW||² - ||B·A||². `exact=True` forces LAPACK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adapterctl.ops.convert.blas import one_blas_thread
from adapterctl.ops.convert.lowrank import Spectrum, energy_rank

Array = Any

#: randomized when the wanted rank (plus oversampling) is at most this fraction of the support
RANDOMIZED_BELOW = 0.25
#: supports smaller than this always take the exact SVD (it is cheap there)
RANDOMIZED_FROM = 256
OVERSAMPLE = 10
POWER_ITERATIONS = 4


@dataclass(frozen=True)
class Target:
    """The rank a change is written at: exact (neither), `rank`, or `energy` (up to `max_rank`);
    `exact` forces LAPACK's SVD; `seed` seeds the randomized range finder."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    exact: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Factored:
    """B (d_out x rank), A (rank x d_in), float64, scaling 1, and what the cut cost."""

    b: Array
    a: Array
    support: int  # min(changed rows, changed columns): the rank that is always exact
    full: int  # min(d_out, d_in)
    energy: float  # the fraction of ||ΔW||² kept
    relative_error: float  # ||ΔW - B·A|| / ||ΔW||
    method: str  # "exact" (no SVD), "svd" or "randomized"
    capped: bool  # a rank above `full` was asked for and `full` was written

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def _support(delta: Array) -> tuple[Array, Array]:
    import numpy as np

    nonzero = delta != 0
    return np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))


def _exact(delta: Array, rows: Array, cols: Array, k: int) -> tuple[Array, Array]:
    """Rank-k factors (k >= the support) with B·A == ΔW exactly: the changed rows beside a one-hot
    B, or the changed columns beside a one-hot A; zero-padded to k."""
    import numpy as np

    d_out, d_in = delta.shape
    b, a = np.zeros((d_out, k)), np.zeros((k, d_in))
    if len(rows) <= len(cols):
        b[rows, np.arange(len(rows))] = 1.0
        a[: len(rows)] = delta[rows]
    else:
        b[:, : len(cols)] = delta[:, cols]
        a[np.arange(len(cols)), cols] = 1.0
    return b, a


def _randomized(x: Array, width: int, seed: int) -> Spectrum:
    """An approximate SVD of x from a `width`-dimensional range (algorithm 4.4 of Halko et al.)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(x @ rng.standard_normal((x.shape[1], width)))
    for _ in range(POWER_ITERATIONS):
        w, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ w)
    u, values, vh = np.linalg.svd(q.T @ x, full_matrices=False)
    return Spectrum(values, q @ u, vh)


def _lapack(x: Array) -> Spectrum:
    import numpy as np

    u, values, vh = np.linalg.svd(x, full_matrices=False)
    return Spectrum(values, u, vh)


def _wanted(target: Target, full: int) -> int | None:
    """The rank asked for, capped at `full`; None for an energy target."""
    if target.energy is not None:
        return None
    return min(target.rank, full) if target.rank is not None else None


def _cut(values: Array, total: float, target: Target, full: int) -> int | None:
    """The rank an energy target keeps from these singular values (None: they do not reach it)."""
    assert target.energy is not None
    cap = min(target.max_rank or full, full)
    if total == 0.0:
        return 1
    found = energy_rank(values, total, target.energy)
    if found is not None:
        return min(found, cap)
    return cap if len(values) >= cap else None


def _spectrum(x: Array, target: Target, total: float, support: int) -> tuple[Spectrum, int, str]:
    """The spectrum of the support block x, the rank to keep, and how it was computed."""
    full = support
    k = _wanted(target, full)
    small = target.exact or support < RANDOMIZED_FROM
    if k is not None:
        width = min(k + OVERSAMPLE, support)
        if small or width > RANDOMIZED_BELOW * support:
            return _lapack(x), k, "svd"
        with one_blas_thread():  # thin products: threads only wait on each other
            return _randomized(x, width, target.seed), k, "randomized"
    width = min(2 * OVERSAMPLE, support)  # an energy target: widen until the cut is reached
    while not small and width <= RANDOMIZED_BELOW * support:
        with one_blas_thread():
            spec = _randomized(x, width, target.seed)
        cut = _cut(spec.values, total, target, full)
        if cut is not None and cut + OVERSAMPLE <= width:
            return spec, cut, "randomized"
        width *= 2
    spec = _lapack(x)
    cut = _cut(spec.values, total, target, full)
    return spec, cut if cut is not None else full, "svd"


def factor(delta: Array, target: Target = Target()) -> Factored:
    """ΔW (d_out x d_in, float64, finite) as B·A at the rank `target` asks for."""
    import numpy as np

    d_out, d_in = delta.shape
    full = min(d_out, d_in)
    capped = target.rank is not None and target.rank > full
    rows, cols = _support(delta)
    support = min(len(rows), len(cols))
    wanted = _wanted(target, full)
    if support == 0 or (target.energy is None and (wanted is None or wanted >= support)):
        k = max(1, support if wanted is None else wanted)
        b, a = _exact(delta, rows, cols, k)
        return Factored(b, a, support, full, 1.0, 0.0, "exact", capped)
    d_full = len(rows) == d_out and len(cols) == d_in
    block = delta if d_full else delta[np.ix_(rows, cols)]  # no copy of a dense change
    total = float(np.einsum("ij,ij->", block, block))  # no temporary the size of the change
    spec, k, method = _spectrum(block, target, total, support)
    k = max(1, k)
    tb, ta = spec.transforms(k)
    b, a = np.zeros((d_out, k)), np.zeros((k, d_in))
    b[rows], a[:, cols] = tb, ta
    kept = float((spec.values[:k] ** 2).sum())
    # LAPACK gives every singular value: the dropped ones are summed directly; the randomized
    # B·A projects ΔW onto span(B), so what it misses is the rest of ||ΔW||²
    dropped = float((spec.values[k:] ** 2).sum()) if method == "svd" else max(total - kept, 0.0)
    energy = 1.0 if total == 0.0 else min(kept / total, 1.0)
    error = math.sqrt(dropped / total) if total else 0.0
    return Factored(b, a, support, full, energy, error, method, capped)
