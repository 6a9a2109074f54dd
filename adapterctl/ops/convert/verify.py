"""`convert --verify`: the written files against the source, before they are renamed into place.

Each LoRA module's delta s·B·A (minus the initial s0·B0·A0) is compared with the output's s'·B'·A'
from the factors alone, in float64: ||difference|| / (||s·B·A|| + ||s0·B0·A0||). Every other tensor
is compared elementwise: max |out − expected| / max |expected|. The thresholds: 1e-6 for what is
exact, plus the rounding bound of a cast, plus what a rank reduction reported dropping.
`--portable` output (scaling 1, every module padded to one rank) is compared the same way: deltas,
not factors, with B's rounding after its scaling was folded in.

A module whose factors were only cast (the common `--dtype` case) takes a float32 path with the same
error and threshold (`_cast_checks`): its factors' raw bytes, read again from both files into reused
buffers, are checked piece by piece, two modules at a time on two cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.factors import as_matrix, matrix_shapes
from adapterctl.format.keys import classify
from adapterctl.format.layout import SAFETENSORS_NAME
from adapterctl.format.rawtensor import (
    FLOAT_CODES,
    FileStore,
    RawTensor,
    TensorStore,
    numel,
    to_floats,
)
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops.convert.blas import one_blas_thread
from adapterctl.ops.convert.initial import SavedInitial
from adapterctl.ops.convert.lowrank import cast_grams, side_grams
from adapterctl.ops.convert.portable import padded

if TYPE_CHECKING:
    from adapterctl.ops.convert.plan import Module, Plan

EXACT = 1e-6
#: unit roundoff of each float dtype
UNIT = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}


def factored_allowance(cut_error: float, codes: Iterable[str], rank: int) -> float:
    """What `--verify` allows a change written as rank-`rank` factors in dtypes `codes`: the
    relative error the rank cut reported, plus the factors' rounding (||B||·||A|| <= sqrt(k)·
    ||ΔW|| for SVD factors and for a change beside an identity or one-hot), plus 1e-6."""
    unit = max((UNIT.get(c, 1.0) for c in codes), default=1.0)
    return cut_error + 2.5 * unit * math.sqrt(rank) + EXACT


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


def _side(plan: Plan, m: Module, out: FileStore, which: str) -> list[Any]:
    """One side's factors (B: out x r, or A: r x in) as float views where the dtype allows:
    the source's, the initial's, the output's."""
    f = m.factors
    key = f.a_key if which == "A" else f.b_key
    tensors = [plan.source.get(key)]
    if plan.options.initial is not None:
        tensors.append(plan.options.initial.factor(f, which))
    tensors.append(out.get(key))
    return [as_matrix(to_floats(t), which) for t in tensors]


def _side_gram(
    plan: Plan, m: Module, out: FileStore, which: str, signs: list[float], s: float
) -> Any:
    """The Gram matrices of one side's stacked factors and of |output| (for the rounding
    bound), or None if a factor is not finite; the side's factors are freed on return, before
    the other side is read."""
    import numpy as np

    factors = _side(plan, m, out, which)
    if not all(np.isfinite(x).all() for x in factors):
        return None  # the caller compares element by element where it can
    scale = signs if which == "B" else [1.0] * len(signs)
    return side_grams(factors, scale, which, abs(s) if which == "B" else 1.0)  # |s'B'| or |A'|


def _factor_check(plan: Plan, m: Module, out: FileStore, config: LoraConfig) -> Check:
    """A module whose factors hold NaN or ±Inf has no meaningful delta: where the factors were
    only joined and cast (no reduction, the scaling unchanged), each output factor is compared
    element by element with the source's (NaN must meet NaN, an infinity the same infinity);
    anything else is a failure (an overflow, or a rank reduction, which refuses such inputs)."""
    f = m.factors
    portable = plan.options.portable  # the scaling in B, 1 in the config; zero padding
    s_out = config.scaling(config.alpha_for(f.module), out.specs()[f.a_key][1][0])
    if plan.options.reduce or not math.isclose(
        s_out, 1.0 if portable else f.scaling, rel_tol=1e-12
    ):
        return Check(f.module, math.inf, EXACT)
    worst = Check(f.module, 0.0, EXACT)
    for which, axis in (("A", 0), ("B", 1)):
        got = out.get(f.a_key if which == "A" else f.b_key)
        joined, factor, rounded = plan.joined(m, which), 1.0, _rounded(plan, got)
        if portable:
            joined = padded([(joined, 1.0)], axis, joined.dtype.code, got.shape[axis])
            if which == "B" and f.scaling != 1.0:
                factor, rounded = f.scaling, UNIT.get(got.dtype.code, 0.0)
        expected = _flat_chunks(to_floats(joined), factor)
        check = _compare(f.module, to_floats(got), expected, rounded)
        worst = max(worst, check, key=lambda c: _ratio(c.error, c.threshold))
    return worst


