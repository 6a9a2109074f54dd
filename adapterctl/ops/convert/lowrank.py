"""Low-rank deltas from their factors alone: a factored SVD to cut the rank, and Gram matrices for
Frobenius norms of products, without ever building the full (out, in) matrix, and with memory
bounded by the factors themselves (the long dimension is processed in chunks, in float64).

s·B·A with B (m, r) and A (r, n): B = Qb·Rb and Aᵀ = Qa·Ra (thin QR: R is the Cholesky factor of
the r x r Gram matrix, summed chunk by chunk, refined by a second pass where the factor is not
well-conditioned; Householder for a rank-deficient one),
so s·B·A = Qb·(s·Rb·Raᵀ)·Qaᵀ, and the SVD of the small r x r middle gives the SVD of the delta. The
singular vectors are kept as small transforms of B and A (Qb = B·Rb⁻¹), applied in chunks when
the reduced factors are written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]

#: elements of the long dimension per chunk (float64: 32 MiB)
BUDGET = 1 << 22


def _chunks(x: Array, side: str, width: int) -> Iterator[tuple[slice, Array]]:
    """Float64 pieces of x along its long dimension: rows of B (side "B"), columns of A."""
    import numpy as np

    length = x.shape[0 if side == "B" else 1]
    step = max(1, BUDGET // max(width, 1))
    for start in range(0, length, step):
        where = slice(start, start + step)
        yield where, (x[where] if side == "B" else x[:, where]).astype(np.float64, copy=False)


#: Cholesky QR's R is accurate to about unit roundoff x cond(M)²: one pass where the factor's
#: condition number is below this (float64: 1e-10 relative), else a second pass (CholeskyQR2,
#: as accurate as Householder QR up to cond(M) ~ 1e8; its first pass then leaves Q1 = M·R1⁻¹
#: nearly orthonormal, R2 within _NEAR_IDENTITY of the identity), else Householder
_ONE_PASS_COND = 1e3
_NEAR_IDENTITY = 1e-2


def _gram_of(x: Array, side: str, r: int, right: Array | None = None) -> Array:
    """Mᵀ·M for M = B (side "B") or Aᵀ, or for M·right: r x r, summed over float64 chunks."""
    import numpy as np

    g = np.zeros((r, r))
    for _, piece in _chunks(x, side, r):
        block = piece if side == "B" else piece.T
        if right is not None:
            block = block @ right
        g += block.T @ block
    return g


def _cholesky_r(g: Array) -> Array | None:
    """Upper R with Rᵀ·R = g, or None where g is not (numerically) positive definite."""
    import numpy as np

    try:
        r = np.linalg.cholesky(g).T
    except np.linalg.LinAlgError:
        return None
    return r if np.isfinite(r).all() else None


def _svd(tri: Array) -> tuple[Array, Array]:
    import numpy as np

    _, values, vt = np.linalg.svd(tri, full_matrices=False)
    return values, vt


def _cholesky_svd(x: Array, side: str, r: int) -> tuple[Array, Array] | None:
    """(singular values, right singular vectors ᵀ) of M, as the SVD of R (M = Q·R) gives them:
    from the eigendecomposition of the Gram matrix MᵀM where M is well-conditioned (the same
    accuracy as one pass of Cholesky QR), else from CholeskyQR2; None where M is rank-deficient
    or too ill-conditioned for either."""
    import numpy as np

    g = _gram_of(x, side, r)
    if np.isfinite(g).all():
        squares, vectors = np.linalg.eigh(g)  # ascending: R's singular values squared
        if squares[0] > 0 and squares[0] * _ONE_PASS_COND**2 >= squares[-1]:
            return np.sqrt(squares[::-1]), vectors[:, ::-1].T
    r1 = _cholesky_r(g)
    if r1 is None:
        return None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        inverse = np.linalg.inv(r1)
    if not np.isfinite(inverse).all():
        return None
    r2 = _cholesky_r(_gram_of(x, side, r, inverse))  # of Q1 = M·R1⁻¹
    if r2 is None or np.abs(r2 - np.eye(r)).max() > _NEAR_IDENTITY:
        return None
    return _svd(r2 @ r1)


def basis(x: Array, side: str) -> tuple[Array, Array]:
    """(v, s) with B = Q·diag(s)·vᵀ (or Aᵀ = Q·diag(s)·vᵀ), Q orthonormal, s > 0 only: the R of
    a thin QR (Cholesky QR from r x r Gram matrices, BLAS-3; a chunked Householder QR, TSQR,
    for a rank-deficient or ill-conditioned factor), then the SVD of that r x r triangle."""
    import numpy as np

    r = x.shape[1] if side == "B" else x.shape[0]
    found = _cholesky_svd(x, side, r)
    if found is None:
        tri = np.zeros((0, r))
        for _, piece in _chunks(x, side, r):
            block = piece if side == "B" else piece.T
            stacked: Any = np.linalg.qr(np.vstack([tri, block]), mode="r")  # R only
            tri = stacked
        found = _svd(tri)
    values, vt = found
    keep = values > (values[0] * 1e-13 if len(values) and values[0] > 0 else np.inf)
    return vt[keep].T, values[keep]


def energy_rank(values: Array, total: float, fraction: float) -> int | None:
    """The smallest rank whose singular values (descending) keep `fraction` of `total` (the
    squared norm of the whole change, 1e-12 relative slack for rounding); None where these
    values do not reach it (a randomized SVD's leading values only)."""
    import numpy as np

    kept = np.cumsum(values**2) / total
    first = int(np.searchsorted(kept, fraction * (1 - 1e-12)))
    return first + 1 if first < len(values) else None


@dataclass(frozen=True)
class Spectrum:
    """s·B·A = (B·to_b)·diag(values)·(to_a·A): the singular values, descending, and the small
    transforms that give the singular vectors from the factors."""

    values: Array
    to_b: Array  # (r, K)
    to_a: Array  # (K, r)

    @property
    def energy(self) -> float:
        return float((self.values**2).sum())

    def rank_for_energy(self, fraction: float) -> int:
        """The smallest rank that keeps `fraction` of the energy (at least 1)."""
        if self.energy == 0.0 or not len(self.values):
            return 1
        found = energy_rank(self.values, self.energy, fraction)
        return len(self.values) if found is None else found

    def transforms(self, k: int) -> tuple[Array, Array]:
        """(r, k) and (k, r): B·tb and ta·A are the rank-k B', A' (scaling 1, exactly k wide:
        zero-padded past the delta's own rank)."""
        import numpy as np

        n = min(k, len(self.values))
        root = np.sqrt(self.values[:n])
        tb = np.zeros((self.to_b.shape[0], k))
        tb[:, :n] = self.to_b[:, :n] * root
        ta = np.zeros((k, self.to_a.shape[1]))
        ta[:n] = root[:, None] * self.to_a[:n]
        return tb, ta

    def loss(self, k: int) -> tuple[float, float]:
        """The energy a rank-k cut keeps (a fraction) and the Frobenius norm it drops."""
        total = self.energy
        dropped = float((self.values[min(k, len(self.values)) :] ** 2).sum())
        kept = 1.0 if total == 0.0 else (total - dropped) / total
        return kept, math.sqrt(dropped)

    def truncate(self, k: int, b: Array, a: Array) -> tuple[Array, Array, float, float]:
        """B', A' (float64) of the best rank-k approximation, the energy kept, the norm dropped."""
        tb, ta = self.transforms(k)
        return (apply(b, tb, "B"), apply(a, ta, "A"), *self.loss(k))

    @classmethod
    def from_bases(
        cls, b: tuple[Array, Array], a: tuple[Array, Array], scaling: float, r: int
    ) -> Spectrum:
        """From `basis` of B and of A (each computed while only that factor is in memory)."""
        import numpy as np

        (vb, sb), (va, sa) = b, a
        if not len(sb) or not len(sa):  # a zero factor: a zero delta
            return cls(np.zeros(1), np.zeros((r, 1)), np.zeros((1, r)))
        with np.errstate(over="ignore", invalid="ignore"):
            middle = scaling * ((sb[:, None] * vb.T) @ (va * sa))
        if not np.isfinite(middle).all():  # an overflowing scaling: factors that are not finite
            k = min(len(sb), len(sa))  # (refused where they are produced: plan.py)
            return cls(np.full(k, np.inf), np.full((r, k), np.nan), np.full((k, r), np.nan))
        u, values, wt = np.linalg.svd(middle, full_matrices=False)
        return cls(values, (vb / sb) @ u, wt @ (va / sa).T)


def apply(x: Array, t: Array, side: str) -> Array:
    """x·t for B (m x r, t: r x k) or t·x for A (r x n, t: k x r), in float64 chunks."""
    import numpy as np

    if side == "B":
        out = np.empty((x.shape[0], t.shape[1]))
        for where, piece in _chunks(x, "B", x.shape[1]):
            out[where] = piece @ t
    else:
        out = np.empty((t.shape[0], x.shape[1]))
        for where, piece in _chunks(x, "A", x.shape[0]):
            out[:, where] = t @ piece
    return out


def spectrum(b: Array, a: Array, scaling: float) -> Spectrum:
    """The SVD of scaling·b·a from a chunked QR of each factor and an r x r SVD; b and a may be
    any float dtype (they are read in float64 chunks, never copied whole)."""
    return Spectrum.from_bases(basis(b, "B"), basis(a, "A"), scaling, b.shape[1])


def gram(parts: list[tuple[Array, float, bool]], side: str, budget: int = 1 << 22) -> Array:
    """The Gram matrix, in float64, of stacked factors (x, c, absolute): side "B" stacks c·x
    (or c·|x|) side by side (m x r_i each) and gives PᵀP; side "A" stacks them on top of each
    other (r_i x n) and gives Q·Qᵀ. Summed over chunks of about `budget` elements of the long
    dimension: never a float64 copy of a whole factor."""
    import numpy as np

    rank = sum(x.shape[1] if side == "B" else x.shape[0] for x, _, _ in parts)
    length = parts[0][0].shape[0 if side == "B" else 1]
    out = np.zeros((rank, rank))
    step = max(1, budget // max(rank, 1))
    for start in range(0, length, step):
        pieces = []
        for x, c, absolute in parts:
            piece = x[start : start + step] if side == "B" else x[:, start : start + step]
            piece = piece.astype(np.float64)
            if absolute:
                np.abs(piece, out=piece)
            piece *= c
            pieces.append(piece)
        if side == "B":
            chunk = np.hstack(pieces)
            out += chunk.T @ chunk
        else:
            chunk = np.vstack(pieces)
            out += chunk @ chunk.T
    return out


def side_grams(
    factors: list[Array], scales: list[float], side: str, magnitude: float, budget: int = 1 << 22
) -> tuple[Array, Array]:
    """What `gram` gives for the stacked c_i·x_i (float64: the signed differences of a
    verification cancel), block by block with no stacked copy, and in the same pass the Gram
    matrix of |magnitude·x_last| (float32: it only sets a rounding bound)."""
    import numpy as np

    widths = [x.shape[1] if side == "B" else x.shape[0] for x in factors]
    edges = np.cumsum([0, *widths])
    length = factors[0].shape[0 if side == "B" else 1]
    out = np.zeros((edges[-1], edges[-1]))
    last = np.zeros((widths[-1], widths[-1]))
    step = max(1, budget // max(int(edges[-1]), 1))
    for start in range(0, length, step):
        where = slice(start, start + step)
        raw = [x[where] if side == "B" else x[:, where].T for x in factors]  # (rows, r_i)
        pieces = [p.astype(np.float64) * c for p, c in zip(raw, scales, strict=True)]
        for i, p in enumerate(pieces):
            for j in range(i, len(pieces)):
                block = p.T @ p if i == j else p.T @ pieces[j]
                out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] += block
        with np.errstate(over="ignore", invalid="ignore"):
            absolute = np.abs(raw[-1], dtype=np.float32)
            block = absolute.T @ absolute
        if not np.isfinite(block).all():  # past float32's range: this piece in float64
            wide = np.abs(raw[-1], dtype=np.float64)
            block = wide.T @ wide
        last += block
    upper = np.triu(out)
    return upper + np.triu(out, 1).T, last * magnitude**2


#: elements of a factor per piece of `cast_grams` (float32: 1 MiB): a piece's values, its
#: difference and its magnitude stay in the core's cache between the elementwise steps and the
#: products (a whole 14336 x 64 factor at once runs at half the speed, from memory)
PIECE = 1 << 18


def _float32_into(raw: Array, code: str, buffer: Array) -> Array:
    """The values of a piece of a `code` factor in its raw storage (F32, BF16 as uint16, F16) as
    float32: a view for F32, else written into `buffer` (a bfloat16 is the top half of its
    float32: one widening shift, no float conversion)."""
    import numpy as np

    if code == "F32":
        return raw
    if code == "BF16":
        np.left_shift(raw, 16, out=buffer.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(buffer, raw, casting="same_kind")
    return buffer


def cast_grams(
    source: Array, output: Array, side: str, codes: tuple[str, str], piece: int = PIECE
) -> tuple[Array, Array, Array]:
    """For a factor that was only cast (s·B·A − s·B'·A' = s·[B, B − B']·[A − A'; A']): the Gram
    matrix of [source, source − output] (side "B", PᵀP) or of [source − output; output] (side
    "A", Q·Qᵀ), the source's own, and that of |output|. `source` and `output` are the factors'
    raw storage (`codes`: F32, BF16 or F16 each). The differences are exact in float32 (a
    rounding moves a value by less than itself), so nothing large cancels and float32 products
    (summed in float64 from piece to piece) measure the error to float32 precision. Piece by
    piece through four small float32 buffers: no stacked copy, no copy of a whole factor; A's
    own Gram is the sum of the four blocks of [A − A'; A'] (A = (A − A') + A')."""
    import numpy as np

    r = source.shape[1] if side == "B" else source.shape[0]
    length = source.shape[0 if side == "B" else 1]
    step = max(1, piece // max(r, 1))
    stacked, magnitude = np.zeros((2 * r, 2 * r)), np.zeros((r, r))
    buffers = np.empty((4, min(step, length) * r), dtype=np.float32)

    def gram(x: Array, y: Array) -> Array:
        return x.T @ y if side == "B" else x @ y.T

    for start in range(0, length, step):
        where = slice(start, start + step)
        rs, ro = (x[where] if side == "B" else x[:, where] for x in (source, output))
        ts, to, td, ta = (b[: ro.size].reshape(ro.shape) for b in buffers)
        xs, xo = _float32_into(rs, codes[0], ts), _float32_into(ro, codes[1], to)
        difference = np.subtract(xs, xo, out=td)
        first, second = (xs, difference) if side == "B" else (difference, xo)
        stacked[:r, :r] += gram(first, first)
        stacked[:r, r:] += gram(first, second)
        stacked[r:, r:] += gram(second, second)
        absolute = np.abs(xo, out=ta)
        magnitude += gram(absolute, absolute)
    stacked[r:, :r] = stacked[:r, r:].T
    if side == "B":
        own = stacked[:r, :r].copy()
    else:
        own = stacked[:r, :r] + stacked[:r, r:] + stacked[r:, :r] + stacked[r:, r:]
    return stacked, own, magnitude
