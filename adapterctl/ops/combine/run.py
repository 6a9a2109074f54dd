"""`combine()`: several adapters into one, from their files alone, written atomically (or not at
all), optionally verified before it is renamed into place."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapterctl.errors import ConversionError, InvalidOptionError
from adapterctl.format.atomic import atomic_directory, preflight
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.layout import README_NAME, SAFETENSORS_NAME, AdapterFiles
from adapterctl.format.nonfinite import NONFINITE_CODES, has_nonfinite
from adapterctl.format.rawtensor import from_float, numel
from adapterctl.format.tensors import TensorSource, write_safetensors
from adapterctl.ops import SCHEMA_VERSION, failure_message
from adapterctl.ops.combine.card import combine_card
from adapterctl.ops.combine.compute import Combined, combine_module, overflow
from adapterctl.ops.combine.plan import ModulePlan, Plan, check_options
from adapterctl.ops.combine.sources import (
    Source,
    find_source,
    identity,
    open_source,
)
from adapterctl.ops.combine.verify import verify as verify_written
from adapterctl.ops.convert import Verification


class Progress(Protocol):
    """`progress(advance, total)` while the output is written (bytes), then
    `progress(advance, total, "verifying")` (modules) with --verify."""

    def __call__(self, advance: int, total: int, phase: str = "combining", /) -> None: ...


@dataclass
class ModuleCombined:
    """One module of the output: how it was made, its rank from the sources' to the output's,
    the energy an svd method kept, and --verify's relative error and allowance."""

    module: str
    method: str
    ranks_in: tuple[int, ...]  # of the sources that target it, in SOURCE order
    rank_out: int
    energy: float | None = None
    error: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "method": self.method,
            "ranks_in": list(self.ranks_in),
            "rank_out": self.rank_out,
            "energy": self.energy,
            "error": self.error,
            "threshold": self.threshold,
        }


@dataclass
class CombineResult:
    sources: list[str]
    output: str
    method: str  # as asked
    weights: list[float]
    density: float | None
    majority_sign_method: str
    seed: int
    dtype: str
    config: LoraConfig
    modules: list[ModuleCombined]
    carried: list[str] = field(default_factory=list)  # modules_to_save tensors copied over
    bytes_out: int = 0
    warnings: list[str] = field(default_factory=list)
    verification: Verification | None = None

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "schema_version": SCHEMA_VERSION,
            "sources": self.sources,
            "output": self.output,
            "method": self.method,
            "weights": self.weights,
            "density": self.density,
            "majority_sign_method": self.majority_sign_method,
            "seed": self.seed,
            "dtype": self.dtype,
            "config": {
                "r": c.r,
                "lora_alpha": c.lora_alpha,
                "use_rslora": c.use_rslora,
                "rank_pattern": c.rank_pattern or {},
                "alpha_pattern": c.alpha_pattern or {},
                "target_modules": c.target_modules,
                "modules_to_save": c.modules_to_save,
            },
            "modules": [m.to_dict() for m in self.modules],
            "carried": self.carried,
            "bytes_out": self.bytes_out,
            "warnings": self.warnings,
            "verification": self.verification.to_dict() if self.verification else None,
        }


class VerificationFailed(ConversionError):
    """The written adapter does not give the combined deltas within the allowance; nothing was
    renamed into place."""

    def __init__(self, result: CombineResult) -> None:
        worst = result.verification.worst if result.verification else None
        super().__init__(
            failure_message(worst),
            hint="the output was not written; report this with the sources' `inspect --json`",
        )
        self.result = result


def _distinct(files: list[AdapterFiles], labels: list[str]) -> None:
    seen: dict[tuple[int, int], str] = {}
    for f, label in zip(files, labels, strict=True):
        key = identity(f)
        if key in seen:
            raise InvalidOptionError(
                f"`{label}` and `{seen[key]}` are the same adapter",
                hint="give each adapter once, with the sum of its weights",
            )
        seen[key] = label