def _rounded(plan: Plan, got: RawTensor) -> float:
    """The unit roundoff an output may carry: none where it kept its dtype."""
    return UNIT.get(got.dtype.code, 0.0) if plan.options.dtype else 0.0


#: dtypes whose cast differences are exact in float32 (see `cast_grams`)
_NARROW = ("F32", "BF16", "F16")


def _read(store: TensorStore, key: str, buffer: bytearray) -> RawTensor:
    """A tensor of a file read into `buffer` (no allocation per tensor), else `store.get`."""
    if isinstance(store, FileStore) and len(buffer) >= _nbytes(store, key):
        return store.get_into(key, buffer)
    return store.get(key)


def _cast_scaling(plan: Plan, m: Module, out: FileStore, config: LoraConfig) -> float | None:
    """The scaling of a module whose factors were only cast (or copied), the scaling unchanged,
    in dtypes whose differences `cast_grams` takes exactly; None for every other module."""
    f = m.factors
    r = out.specs()[f.a_key][1][0]
    if plan.options.initial is not None or plan.options.reduce or config.rank_for(f.module) != r:
        return None
    s = config.scaling(config.alpha_for(f.module), r)
    if (s, r) != (f.scaling, f.rank):
        return None
    keys = (f.a_key, f.b_key)
    codes = {store.specs()[k][0].code for store in (plan.source, out) for k in keys}
    return s if codes <= set(_NARROW) else None


def _cast_sides(
    plan: Plan, m: Module, out: FileStore, buffers: tuple[bytearray, bytearray], lock: Any
) -> list[Any] | None:
    """`cast_grams` of B and of A, from the factors' raw bytes read into `buffers` (source,
    output: reused from module to module; the reads hold `lock`, the files being shared
    between threads), or None where a factor is not finite (or past float32's range)."""
    import numpy as np

    sides = []
    for which in ("B", "A"):
        key = m.factors.a_key if which == "A" else m.factors.b_key
        with lock:
            source, output = _read(plan.source, key, buffers[0]), _read(out, key, buffers[1])
        codes = (source.dtype.code, output.dtype.code)
        raw = [as_matrix(t.data.reshape(t.shape), which) for t in (source, output)]
        grams = cast_grams(raw[0], raw[1], which, codes)
        del source, output, raw
        if not all(np.isfinite(g).all() for g in grams):
            return None
        sides.append(grams)
    return sides


def _cast_check(m: Module, out: FileStore, s: float, sides: list[Any]) -> Check:
    """`_module_check` of a module whose factors were only cast (`_cast_scaling`): the same
    error and threshold, from `_cast_sides` (float32, no cancellation)."""
    f = m.factors
    code = out.specs()[f.a_key][0].code
    (gb, ob, mb), (ga, oa, ma) = sides
    if s == 0.0:  # both deltas are zero
        return Check(f.module, 0.0, EXACT)
    # the scaling |s| multiplies every norm below and cancels in each ratio: left out, so that a
    # huge one (lora_alpha 1e308) cannot overflow them to inf/inf
    denominator = math.sqrt(max(float((ob * oa).sum()), 0.0))
    error = _ratio(math.sqrt(max(float((gb * ga).sum()), 0.0)), denominator)
    threshold = EXACT
    if code != f.dtype_code:
        u = UNIT[code]
        magnitude = math.sqrt(max(float((mb * ma).sum()), 0.0))  # || |B'| |A'| ||
        threshold += _ratio((2 * u + u * u) * magnitude, denominator)
    return Check(f.module, error, threshold)


def _cast_checks(
    plan: Plan,
    products: list[Module],
    out: FileStore,
    config: LoraConfig,
    advance: Callable[[], None],
) -> dict[int, Check]:
    """The checks of every module `_cast_scaling` admits (by index in `products`), where its
    factors are finite: on two threads where two cores are there (each runs its module's
    products on one BLAS thread: no waiting on each other, unlike two BLAS threads on one
    small product), in order; `advance()` after each."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    scalings = {
        i: s
        for i, m in enumerate(products)
        if (s := _cast_scaling(plan, m, out, config)) is not None
    }
    if not scalings:
        return {}
    keys = [k for i in scalings for k in (products[i].factors.a_key, products[i].factors.b_key)]
    largest = [max(_nbytes(store, k) for k in keys) for store in (plan.source, out)]
    local, lock = threading.local(), threading.Lock()

    def work(i: int) -> list[Any] | None:
        if not hasattr(local, "buffers"):  # every factor this thread reads goes into these
            local.buffers = (bytearray(largest[0]), bytearray(largest[1]))
        with np.errstate(all="ignore"):  # per thread: NaNs are findings, not warnings
            return _cast_sides(plan, products[i], out, local.buffers, lock)

    checks = {}
    pool = ThreadPoolExecutor(max_workers=_workers() if max(largest) <= _TWO_THREADS else 1)
    try:
        for i, sides in zip(scalings, pool.map(work, scalings), strict=True):
            if sides is not None:  # else the general path, after these
                checks[i] = _cast_check(products[i], out, scalings[i], sides)
                advance()
    finally:
        pool.shutdown(cancel_futures=True)
    return checks


#: the largest factor (bytes) checked on two threads: above it one thread, so that memory stays
#: near one module's factors (each thread holds one source and one output factor)
_TWO_THREADS = 16 << 20


def _nbytes(store: TensorStore, key: str) -> int:
    dtype, shape = store.specs()[key]
    return dtype.bits // 8 * numel(shape)


def _workers() -> int:
    """Two threads where this process may run on two cores or more, else one."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 2 if (cores or 1) >= 2 else 1


