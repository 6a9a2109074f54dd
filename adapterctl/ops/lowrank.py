"""Low-rank deltas from their factors alone: a factored SVD to cut the rank, and Frobenius norms of
products, without ever building the full (out, in) matrix.

s·B·A with B (m, r) and A (r, n): B = Qb·Rb and Aᵀ = Qa·Ra (thin QR), so s·B·A = Qb·(s·Rb·Raᵀ)·Qaᵀ,
and the SVD of the small r x r middle gives the SVD of the delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Spectrum:
    """s·B·A = left · diag(values) · right, left (m, k) and right (k, n) orthonormal."""

    left: Array
    values: Array  # descending
    right: Array

    @property
    def energy(self) -> float:
        return float((self.values**2).sum())

    def rank_for_energy(self, fraction: float) -> int:
        """The smallest rank that keeps `fraction` of the energy (at least 1)."""
        import numpy as np

        total = self.energy
        if total == 0.0 or not len(self.values):
            return 1
        kept = np.cumsum(self.values**2) / total
        first = int(np.searchsorted(kept, fraction * (1 - 1e-12)))
        return min(first + 1, len(self.values))

    def truncate(self, k: int) -> tuple[Array, Array, float, float]:
        """B', A' (scaling 1) of the best rank-k approximation, the energy it keeps (a fraction)
        and the Frobenius norm of what it drops."""
        import numpy as np

        k = min(k, len(self.values))
        root = np.sqrt(self.values[:k])
        b = self.left[:, :k] * root
        a = root[:, None] * self.right[:k]
        total = self.energy
        dropped = float((self.values[k:] ** 2).sum())
        kept = 1.0 if total == 0.0 else (total - dropped) / total
        return b, a, kept, math.sqrt(dropped)


def spectrum(b: Array, a: Array, scaling: float) -> Spectrum:
    """The SVD of scaling·b·a (float64) by QR of both factors and an r x r SVD."""
    import numpy as np

    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, values, vt = np.linalg.svd(scaling * (rb @ ra.T))
    return Spectrum(qb @ u, values, (qa @ vt.T).T)


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


def product_norm(p: Array, q: Array) -> float:
    """||p·q||_F from the factors: sqrt(Σ (pᵀp) ∘ (q·qᵀ)); exact up to rounding of the sum."""
    return math.sqrt(max(float(((p.T @ p) * (q @ q.T)).sum()), 0.0))
