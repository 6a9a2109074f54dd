"""`extract()`: a plain LoRA adapter whose weight change approximates TUNED - BASE.

1. check the options; preflight OUTPUT against the inputs (before any download); resolve BASE and
   TUNED (local folders or Hub ids, ops.hub.resolve(kind="base"))
2. plan.py: the two checkpoints' headers matched by name; targets, whole tensors, refusals
3. deltas.py: one module at a time, TUNED - BASE in float64, factored (ops/convert/dense.py),
   cast; the compared tensors checked for a change (reported); the config (scale 1 per module)
4. format.atomic: adapter_model.safetensors (the factors, the whole tensors streamed from TUNED),
   adapter_config.json, README.md; --verify reads them back (verify.py); renamed into place
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from adapterctl.errors import AdapterctlError, ConversionError, InvalidOptionError
from adapterctl.format.atomic import atomic_directory, preflight
from adapterctl.format.checkpoint import BaseCheckpoint
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.files import read_small
from adapterctl.format.layout import README_NAME, SAFETENSORS_NAME
from adapterctl.format.newconfig import CONDENSE_FROM, condense, split_targets
from adapterctl.format.rawtensor import CAST_TARGETS, FLOAT_CODES, RawTensor, cast
from adapterctl.format.tensors import TensorSource, write_safetensors
from adapterctl.ops.convert import Target, reduced_config
from adapterctl.ops.extract.deltas import Extracted, changed, extract_module
from adapterctl.ops.extract.plan import Whole, placed, plan, task_type
from adapterctl.ops.extract.result import ExtractResult, ModuleResult, VerificationFailed
from adapterctl.ops.extract.verify import check, factor_keys
from adapterctl.ops.merge import peak_memory

#: `--bias` values (PEFT's meaning: "all" stores every bias of TUNED)
BIAS_CHOICES = ("none", "all")


class Progress(Protocol):
    """`progress(advance, total, phase)`: modules factored ("extracting"), bytes written
    ("writing"), modules checked ("verifying"); a new phase starts at 0."""

    def __call__(self, advance: int, total: int, phase: str = "extracting", /) -> None: ...


def _check_options(
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    bias: str,
    dtype: str | None,
    seed: int,
) -> str | None:
    if (rank is None) == (energy is None):
        raise InvalidOptionError(
            "pass --rank N or --energy E (one of them)",
            hint="e.g. --rank 16, or --energy 0.99 --max-rank 64",
        )
    if rank is not None and rank < 1:
        raise InvalidOptionError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InvalidOptionError(
            f"--energy must be a fraction in (0, 1], not {energy}", hint="e.g. --energy 0.99"
        )
    if max_rank is not None and (energy is None or max_rank < 1):
        raise InvalidOptionError(
            "--max-rank takes a rank of at least 1, with --energy", hint="--rank N sets one rank"
        )
    if seed < 0:
        raise InvalidOptionError(f"--seed must be at least 0, not {seed}")
    if bias not in BIAS_CHOICES:
        raise InvalidOptionError(f"--bias must be none or all, not {bias[:40]!r}")
    if dtype is None:
        return None
    if dtype not in CAST_TARGETS:
        raise InvalidOptionError(
            f"unknown dtype {dtype[:40]!r}", hint=f"use one of {', '.join(CAST_TARGETS)}"
        )
    return CAST_TARGETS[dtype]


def _base_config(path: Path) -> Any:
    try:
        return json.loads(read_small(path / "config.json", "model config"))
    except (AdapterctlError, ValueError, RecursionError):
        return None


def _target_modules(extracted: list[Extracted], names: list[str]) -> list[str]:
    """The LoRA modules' paths, condensed into suffixes as PEFT stores a list of 20 or more."""
    lora = sorted({m for e in extracted for m, _, _, _ in factor_keys(e)})
    if len(lora) < CONDENSE_FROM:
        return lora
    others = [n for n in names if n not in lora]
    return condense(lora, others)


