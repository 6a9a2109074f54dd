"""Each planned module's weight change TUNED - BASE read one module at a time (its two weights in
float64, the change oriented as its factors write it), factored by ops/convert/dense.py with
scaling 1 and cast to the output dtype at once: what stays in memory is the small cast factors,
never a whole checkpoint. Also: whether a compared tensor changed at all (by its bytes, in pieces,
when both checkpoints store it in one dtype)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from adapterctl.errors import ConversionError
from adapterctl.format.checkpoint import BaseCheckpoint
from adapterctl.format.rawtensor import FLOAT_CODES, RawTensor, from_float, to_float64
from adapterctl.ops.convert import Factored, Target, factor
from adapterctl.ops.extract.plan import Job


@dataclass(frozen=True)
class Extracted:
    """One module's factors, cast (B: d_out x k, A: k x d_in as B·A writes the change), and what
    the factoring says of them."""

    job: Job
    b: RawTensor
    a: RawTensor
    factored: Factored  # its numbers (the float64 factors dropped)
    rank: int


def delta(base: BaseCheckpoint, tuned: BaseCheckpoint, job: Job) -> Any:
    """TUNED - BASE of `job`'s weight in float64, (d_out, d_in) as its factors write it (a
    Conv1D's and an embedding's transposed); refused where either weight is not finite."""
    import numpy as np

    change = to_float64(tuned.read(job.key))
    before = to_float64(base.read(job.key))
    if not (np.isfinite(change).all() and np.isfinite(before).all()):
        raise ConversionError(
            f"`{job.key}` holds NaN or infinite values: its change cannot be factored"
        )
    change -= before
    del before
    return change if job.kind == "linear" else change.T


def extract_module(
    base: BaseCheckpoint, tuned: BaseCheckpoint, job: Job, target: Target
) -> Extracted | None:
    """`job`'s change as cast factors, or None where the weight did not change."""
    import numpy as np

    d = delta(base, tuned, job)
    if not d.any():
        return None
    f = factor(d, target)
    del d
    b = from_float(np.ascontiguousarray(f.b), job.code)
    a = from_float(np.ascontiguousarray(f.a), job.code)
    return Extracted(job, b, a, replace(f, b=None, a=None), f.rank)


def changed(base: BaseCheckpoint, tuned: BaseCheckpoint, key: str, codes: tuple[str, str]) -> bool:
    """Whether TUNED's `key` differs from BASE's (`codes`: its dtype in each): its bytes in
    pieces (one dtype), else its values (floats), else changed."""
    import numpy as np

    if codes[0] == codes[1]:
        tuned_pieces = tuned.pieces(key)
        for piece in base.pieces(key):
            other = next(tuned_pieces, None)
            if other is None or bytes(piece) != bytes(other):
                return True
        return next(tuned_pieces, None) is not None
    if not all(c in FLOAT_CODES for c in codes):
        return True  # integer or sub-byte tensors of different dtypes: not the same tensor
    return not np.array_equal(to_float64(base.read(key)), to_float64(tuned.read(key)))
