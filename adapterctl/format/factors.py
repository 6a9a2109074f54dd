"""What a pair of LoRA factors is, from their shapes alone: the one rule that `inspect --check`
and `convert` share (docs/peft-format.md §3).

Linear, Conv1D and Embedding LoRA store 2-D factors, A (r, in) and B (out, r). A convolution's
LoRA (PEFT's `_ConvNd`) stores A as a convolution (r, in/groups, k...) and B as a 1x1
convolution (out, r/groups, 1...): its delta is B·A with A read as r x (in·k...) and B as
out x r, the product PEFT's `get_delta_weight` computes for a 1x1 B.
"""

from __future__ import annotations

import math
from typing import Any


def pair_problem(
    a_kind: str,
    a_shape: tuple[int, ...],
    b_kind: str,
    b_shape: tuple[int, ...],
    *,
    free_rank: bool = False,
) -> str | None:
    """Why `a_shape` and `b_shape` are not a LoRA pair (None when they are). `free_rank`: the
    factors' inner dimensions may differ (a variant's, e.g. BD-LoRA's block-diagonal ones)."""
    if len(a_shape) < 2 or len(b_shape) < 2 or len(a_shape) != len(b_shape):
        return f"{a_kind} {list(a_shape)} and {b_kind} {list(b_shape)} are not LoRA factors"
    if a_shape[0] == 0:
        return f"{a_kind} has rank 0"
    conv = len(a_shape) > 2
    if conv and math.prod(b_shape[2:]) != 1:
        return f"{b_kind} {list(b_shape)} is not a 1x1 convolution, as PEFT's is"
    grouped = conv and b_shape[1] > 0 and a_shape[0] % b_shape[1] == 0
    if a_shape[0] != b_shape[1] and not grouped and not free_rank:
        return (
            f"{a_kind} has {a_shape[0]} rows but {b_kind} has {b_shape[1]} columns; they must "
            "both equal the rank"
        )
    return None


def matrix_shapes(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A as r x (in·k...) and B as out x r, whose product is the delta; None for a grouped
    convolution, whose delta is not one product (its factors can be copied and cast only)."""
    if a_shape[0] != b_shape[1]:
        return None
    return (a_shape[0], math.prod(a_shape[1:])), (b_shape[0], b_shape[1])


def as_matrix(values: Any, which: str) -> Any:
    """A factor's array (numpy) as its matrix in B·A: A ("A") as r x (in·k...), B ("B") as
    out x r; 2-D factors as they are."""
    if values.ndim == 2:
        return values
    return values.reshape(values.shape[0], -1) if which == "A" else values.reshape(values.shape[:2])
