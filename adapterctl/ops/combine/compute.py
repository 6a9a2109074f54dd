"""Each module's combined factors, in float64, one module at a time (scale 1: what the output
config gives every module).

- cat: B = [w_1·s_1·B_1, ..., w_n·s_n·B_n], A = [A_1; ...; A_n], so B·A = sum_i w_i·s_i·B_i·A_i
  exactly, each source with its own scaling (PEFT applies only the new adapter's: peft#3761);
- svd: the rank-k truncation of that same sum, from a factored SVD of the stacked factors
  (`ops.convert.spectrum`: QR of each side, an SVD of the small middle; never d_out x d_in);
- linear, ties, dare_linear, dare_ties, magnitude_prune: PEFT's task-vector operation on the A's
  with weights sign(w·s)·sqrt(|w·s|) and on the B's with sqrt(|w·s|), each side on its own
  (peft/tuners/lora/model.py, _generalized_task_arithmetic_weighted_adapter);
- ties_svd, dare_*_svd, magnitude_prune_svd: the operation on the sources' whole deltas
  s_i·B_i·A_i with the weights w_i, then the rank-k truncation of the result (as PEFT's
  _svd_generalized_task_arithmetic_weighted_adapter; one d_out x d_in matrix per source).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterctl.errors import ConversionError
from adapterctl.format.rawtensor import to_float64
from adapterctl.ops.combine.methods import task_vector_op
from adapterctl.ops.combine.plan import ModulePlan, Part, Plan
from adapterctl.ops.combine.sources import finite_factor
from adapterctl.ops.convert import Spectrum, one_blas_thread, spectrum

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]

_SIDES = {"A": 0, "B": 1, "delta": 2}


@dataclass(frozen=True)
class Combined:
    a: Array  # (rank, d_in)
    b: Array  # (d_out, rank)
    energy: float | None  # the svd methods: the fraction of the energy kept
    dropped: float | None  # ... and the Frobenius norm dropped


def rngs(plan: Plan, m: ModulePlan, side: str) -> list[Any]:
    """One generator per source for DARE's masks: from the seed, the module's name, the side and
    the source's place, so a mask never depends on what else is combined or in which order."""
    import numpy as np

    name = zlib.crc32(m.module.encode("utf-8"))
    return [
        np.random.default_rng([plan.options.seed, name, _SIDES[side], p.index]) for p in m.parts
    ]


def factors(plan: Plan, part: Part) -> tuple[Array, Array]:
    """One source's A and B of a module, in float64 (refused where not finite)."""
    source = plan.sources[part.index]
    a, b = (finite_factor(source, k) for k in (part.module.a_key, part.module.b_key))
    return to_float64(a), to_float64(b)


def delta(plan: Plan, part: Part) -> Array:
    """s·B·A of one source's module (d_out x d_in, float64)."""
    a, b = factors(plan, part)
    return part.module.scaling * (b @ a)


def weighted_sum_factors(plan: Plan, m: ModulePlan) -> tuple[Array, Array]:
    """B, A with B·A = sum_i w_i·s_i·B_i·A_i (cat's output; what svd truncates)."""
    import numpy as np

    a_list, b_list = [], []
    for p in m.parts:
        a, b = factors(plan, p)
        a_list.append(a)
        b_list.append(b * (p.weight * p.module.scaling))
    return np.hstack(b_list), np.vstack(a_list)


def combine_module(plan: Plan, m: ModulePlan) -> Combined:
    """One BLAS thread: these products are far too small to share between cores (ops.convert's
    `one_blas_thread`). Refused where the weights and scalings overflow float64."""
    import numpy as np

    with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
        c = _combine(plan, m)
    if not (np.isfinite(c.a).all() and np.isfinite(c.b).all()):
        raise overflow(m.module, "float64")
    return c


def overflow(module: str, dtype: str) -> ConversionError:
    """The refusal of a module whose combined factors do not fit `dtype`."""
    return ConversionError(
        f"`{module}`: the combined factors overflow {dtype} (the weights times the sources' "
        "scalings are too large)",
        hint="use smaller --weights"
        + (
            ""
            if dtype == "float64"
            else ", or float32 sources (`adapterctl convert --dtype float32`)"
        ),
    )


def _combine(plan: Plan, m: ModulePlan) -> Combined:
    import numpy as np

    method = plan.method
    if method == "cat":
        b, a = weighted_sum_factors(plan, m)
        return Combined(a, b, None, None)
    if method == "svd":
        b, a = weighted_sum_factors(plan, m)
        if not (np.isfinite(b).all() and np.isfinite(a).all()):
            return Combined(a, b, None, None)  # refused by combine_module, before any SVD
        b2, a2, kept, dropped = spectrum(b, a, 1.0).truncate(m.rank, b, a)
        return Combined(a2, b2, kept, dropped)
    options = plan.options
    if method.endswith("_svd"):
        deltas = [delta(plan, p) for p in m.parts]
        total = task_vector_op(
            method, deltas, [p.weight for p in m.parts], density=options.density,
            sign_method=options.sign_method, rngs=rngs(plan, m, "delta"),
        )  # fmt: skip
        del deltas
        if not np.isfinite(total).all():
            return Combined(total, total, None, None)  # refused by combine_module
        u, values, vh = np.linalg.svd(total, full_matrices=False)
        spec = Spectrum(values, u, vh)
        tb, ta = spec.transforms(m.rank)
        kept, dropped = spec.loss(m.rank)
        return Combined(ta, tb, kept, dropped)
    pairs = [factors(plan, p) for p in m.parts]
    scaled = [p.weight * p.module.scaling for p in m.parts]
    w_a = [math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in scaled]
    w_b = [math.sqrt(abs(x)) for x in scaled]
    common: dict[str, Any] = {"density": options.density, "sign_method": options.sign_method}
    a = task_vector_op(method, [x for x, _ in pairs], w_a, rngs=rngs(plan, m, "A"), **common)
    b = task_vector_op(method, [y for _, y in pairs], w_b, rngs=rngs(plan, m, "B"), **common)
    return Combined(a, b, None, None)
