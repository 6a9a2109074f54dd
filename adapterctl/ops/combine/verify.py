"""`--verify`: each module's combined delta recomputed in float64 from the sources, against the
written s·B·A (scale 1) read back from the output file.

The reference: for cat and svd, sum_i w_i·s_i·B_i·A_i summed delta by delta (not through the
stacked factors the output was made from); for the svd variants of the task-vector methods, the
operation on the sources' deltas; for the factor-wise methods, the product of the A and B that
PEFT's definition gives. Allowed: 1e-6 relative, plus what a rank cut drops (the svd methods),
plus the rounding of both written factors to the output dtype (2·u·‖B‖·‖A‖).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.format.layout import SAFETENSORS_NAME
from adapterctl.format.rawtensor import FileStore, to_float64
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops.combine.compute import Combined, combine_module, delta, factors, rngs
from adapterctl.ops.combine.methods import task_vector_op
from adapterctl.ops.combine.plan import ModulePlan, Plan
from adapterctl.ops.convert import Check, Verification, one_blas_thread

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]

RELATIVE = 1e-6
#: unit roundoff of each output dtype
_UNIT = {"F64": 2.0**-53, "F32": 2.0**-24, "BF16": 2.0**-8, "F16": 2.0**-11}


def reference(plan: Plan, m: ModulePlan, combined: Combined | None) -> Array:
    """The module's combined delta (d_out x d_in, float64), recomputed from the sources."""
    import numpy as np

    method = plan.method
    if method in ("cat", "svd"):
        total = np.zeros((m.d_out, m.d_in))
        for p in m.parts:
            a, b = factors(plan, p)
            total += (p.weight * p.module.scaling) * (b @ a)
        return total
    if method.endswith("_svd"):
        deltas = [delta(plan, p) for p in m.parts]
        return task_vector_op(
            method, deltas, [p.weight for p in m.parts], density=plan.options.density,
            sign_method=plan.options.sign_method, rngs=rngs(plan, m, "delta"),
        )  # fmt: skip
    assert combined is not None  # made for every method but cat
    return combined.b @ combined.a


def _badness(c: Check) -> float:
    if c.threshold > 0:
        return c.error / c.threshold
    return math.inf if c.error > 0 else 0.0


def verify(
    plan: Plan, directory: Path, progress: Callable[[int, int], None] | None = None
) -> tuple[Verification, dict[str, Check]]:
    """Every module's check (relative error and allowed relative error), and the worst."""
    import numpy as np

    checks: dict[str, Check] = {}
    unit = _UNIT.get(plan.dtype.code, 2.0**-24)
    with SafetensorsReader(directory / SAFETENSORS_NAME) as reader, one_blas_thread():
        out = FileStore(reader)
        for m in plan.modules:
            combined = None if plan.method == "cat" else combine_module(plan, m)
            dropped = (combined.dropped or 0.0) if combined is not None else 0.0
            expected = reference(plan, m, combined)
            a_key, b_key = m.keys
            a, b = to_float64(out.get(a_key)), to_float64(out.get(b_key))
            norm = float(np.linalg.norm(expected))
            error = float(np.linalg.norm(expected - b @ a))
            allowed = (
                RELATIVE * norm
                + dropped * (1 + RELATIVE)
                + 2.01 * unit * float(np.linalg.norm(a)) * float(np.linalg.norm(b))
            )
            scale = norm if norm > 0 else 1.0
            checks[m.module] = Check(m.module, error / scale, allowed / scale)
            if progress is not None:
                progress(1, len(plan.modules))
    worst = max(checks.values(), key=_badness, default=None)
    return Verification(len(checks), worst), checks
