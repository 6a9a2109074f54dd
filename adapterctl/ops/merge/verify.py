"""`merge --verify`: every merged tensor re-read from the written shard and compared with W + ΔW
recomputed in float64 from the base and the adapters, in row blocks (bounded memory); the relative
error of each tensor (Frobenius) against the rounding bound of the output dtype."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.errors import AdapterctlError
from adapterctl.format.checkpoint import BaseCheckpoint
from adapterctl.format.rawtensor import RawTensor, TensorStore, cast, to_float64, to_floats
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops import failure_message
from adapterctl.ops.merge.plan import Lora, LoraBias, Plan, Replace

if TYPE_CHECKING:
    import numpy as np

    from adapterctl.ops.merge.stream import Progress

#: the unit roundoff of each output dtype (half an ulp, relative)
UNIT_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "BF16": 2.0**-8, "F16": 2.0**-11}
#: float32 arithmetic in the merge itself (the delta's matmul, the DoRA norm): allowed on top
_F32_SLACK = 2.0**-24 * 64
_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class Check:
    name: str  # the tensor
    error: float  # relative (Frobenius)
    threshold: float

    @property
    def passed(self) -> bool:
        return self.error <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "error": self.error, "threshold": self.threshold,
                "passed": self.passed}  # fmt: skip


@dataclass
class Verification:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def worst(self) -> Check | None:
        failing = [c for c in self.checks if not c.passed] or self.checks
        return max(failing, key=lambda c: c.error / c.threshold, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tensors": len(self.checks),
                "failed": [c.to_dict() for c in self.checks if not c.passed]}  # fmt: skip


class VerificationFailed(AdapterctlError):
    """A merged tensor does not match its float64 recomputation; nothing was renamed."""

    def __init__(self, verification: Verification) -> None:
        worst = verification.worst
        super().__init__(
            failure_message(worst),
            hint="the output was not written; report this with the adapter's `inspect --json`",
        )
        self.verification = verification


def _f64(store: TensorStore, key: str) -> np.ndarray[Any, Any]:
    return to_float64(store.get(key))


def _reference_blocks(w0: RawTensor, ops: list[Any], stores: list[TensorStore]) -> Any:
    """Yield (rows, reference float64 block) of the merged tensor, in row blocks."""
    import numpy as np

    steps: list[tuple[str, Any, Any]] = []
    full = to_floats(w0)  # float32 (or float64) as stored: each block widened when it is used
    for op in ops:
        if isinstance(op, Replace):
            full = to_floats(stores[op.adapter].get(op.key))
            steps.clear()
        elif isinstance(op, LoraBias) and op.key is not None:
            steps.append(("bias", _f64(stores[op.adapter], op.key) * op.scaling, None))
        elif isinstance(op, Lora):
            a, b = _f64(stores[op.adapter], op.a), _f64(stores[op.adapter], op.b)
            m = None if op.magnitude is None else _f64(stores[op.adapter], op.magnitude)
            steps.append((op.kind, (a, b * op.scaling), m))
    if full.ndim != 2:  # a bias: small, whole
        ref = full.astype(np.float64)
        for _, d, _ in steps:
            ref = ref + d
        yield slice(None), ref
        return
    rows = full.shape[0]
    step = max(1, _BLOCK_BYTES // max(1, full.shape[1] * 8))

    def delta(kind: str, ab: tuple[Any, Any], sl: slice) -> Any:
        a, b = ab
        return b[sl] @ a if kind == "linear" else (b @ a[:, sl]).T

    # DoRA norms over the whole input dimension of the unmerged weight: summed block by block
    norms: list[Any] = []
    for kind, ab, m in steps:
        if m is None or kind == "bias":
            norms.append(None)
            continue
        if kind == "linear":
            norms.append(None)  # per row: within each block
            continue
        total = np.zeros(full.shape[1])
        for r in range(0, rows, step):
            sl = slice(r, r + step)
            total += ((full[sl].astype(np.float64) + delta(kind, ab, sl)) ** 2).sum(axis=0)
        norms.append(np.sqrt(total))
    for r in range(0, rows, step):
        sl = slice(r, r + step)
        w0_block = full[sl].astype(np.float64)
        w = w0_block
        for (kind, ab, m), norm in zip(steps, norms, strict=True):
            d = delta(kind, ab, sl)
            if m is None:
                w = w + d
            elif kind == "linear":
                n = np.sqrt(((w0_block + d) ** 2).sum(axis=1))
                w = (m[sl] / n)[:, None] * (w + d)
            else:
                w = (m / norm)[None, :] * (w + d)
        yield sl, w


def check(
    directory: Path,
    files: list[str],
    groups: list[list[str]],
    base: BaseCheckpoint,
    stores: list[TensorStore],
    plan: Plan,
    code: str | None,
    progress: Progress | None = None,
) -> Verification:
    import numpy as np

    verification = Verification()
    where = {name: file for file, group in zip(files, groups, strict=True) for name in group}
    targets = [k for k, ops in plan.ops.items() if any(not isinstance(o, Replace) for o in ops)]
    readers: dict[str, SafetensorsReader] = {}
    try:
        for file in dict.fromkeys(where[k] for k in targets):
            readers[file] = SafetensorsReader(directory / file)
        total = sum(readers[where[k]].tensors[k].nbytes for k in targets)
        for key in targets:
            written = readers[where[key]]
            t = written.tensors[key]
            out = to_floats(RawTensor(t.dtype, t.shape, written.read_bytes(key)))
            w0 = base.read(key)
            if code is not None:
                w0 = cast(w0, code)
            ops = plan.ops[key]
            n_round = 1 + len(ops)
            bound = 2 * n_round * UNIT_ROUNDOFF[t.dtype.code] + _F32_SLACK
            err2 = ref2 = 0.0
            for sl, ref in _reference_blocks(w0, ops, stores):
                diff = out[sl].astype(np.float64) - ref
                err2 += float(np.sum(diff * diff))
                ref2 += float(np.sum(ref * ref))
            error = (err2**0.5) / max(ref2**0.5, np.finfo(np.float64).tiny)
            if not np.isfinite(error):
                error = float("inf")
            verification.checks.append(Check(key, float(error), bound))
            if progress is not None:
                progress(t.nbytes, total, "verifying")
    finally:
        for reader in readers.values():
            reader.close()
    return verification
