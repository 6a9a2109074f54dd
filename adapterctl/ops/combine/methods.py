"""The task-vector operations of PEFT 0.21.2's `add_weighted_adapter` (peft/utils/merge_utils.py),
on float64 numpy arrays: the same meaning per method, written here from their definitions.

Each operation takes the tensors of the sources that take part (same shape: A's, B's or whole
deltas), one weight per tensor, and returns the combined tensor:

- `task_arithmetic`: sum_i w_i·t_i;
- `magnitude_prune`: each t_i cut to its `density` largest magnitudes, then summed with weights;
- `ties`: magnitude pruning, the majority sign per element (from the unweighted pruned tensors:
  their sum, "total", or the count of signs, "frequency"), and the disjoint merge: the mean of the
  weighted values that agree with it;
- `dare_linear`: random pruning (keep each element with probability `density`, rescale the kept
  ones by 1/density), then summed with weights;
- `dare_ties`: random pruning as DARE, then TIES' sign election and disjoint merge.

The DARE masks come from the numpy generator each tensor is given (`default_rng` of the seed and
the tensor's place: plan.py), so a seed gives the same masks on every run and machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]
    Generator = np.random.Generator

#: method -> (needs --density, uses --majority-sign-method)
METHODS: dict[str, tuple[bool, bool]] = {
    "cat": (False, False),
    "linear": (False, False),
    "svd": (False, False),
    "ties": (True, True),
    "ties_svd": (True, True),
    "dare_linear": (True, False),
    "dare_ties": (True, True),
    "dare_linear_svd": (True, False),
    "dare_ties_svd": (True, True),
    "magnitude_prune": (True, False),
    "magnitude_prune_svd": (True, False),
}
SIGN_METHODS = ("total", "frequency")


def magnitude_mask(t: Array, density: float) -> Array:
    """PEFT's `magnitude_based_pruning`: keep the int(density·numel) largest |t| (a density of 1
    or more keeps everything)."""
    import numpy as np

    if density >= 1:
        return t
    k = int(density * t.size)
    flat = np.abs(t).reshape(-1)
    mask = np.zeros(t.size)
    if k > 0:
        mask[np.argpartition(-flat, k - 1)[:k]] = 1.0
    return t * mask.reshape(t.shape)


def random_prune(t: Array, density: float, rng: Generator) -> Array:
    """PEFT's `random_pruning` with rescale: each element kept with probability `density`, the
    kept ones divided by it (a density of 1 or more keeps everything, unscaled)."""
    if density >= 1:
        return t
    keep = rng.random(t.shape) < density
    return t * keep / density


def majority_sign_mask(stacked: Array, method: str) -> Array:
    """PEFT's `calculate_majority_sign_mask`: where each tensor's sign is the elected one (the
    sign of the sum, "total", or of the sum of signs, "frequency"; 0 counts as +)."""
    import numpy as np

    sign = np.sign(stacked)
    if method == "total":
        magnitude = stacked.sum(axis=0)
    elif method == "frequency":
        magnitude = sign.sum(axis=0)
    else:  # pragma: no cover - checked with the options
        raise ValueError(method)
    return sign == np.where(magnitude >= 0, 1.0, -1.0)  # type: ignore[no-any-return]


def disjoint_merge(weighted: Array, mask: Array) -> Array:
    """PEFT's `disjoint_merge`: the sum of the agreeing values over how many agree (at least 1)."""
    import numpy as np

    kept = mask.sum(axis=0)
    return (weighted * mask).sum(axis=0) / np.maximum(kept, 1.0)  # type: ignore[no-any-return]


def _weighted(tensors: Sequence[Array], weights: Sequence[float]) -> Array:
    import numpy as np

    stacked = np.stack(tensors)
    return stacked * np.asarray(weights, dtype=np.float64).reshape(
        (-1,) + (1,) * (stacked.ndim - 1)
    )


def task_arithmetic(tensors: Sequence[Array], weights: Sequence[float]) -> Array:
    return _weighted(tensors, weights).sum(axis=0)  # type: ignore[no-any-return]


def magnitude_prune(tensors: Sequence[Array], weights: Sequence[float], density: float) -> Array:
    return task_arithmetic([magnitude_mask(t, density) for t in tensors], weights)


def ties(
    tensors: Sequence[Array], weights: Sequence[float], density: float, sign_method: str
) -> Array:
    import numpy as np

    pruned = [magnitude_mask(t, density) for t in tensors]
    mask = majority_sign_mask(np.stack(pruned), sign_method)
    return disjoint_merge(_weighted(pruned, weights), mask)


def dare_linear(
    tensors: Sequence[Array], weights: Sequence[float], density: float, rngs: Sequence[Generator]
) -> Array:
    pruned = [random_prune(t, density, g) for t, g in zip(tensors, rngs, strict=True)]
    return task_arithmetic(pruned, weights)


def dare_ties(
    tensors: Sequence[Array],
    weights: Sequence[float],
    density: float,
    sign_method: str,
    rngs: Sequence[Generator],
) -> Array:
    import numpy as np

    pruned = [random_prune(t, density, g) for t, g in zip(tensors, rngs, strict=True)]
    mask = majority_sign_mask(np.stack(pruned), sign_method)
    return disjoint_merge(_weighted(pruned, weights), mask)


def task_vector_op(
    method: str,
    tensors: Sequence[Array],
    weights: Sequence[float],
    *,
    density: float | None,
    sign_method: str,
    rngs: Sequence[Generator],
) -> Array:
    """The operation `method` names (its `_svd` twin's too) on `tensors`."""
    base = method.removesuffix("_svd")
    if base in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    assert density is not None  # checked with the options
    if base == "ties":
        return ties(tensors, weights, density, sign_method)
    if base == "dare_linear":
        return dare_linear(tensors, weights, density, rngs)
    if base == "dare_ties":
        return dare_ties(tensors, weights, density, sign_method, rngs)
    if base == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ValueError(f"no task-vector operation for {method!r}")  # pragma: no cover