def _config(
    extracted: list[Extracted], base_label: str, base_dir: Path,
    modules: list[str], modules_to_save: list[str], bias: str,
) -> LoraConfig:  # fmt: skip
    """Scale 1 per module: r and alpha set from the ranks by `reduced_config` (one r when all
    are equal, else exact-name rank/alpha patterns, as `convert --rank` writes them)."""
    ranks = {m: e.rank for e in extracted for m, _, _, _ in factor_keys(e)}
    fields: dict[str, Any] = {
        "r": 8, "lora_alpha": 8, "target_modules": _target_modules(extracted, modules),
        "base_model_name_or_path": base_label, "bias": bias,
        "modules_to_save": list(modules_to_save) or None,
        "task_type": task_type(_base_config(base_dir)),
        "fan_in_fan_out": any(e.job.kind == "conv1d" for e in extracted),
        "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip
    return reduced_config(LoraConfig(**fields), ranks)


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    targets: Sequence[str] = (),
    modules_to_save: Sequence[str] = (),
    bias: str = "none",
    dtype: str | None = None,
    exact: bool = False,
    seed: int = 0,
    portable: bool = False,
    verify: bool = False,
    force: bool = False,
    token: str | None = None,
    progress: Progress | None = None,
) -> ExtractResult:
    """Write `output`: the plain LoRA adapter (scale 1 per module) whose change best approximates
    TUNED - BASE on the targeted modules' weights, at `rank` (a module's full rank at most) or
    the smallest rank keeping the fraction `energy` of each change (`max_rank` at most);
    `portable`: every module zero-padded to the largest rank R, `r = lora_alpha = R` and no
    patterns (what every serving engine scales as PEFT does); atomically, or not at all.
    `base`/`tuned` may be Hub repo ids."""
    from adapterctl.ops.hub import is_local_path, resolve

    started = time.perf_counter()
    code = _check_options(rank, energy, max_rank, bias, dtype, seed)
    target = Target(rank=rank, energy=energy, max_rank=max_rank, exact=exact, seed=seed)
    names, saving = split_targets(targets), split_targets(modules_to_save)
    local = [p for p in (base, tuned) if isinstance(p, os.PathLike) or is_local_path(str(p))]
    preflight([output], force=force, inputs=local)  # before anything is downloaded
    base_dir = resolve(base, kind="base", token=token)
    tuned_dir = resolve(tuned, kind="base", token=token)
    inputs = [*local, base_dir, tuned_dir]
    preflight([output], force=force, inputs=inputs)
    with contextlib.ExitStack() as stack:
        b_ckpt = stack.enter_context(BaseCheckpoint(base_dir))
        t_ckpt = stack.enter_context(BaseCheckpoint(tuned_dir))
        p = plan(b_ckpt, t_ckpt, targets=names, modules_to_save=saving, bias=bias, code=code)
        extracted: list[Extracted] = []
        unchanged = 0
        for job in p.jobs:
            e = extract_module(b_ckpt, t_ckpt, job, target)
            if e is None:
                unchanged += 1
            else:
                extracted.append(e)
            if progress is not None:
                progress(1, len(p.jobs), "extracting")
        specs = {n: d for n, _, d, _ in b_ckpt.tensors()}
        tuned_specs = {n: d for n, _, d, _ in t_ckpt.tensors()}
        not_stored = [
            k
            for k in p.compared
            if changed(b_ckpt, t_ckpt, k, (specs[k].code, tuned_specs[k].code))
        ]
        if not extracted:
            raise ConversionError(
                f"no targeted weight differs between BASE and TUNED ({unchanged} compared): "
                "the adapter would hold no LoRA module, which PEFT cannot load",
                hint=(f"changed but not targeted: {', '.join(not_stored[:3])}" if not_stored
                      else "pass the fine-tuned model as TUNED"),
            )  # fmt: skip
        if portable:
            one = max(e.rank for e in extracted)
            extracted = [_padded(e, one) for e in extracted]
        lora = {e.job.module for e in extracted} | {h for e in extracted for h in e.job.heads}
        p.whole = placed(p.whole, lora)
        whole = [(w, code if code is not None and w.dtype.code in FLOAT_CODES else None)
                 for w in p.whole]  # fmt: skip
        modules = sorted({k.rpartition(".")[0] for k in tuned_specs})
        config = _config(extracted, os.fspath(base), base_dir, modules, saving, bias)
        sources = _sources(extracted, whole, t_ckpt)
        result = ExtractResult(
            base=os.fspath(base),
            tuned=os.fspath(tuned),
            output=os.fspath(output),
            dtype=dtype,
            config=config,
            modules=[_report(e) for e in extracted],
            unchanged=unchanged,
            changed_not_stored=not_stored,
            modules_to_save=[w.stored for w in p.whole],
            bytes=0,
            seconds=0.0,
            peak_memory=0,
        )
        total = sum(s.nbytes for s in sources)
        with atomic_directory(output, force=force, inputs=inputs) as tmp:
            with open(tmp / SAFETENSORS_NAME, "wb") as f:
                result.bytes = write_safetensors(
                    f, sources,
                    progress=None if progress is None else lambda n: progress(n, total, "writing"),
                )  # fmt: skip
            (tmp / CONFIG_NAME).write_text(config.to_json())
            from adapterctl.ops.card import new_card_text

            (tmp / README_NAME).write_bytes(new_card_text(config).encode("utf-8"))
            if verify:
                step = None if progress is None else (lambda n, t: progress(n, t, "verifying"))
                result.verification = check(tmp, b_ckpt, t_ckpt, extracted, whole, step)
                if not result.verification.passed:
                    raise VerificationFailed(result)
    result.seconds = time.perf_counter() - started
    result.peak_memory = peak_memory()
    return result


