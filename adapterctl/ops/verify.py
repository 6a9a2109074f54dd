"""`convert --verify`: the written files against the source, before they are renamed into place.

Each LoRA module's delta s·B·A (minus the initial s0·B0·A0) is compared with the output's s'·B'·A'
from the factors alone, in float64: ||difference|| / (||s·B·A|| + ||s0·B0·A0||). Every other tensor
is compared elementwise: max |out − expected| / max |expected|. The thresholds: 1e-6 for what is
exact, plus the rounding bound of a cast, plus what a rank reduction reported dropping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.keys import classify
from adapterctl.format.layout import SAFETENSORS_NAME
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops.initial import SavedInitial
from adapterctl.ops.lowrank import product_norm
from adapterctl.ops.rawtensor import FLOAT_CODES, FileStore, RawTensor, to_float64

if TYPE_CHECKING:
    import numpy as np

    from adapterctl.ops.conversion import Plan, _Module

EXACT = 1e-6
#: unit roundoff of each float dtype
UNIT = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}


@dataclass(frozen=True)
class Check:
    name: str
    error: float
    threshold: float

    @property
    def ok(self) -> bool:
        return self.error <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON has no infinity: an error that is not finite is null."""
        error = self.error if math.isfinite(self.error) else None
        return {"name": self.name, "error": error, "threshold": self.threshold}


@dataclass(frozen=True)
class Verification:
    checked: int
    worst: Check | None  # the largest error relative to its threshold

    @property
    def passed(self) -> bool:
        return self.worst is None or self.worst.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checked": self.checked,
            "worst": self.worst.to_dict() if self.worst else None,
        }


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _module_check(plan: Plan, m: _Module, out: FileStore, config: LoraConfig) -> Check:
    import numpy as np

    f = m.factors
    a, b = to_float64(plan.source.get(f.a_key)), to_float64(plan.source.get(f.b_key))
    left, right = [f.scaling * b], [a]
    denominator = product_norm(f.scaling * b, a)
    initial = plan.options.initial
    if initial is not None:
        a0, b0 = (to_float64(t) for t in initial.factors(f))
        s0 = f.scaling
        if isinstance(initial, SavedInitial):
            s0 = initial.config.scaling(initial.config.alpha_for(f.module), f.rank)
        left.append(-s0 * b0)
        right.append(a0)
        denominator += product_norm(s0 * b0, a0)
    out_a, out_b = out.get(f.a_key), out.get(f.b_key)
    r = out_a.shape[0]
    if config.rank_for(f.module) != r:
        return Check(f.module, math.inf, EXACT)
    s = config.scaling(config.alpha_for(f.module), r)
    a1, b1 = to_float64(out_a), to_float64(out_b)
    if not all(np.isfinite(x).all() for x in (a, b, a1, b1, *right, *left)):
        return Check(f.module, math.inf, EXACT)  # an overflow (or a source that is not finite)
    left.append(-s * b1)
    right.append(a1)
    error = _ratio(product_norm(np.hstack(left), np.vstack(right)), denominator)
    threshold = EXACT + _ratio(m.report.dropped_norm * (1 + 1e-6), denominator)
    rounded = out_a.dtype.code != f.dtype_code or plan.options.reduce
    if rounded and out_a.dtype.code in UNIT:
        u = UNIT[out_a.dtype.code]
        threshold += _ratio((2 * u + u * u) * product_norm(np.abs(s * b1), np.abs(a1)), denominator)
    return Check(f.module, error, threshold)


def _elementwise(name: str, got: RawTensor, expected: np.ndarray[Any, Any], rounded: bool) -> Check:
    import numpy as np

    g = to_float64(got)
    if g.shape != expected.shape:
        return Check(name, math.inf, EXACT)
    nan_g, nan_e = np.isnan(g), np.isnan(expected)
    if (nan_g != nan_e).any():
        return Check(name, math.inf, EXACT)
    finite = ~nan_e
    g, e = g[finite], expected[finite]
    inf_e = np.isinf(e)
    if (g[inf_e] != e[inf_e]).any() or np.isinf(g[~inf_e]).any():
        return Check(name, math.inf, EXACT)
    g, e = g[~inf_e], e[~inf_e]
    scale = float(np.abs(e).max()) if e.size else 0.0
    error = _ratio(float(np.abs(g - e).max()) if e.size else 0.0, scale)
    return Check(name, error, EXACT + (UNIT.get(got.dtype.code, 0.0) if rounded else 0.0))


def _expected(plan: Plan, key: str) -> np.ndarray[Any, Any]:
    """What the tensor `key` must hold in the output (float64), computed afresh."""
    t = plan.source.get(key)
    m = plan.by_key.get(key)
    if m is not None:  # lora_B.bias: s·bias is what the module adds
        return to_float64(t) * m.factors.scaling
    info = classify(key, plan.config_in.modules_to_save or [])
    owner = next((m for m in plan.modules.values() if m.factors.module == info.module), None)
    initial = plan.options.initial
    if initial is None or owner is None or not (info.param == "weight" and info.depth):
        return to_float64(t)
    f = owner.factors
    if not isinstance(initial, SavedInitial):
        return to_float64(initial.original_weight(key, t, f))
    a0, b0 = (to_float64(x) for x in initial.factors(f))
    s0 = initial.config.scaling(initial.config.alpha_for(f.module), f.rank)
    delta = s0 * (b0 @ a0)
    w = to_float64(t)
    fitted: np.ndarray[Any, Any] = delta.T if f.embedding or delta.shape != w.shape else delta
    total: np.ndarray[Any, Any] = w + fitted
    return total


def verify(plan: Plan, directory: Path) -> Verification:
    """Check the adapter written to `directory` against `plan`'s source; memory stays one module."""
    import numpy as np

    with np.errstate(all="ignore"):  # overflows and NaNs are findings here, not warnings
        return _verify(plan, directory)


def _verify(plan: Plan, directory: Path) -> Verification:
    config = LoraConfig.from_file(directory / CONFIG_NAME)
    checks: list[Check] = []
    with SafetensorsReader(directory / SAFETENSORS_NAME) as reader:
        out = FileStore(reader)
        names = set(out.specs())
        planned = {o.name: o for o in plan.outputs}
        for name in sorted(names ^ set(planned)):
            checks.append(Check(name, math.inf, EXACT))
        for m in plan.modules.values():
            checks.append(_module_check(plan, m, out, config))
        for name in sorted(names & set(planned)):
            if name in plan.by_key and name != plan.by_key[name].bias_key:
                continue
            got = out.get(name)
            if got.dtype.code not in FLOAT_CODES:
                same = bytes(got.buffer()) == bytes(plan.source.get(name).buffer())
                checks.append(Check(name, 0.0 if same else math.inf, 0.0))
                continue
            owner = plan.by_key.get(name)
            if owner is not None:  # lora_B.bias: compare what the module adds, s'·bias'
                module = owner.factors.module
                s = config.scaling(config.alpha_for(module), config.rank_for(module))
                check = _elementwise(name, got, _expected(plan, name) / s, True)
            else:
                check = _elementwise(name, got, _expected(plan, name), planned[name].computed)
            checks.append(check)
    worst = max(checks, key=lambda c: _ratio(c.error, c.threshold), default=None)
    return Verification(len(checks), worst)