def combine(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    weights: Sequence[float],
    method: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    rank: int | None = None,
    seed: int = 0,
    verify: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
) -> CombineResult:
    """Write `output`: one adapter combining `sources` with `weights` by `method`, the methods
    and meanings of PEFT 0.21.2's `add_weighted_adapter` (cat and svd exact for any mix of
    ranks, alphas, patterns and rslora). A SOURCE is an adapter folder, `DIR/NAME` for adapter
    NAME of a multi-adapter folder, a weights file, or a Hub repo id. DARE's masks come from
    `seed`. `verify`: every module's delta is checked in float64 before the output appears."""
    options = check_options(
        method, list(weights), len(sources), density, majority_sign_method, rank, seed
    )
    labels = [os.fspath(s) for s in sources]
    local = [s for s in sources if Path(s).exists() or Path(s).parent.is_dir()]
    preflight([output], force=force, inputs=local)
    with contextlib.ExitStack() as stack:
        files = [find_source(s, token) for s in sources]
        _distinct(files, labels)
        opened = [open_source(f, label, stack) for f, label in zip(files, labels, strict=True)]
        plan = Plan(opened, options)
        inputs = [*local, *(f.directory or f.weights_path for f in files)]
        preflight([output], force=force, inputs=inputs)
        reports = {
            m.module: ModuleCombined(
                m.module, plan.method, tuple(p.module.rank for p in m.parts), m.rank
            )
            for m in plan.modules
        }
        result = CombineResult(
            sources=labels,
            output=os.fspath(output),
            method=method,
            weights=list(options.weights),
            density=density,
            majority_sign_method=majority_sign_method,
            seed=seed,
            dtype=plan.dtype.code,
            config=plan.config,
            modules=list(reports.values()),
            carried=sorted(_carried(plan)),
            warnings=list(plan.warnings),
        )
        with atomic_directory(Path(output), force=force, inputs=inputs) as tmp:
            result.bytes_out = _write(plan, tmp, reports, progress)
            (tmp / CONFIG_NAME).write_text(plan.config.to_json())
            card = combine_card(plan, labels, method)
            (tmp / README_NAME).write_bytes(card.encode("utf-8"))
            if verify:
                step = _phase(progress, "verifying")
                result.verification, checks = verify_written(plan, tmp, step)
                for name, check in checks.items():
                    reports[name].error, reports[name].threshold = check.error, check.threshold
                if not result.verification.passed:
                    raise VerificationFailed(result)
    return result


def _phase(progress: Progress | None, phase: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda n, total: progress(n, total, phase)


def _carried(plan: Plan) -> dict[str, Source]:
    """What is copied as it is (key -> the source it comes from): modules_to_save tensors of
    the one source that has them, saved copies of base weights."""
    out = dict(plan.base_copies)
    if plan.carried is not None:
        out.update(dict.fromkeys(plan.carried.saved, plan.carried))
    return out


def _copied(source: Source, key: str) -> Callable[[], Any]:
    return lambda: source.store.get(key).buffer()


def _write(
    plan: Plan, directory: Path, reports: dict[str, ModuleCombined], progress: Progress | None
) -> int:
    """The output's tensors, one module's factors computed when the writer asks for the first
    of them (A and B are written one after the other: their names sort together)."""
    import numpy as np

    code = plan.dtype.code
    last: list[tuple[str, Combined]] = []

    def combined(m: ModulePlan) -> Combined:
        if not last or last[0][0] != m.module:
            c = combine_module(plan, m)
            reports[m.module].energy = c.energy
            last[:] = [(m.module, c)]
        return last[0][1]

    def factor(m: ModulePlan, side: str) -> TensorSource:
        a_key, b_key = m.keys
        shape = (m.rank, m.d_in) if side == "A" else (m.d_out, m.rank)

        def data() -> Any:
            c = combined(m)
            values = c.a if side == "A" else c.b
            out = from_float(np.ascontiguousarray(values), code)
            if code in NONFINITE_CODES and has_nonfinite(out):
                raise overflow(m.module, plan.dtype.display_name)
            return out.buffer()

        return TensorSource(a_key if side == "A" else b_key, plan.dtype, shape, data)

    outputs = [factor(m, side) for m in plan.modules for side in ("A", "B")]
    for key, source in _carried(plan).items():
        dtype, shape = source.store.specs()[key]
        outputs.append(TensorSource(key, dtype, shape, _copied(source, key)))
    total = sum(o.dtype.bits * numel(o.shape) // 8 for o in outputs)

    def advance(n: int) -> None:
        if progress is not None:
            progress(n, total)

    with open(directory / SAFETENSORS_NAME, "wb") as f:
        written = write_safetensors(f, outputs, progress=advance)
    return written