def _module_check(plan: Plan, m: Module, out: FileStore, config: LoraConfig) -> Check:
    """||s·B·A − s0·B0·A0 − s'·B'·A'|| from the Gram matrices of the stacked factors, each side
    loaded alone and summed in row chunks, in float64: memory stays near one side's factors
    (the general path; `_cast_checks` takes the modules that were only cast)."""
    import numpy as np

    f = m.factors
    r = out.specs()[f.a_key][1][0]
    if config.rank_for(f.module) != r:
        return Check(f.module, math.inf, EXACT)
    s = config.scaling(config.alpha_for(f.module), r)
    s0 = f.scaling
    initial = plan.options.initial
    if isinstance(initial, SavedInitial):
        s0 = initial.config.scaling(initial.config.alpha_for(f.module), f.rank)
    signs = [f.scaling] + ([-s0] if initial is not None else []) + [-s]
    sides = [_side_gram(plan, m, out, which, signs, s) for which in ("B", "A")]
    if sides[0] is None or sides[1] is None:
        return _factor_check(plan, m, out, config)
    (gb, mb), (ga, ma) = sides
    edges = np.cumsum([0] + [f.rank] * (len(signs) - 1) + [r])
    k = len(signs)  # blocks: source, (initial), output

    def block(g: Any, i: int, j: int) -> Any:
        return g[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]

    def norm(blocks: list[int]) -> float:
        total = sum(
            float((block(gb, i, j) * block(ga, i, j)).sum()) for i in blocks for j in blocks
        )
        return math.sqrt(max(total, 0.0))

    denominator = norm([0]) + (norm([1]) if initial is not None else 0.0)
    error = _ratio(norm(list(range(k))), denominator)
    threshold = EXACT + _ratio(m.report.dropped_norm * (1 + 1e-6), denominator)
    code = out.specs()[f.a_key][0].code
    computed = plan.options.reduce or plan.options.portable  # factors rounded once
    if (code != f.dtype_code or computed) and code in UNIT:
        u = UNIT[code]
        magnitude = math.sqrt(max(float((mb * ma).sum()), 0.0))  # || |s'B'| |A'| ||
        threshold += _ratio((2 * u + u * u) * magnitude, denominator)
    return Check(f.module, error, threshold)


#: elements per chunk of an elementwise comparison
CHUNK = 1 << 20


def _compare(name: str, got: Any, expected: Iterator[Any], rounded: float) -> Check:
    """max |got − expected| / max |expected| over chunks (flat float views): NaN must meet NaN
    and an infinity the same infinity; `rounded` is the unit roundoff the values may carry."""
    import numpy as np

    flat = got.reshape(-1)
    offset, worst, scale = 0, 0.0, 0.0
    for e in expected:
        g = flat[offset : offset + e.size].astype(np.float64)
        offset += e.size
        if g.size != e.size or (np.isnan(g) != np.isnan(e)).any():
            return Check(name, math.inf, EXACT)
        finite = np.isfinite(e)
        if (g[~finite & ~np.isnan(e)] != e[~finite & ~np.isnan(e)]).any():
            return Check(name, math.inf, EXACT)
        if np.isinf(g[finite]).any():
            return Check(name, math.inf, EXACT)
        if finite.any():
            worst = max(worst, float(np.abs(g[finite] - e[finite]).max()))
            scale = max(scale, float(np.abs(e[finite]).max()))
    if offset != flat.size:
        return Check(name, math.inf, EXACT)
    return Check(name, _ratio(worst, scale), EXACT + rounded)


def _flat_chunks(x: Any, factor: float = 1.0) -> Iterator[Any]:
    import numpy as np

    flat = x.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        yield flat[start : start + CHUNK].astype(np.float64) * factor


