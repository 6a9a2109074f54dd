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


def product_norm(p: Array, q: Array) -> float:
    """||p·q||_F from the factors: sqrt(Σ (pᵀp) ∘ (q·qᵀ)); exact up to rounding of the sum."""
    return math.sqrt(max(float(((p.T @ p) * (q @ q.T)).sum()), 0.0))