def _report(e: Extracted) -> ModuleResult:
    f = e.factored
    return ModuleResult(
        e.job.module, e.job.kind, e.job.shape, e.rank, f.method, f.energy,
        f.relative_error, f.capped, e.job.heads,
    )  # fmt: skip


def _sources(
    extracted: list[Extracted], whole: list[tuple[Whole, str | None]], tuned: BaseCheckpoint
) -> list[TensorSource]:
    """The factors (held, cast), then the whole tensors (read from TUNED when written)."""
    out = []
    for e in extracted:
        for _, b_key, a_key, transposed in factor_keys(e):
            b, a = (e.a, e.b) if transposed else (e.b, e.a)
            if transposed:
                b, a = _transposed(b), _transposed(a)
            out += [_held(b_key, b), _held(a_key, a)]
    for w, code in whole:
        dtype = w.dtype if code is None else DTYPES[code]
        out.append(TensorSource(w.stored, dtype, w.shape, _whole(tuned, w.key, code)))
    return out


def _padded(e: Extracted, rank: int) -> Extracted:
    """`e` at `rank` (>= its own): zero columns of B and zero rows of A, the same B·A."""
    import numpy as np

    if e.rank == rank:
        return e
    (d_out, k), (_, d_in) = e.b.shape, e.a.shape
    b = np.zeros((d_out, rank), dtype=e.b.data.dtype)
    a = np.zeros((rank, d_in), dtype=e.a.data.dtype)
    b[:, :k], a[:k] = e.b.data.reshape(d_out, k), e.a.data.reshape(k, d_in)
    return replace(
        e, b=RawTensor(e.b.dtype, (d_out, rank), b), a=RawTensor(e.a.dtype, (rank, d_in), a),
        rank=rank,
    )  # fmt: skip


def _held(name: str, t: RawTensor) -> TensorSource:
    return TensorSource(name, t.dtype, t.shape, t.buffer)


def _transposed(t: RawTensor) -> RawTensor:
    import numpy as np

    return RawTensor(t.dtype, (t.shape[1], t.shape[0]), np.ascontiguousarray(t.data.T))


def _whole(tuned: BaseCheckpoint, key: str, code: str | None) -> Any:
    def data() -> Any:
        if code is None:
            span = tuned.span(key)
            return iter([span]) if span is not None else tuned.pieces(key)
        return cast(tuned.read(key), code).buffer()

    return data