def _rebuilt_chunks(plan: Plan, key: str, owner: Module) -> Iterator[Any]:
    """W_res + s0·B0·A0 (or the base's weight for a rebuilt initial), row chunk by row chunk."""
    import numpy as np

    f, initial = owner.factors, plan.options.initial
    residual = plan.source.get(key)
    if not isinstance(initial, SavedInitial):
        assert initial is not None
        yield from _flat_chunks(to_floats(initial.original_weight(key, residual, f, "F32")))
        return
    w = to_floats(residual)
    a0, b0 = (to_floats(x) for x in initial.factors(f))
    s0 = initial.config.scaling(initial.config.alpha_for(f.module), f.rank)
    linear = not f.embedding and w.shape == (b0.shape[0], a0.shape[1])
    rows = max(1, CHUNK // max(w.shape[1], 1))
    for start in range(0, w.shape[0], rows):
        part = slice(start, start + rows)
        if linear:  # W (out, in): rows of B0
            delta = b0[part].astype(np.float64) @ a0.astype(np.float64)
        else:  # W stored (in, out) or an embedding (vocab, dim): columns of A0
            delta = a0[:, part].T.astype(np.float64) @ b0.T.astype(np.float64)
        yield (w[part].astype(np.float64) + s0 * delta).reshape(-1)


def _tensor_check(plan: Plan, name: str, got: RawTensor, config: LoraConfig) -> Check:
    """Every tensor that is not a LoRA factor: bytes equal where it was copied, else the values
    within the rounding of the output dtype, chunk by chunk."""
    planned = {o.name: o for o in plan.outputs}[name]
    source = plan.source.get(name)
    if got.dtype.code not in FLOAT_CODES or not planned.computed:
        same = bytes(got.buffer()) == bytes(source.buffer())
        return Check(name, 0.0 if same else math.inf, 0.0)
    rounded = UNIT.get(got.dtype.code, 0.0)
    owner = plan.module_of(name)
    if owner is not None:  # lora_B.bias: what the module adds is s·bias = s'·bias'
        module = owner.factors.module
        s = config.scaling(config.alpha_for(module), config.rank_for(module))
        return _compare(
            name,
            to_floats(got),
            _flat_chunks(to_floats(source), owner.factors.scaling / s),
            rounded,
        )
    info = classify(name, plan.config_in.modules_to_save or [])
    owner = plan.module_named(info.module)
    rebuilt = (
        plan.options.initial is not None
        and owner is not None
        and info.param == "weight"
        and info.depth
    )
    if rebuilt:
        assert owner is not None
        return _compare(name, to_floats(got), _rebuilt_chunks(plan, name, owner), rounded)
    return _compare(name, to_floats(got), _flat_chunks(to_floats(source)), rounded)


def _in_product(plan: Plan, name: str, in_products: set[str]) -> bool:
    """Whether `name` is a LoRA factor (not a lora_B.bias) of a module checked as one product."""
    m = plan.module_of(name)
    return m is not None and name != m.bias_key and m.factors.module in in_products


def verify(
    plan: Plan, directory: Path, progress: Callable[[int, int], None] | None = None
) -> Verification:
    """Check the adapter written to `directory` against `plan`'s source; memory stays near one
    module's factors (two modules' where two threads check small ones).
    `progress(done, total)` after each check (in checks)."""
    import numpy as np

    with one_blas_thread(), np.errstate(all="ignore"):  # NaNs are findings, not warnings
        return _verify(plan, directory, progress)


def _verify(
    plan: Plan, directory: Path, progress: Callable[[int, int], None] | None
) -> Verification:
    config = LoraConfig.from_file(directory / CONFIG_NAME)
    checks: list[Check] = []
    with SafetensorsReader(directory / SAFETENSORS_NAME) as reader:
        out = FileStore(reader)
        names = set(out.specs())
        planned = {o.name: o for o in plan.outputs}
        for name in sorted(names ^ set(planned)):
            checks.append(Check(name, math.inf, EXACT))
        # a grouped convolution's delta is no one product: its factors (only ever copied or
        # cast) are compared elementwise instead
        products = [
            m
            for m in plan.modules
            if matrix_shapes(m.factors.a_shape, m.factors.b_shape) is not None
        ]
        in_products = {m.factors.module for m in products}
        others = [n for n in sorted(names & set(planned)) if not _in_product(plan, n, in_products)]
        total = len(products) + len(others)

        def advance() -> None:
            if progress is not None:
                progress(1, total)

        done = _cast_checks(plan, products, out, config, advance)
        for i, m in enumerate(products):
            if i not in done:
                done[i] = _module_check(plan, m, out, config)
                advance()
        checks += [done[i] for i in range(len(products))]
        for name in others:
            checks.append(_tensor_check(plan, name, out.get(name), config))
            advance()
    worst = max(checks, key=lambda c: _ratio(c.error, c.threshold), default=None)
    return Verification(len(checks), worst)
