"""convert_adapter(): one adapter rewritten in a single streaming pass (PiSSA/OLoRA/CorDA to plain
LoRA, dtype, `.bin` to safetensors, rank), optionally verified before it is renamed into place."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapterctl.errors import AdapterFormatError, ConversionError, InvalidOptionError
from adapterctl.format.atomic import atomic_directory, preflight
from adapterctl.format.config import CONFIG_NAME, LoraConfig, residual_init
from adapterctl.format.layout import README_NAME, SAFETENSORS_NAME, AdapterFiles, find_adapters
from adapterctl.format.peftversions import KEYS, for_release, knows, release, release_json
from adapterctl.format.rawtensor import CAST_TARGETS, OpenStore, numel
from adapterctl.format.tensors import TensorSource, write_safetensors
from adapterctl.format.variants import refuse_variants
from adapterctl.ops import SCHEMA_VERSION, failure_message
from adapterctl.ops.convert.dora import DoraDeltas, dora_checks, dora_reports, with_checks
from adapterctl.ops.convert.embeddings import EmbeddingDeltas, embedding_checks, embedding_reports
from adapterctl.ops.convert.initial import (
    REBUILDABLE,
    Initial,
    RebuiltInitial,
    SavedInitial,
    rebuild_method,
)
from adapterctl.ops.convert.plan import (
    ModuleReport,
    Options,
    OutputTensor,
    Plan,
    missing_from_trained,
)
from adapterctl.ops.convert.portable import Kept
from adapterctl.ops.convert.verify import Verification, verify

log = logging.getLogger(__name__)

#: a variant's tensors are not plain LoRA factors: no cast, rank or residual rule applies as is
_VARIANT_HINT = "convert it with PEFT; `adapterctl select` copies it unchanged"


class Progress(Protocol):
    """`progress(advance, total)` while the output is written (bytes), and
    `progress(advance, total, phase)` in the steps around it: "finding ranks" (--energy) or
    "reducing ranks" (--rank), counting the modules whose spectrum is computed before writing,
    and "verifying" (checks, after writing); a new phase starts at 0."""

    def __call__(self, advance: int, total: int, phase: str = "converting", /) -> None: ...


@dataclass
class ConversionResult:
    source: str
    output: str
    initial: str | None
    base: str | None
    method: str | None  # the init converted from (pissa, olora, corda, ...)
    dtype: str | None
    config: LoraConfig
    bytes_in: int
    bytes_out: int
    modules: list[ModuleReport]
    warnings: list[str] = field(default_factory=list)
    verification: Verification | None = None
    portable: bool = False
    #: --portable: what was kept as is because no engine computes it from plain factors
    not_portable: list[Kept] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        # --portable's keys only with it: every other conversion's document is unchanged
        portable = (
            {"portable": True, "not_portable": [k.to_dict() for k in self.not_portable]}
            if self.portable
            else {}
        )
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "output": self.output,
            "initial": self.initial,
            "base": self.base,
            "converted_from": self.method,
            "dtype": self.dtype,
            "config": {
                "r": c.r,
                "lora_alpha": c.lora_alpha,
                "use_rslora": c.use_rslora,
                "rank_pattern": c.rank_pattern or {},
                "alpha_pattern": c.alpha_pattern or {},
                "init_lora_weights": c.init_lora_weights,
            },
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "modules": [m.to_dict() for m in self.modules],
            "warnings": self.warnings,
            "verification": self.verification.to_dict() if self.verification else None,
            **portable,
        }


class VerificationFailed(ConversionError):
    """The written files do not match the source within the thresholds; nothing was renamed."""

    def __init__(self, result: ConversionResult) -> None:
        worst = result.verification.worst if result.verification else None
        super().__init__(
            failure_message(worst),
            hint="the output was not written; report this with the adapter's `inspect --json`",
        )
        self.result = result


def one_adapter(path: str | os.PathLike[str], what: str) -> AdapterFiles:
    """The one adapter at `path` (a conversion's source or initial adapter), with its config."""
    found = find_adapters(path)
    if len(found) != 1:
        raise ConversionError(
            f"{what} `{path}` holds {len(found)} adapters ({', '.join(a.name for a in found)})",
            hint="pass one adapter's own folder, e.g. "
            f"`{Path(path) / found[-1].name}` (or pick it with `adapterctl select`)",
        )
    files = found[0]
    if files.config_path is None:
        raise AdapterFormatError(
            f"`{files.weights_path}` has no `{CONFIG_NAME}` beside it; a conversion needs the config"
        )
    for message in files.warnings:
        log.warning("%s", message)
    return files


def _check_options(
    initial: object, base: object, init: str | None, dtype: str | None, rank: int | None,
    energy: float | None,
) -> str | None:  # fmt: skip
    if initial is not None and base is not None:
        raise InvalidOptionError("pass --initial or --base, not both")
    if init is not None and base is None:
        raise InvalidOptionError("--init does nothing without --base")
    if init is not None and init not in REBUILDABLE:
        raise InvalidOptionError(f"--init must be one of {', '.join(REBUILDABLE)}, not {init!r}")
    if rank is not None and energy is not None:
        raise InvalidOptionError("pass --rank or --energy, not both")
    if rank is not None and rank < 1:
        raise InvalidOptionError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InvalidOptionError(
            f"--energy must be a fraction in (0, 1], not {energy}", hint="e.g. --energy 0.99"
        )
    if dtype is None:
        return None
    if dtype not in CAST_TARGETS:
        raise InvalidOptionError(
            f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(CAST_TARGETS)}"
        )
    return CAST_TARGETS[dtype]


def _check_dora(initial: object, base: object, init: str | None) -> None:
    if base is None:
        raise InvalidOptionError(
            "--dora-to-lora needs --base: a DoRA module's weight change depends on its base weight",
            hint="pass --base with the base model the adapter was made on",
        )
    if initial is not None or init is not None:
        raise InvalidOptionError("--dora-to-lora takes neither --initial nor --init")


def _check_embeddings(initial: object, base: object, init: str | None, dora: bool) -> None:
    if base is None:
        raise InvalidOptionError(
            "--embeddings-to-lora needs --base: a copy's change is copy - base weight",
            hint="pass --base with the base model the adapter was made on",
        )
    if initial is not None or init is not None:
        raise InvalidOptionError("--embeddings-to-lora takes neither --initial nor --init")
    if dora:
        raise InvalidOptionError(
            "pass --embeddings-to-lora or --dora-to-lora, not both",
            hint="convert with one, then convert its output with the other",
        )


def convert_adapter(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    initial: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    init: str | None = None,
    dtype: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    portable: bool = False,
    dora_to_lora: bool = False,
    embeddings_to_lora: bool = False,
    peft_version: str | None = None,
    verify_output: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
) -> ConversionResult:
    """Write `output`: the adapter at `source` converted; atomically, or not at all. `source`,
    `initial` and `base` may be Hub repo ids (`revision`/`subfolder` apply to `source`).
    `portable`: every module's scaling folded into B and its rank padded to one R (`--rank`,
    else the largest), `r = lora_alpha = R`, no rslora, no patterns (ops/convert/portable.py).
    `dora_to_lora`: each DoRA module's weight change on `base` written as plain LoRA factors
    (full rank, or `rank`/`energy`), scaling 1 (ops/convert/dora.py).
    `embeddings_to_lora`: full embedding / lm_head copies in modules_to_save and trainable-token
    deltas written as LoRA factors of their change on `base` (exact at the changed rows, or
    `rank`/`energy`), scaling 1 (ops/convert/embeddings.py).
    `peft_version` ("0.10"): write a config that this PEFT release reads with the same meaning."""
    from adapterctl.ops.hub import resolve

    code = _check_options(initial, base, init, dtype, rank, energy)
    if dora_to_lora:
        _check_dora(initial, base, init)
    if embeddings_to_lora:
        _check_embeddings(initial, base, init, dora_to_lora)
    if peft_version is not None:
        peft_version = release(peft_version)
    label = os.fspath(source)
    local = [p for p in (source, initial, base) if p is not None]
    preflight([output], force=force, inputs=local)  # before anything is downloaded
    source = resolve(source, kind="adapters", revision=revision, subfolder=subfolder, token=token)
    if initial is not None:
        initial = resolve(initial, kind="adapters", token=token)
    if base is not None:
        base = resolve(base, kind="base", token=token)
    files = one_adapter(source, "source")
    assert files.config_path is not None
    nothing = (initial, base, code, rank, energy, peft_version) == (None,) * 6
    if (
        nothing
        and not (portable or dora_to_lora or embeddings_to_lora)
        and files.format == "safetensors"
    ):
        raise ConversionError(
            "nothing to convert: the source is already safetensors",
            hint="pass --initial/--base (to plain LoRA), --dtype, --rank or --energy",
        )
    out = Path(output)
    inputs = [*local, *(p for p in (source, initial, base) if p is not None)]  # Hub: the cache
    preflight([out], force=force, inputs=inputs)
    config = LoraConfig.from_file(files.config_path)
    # trainable tokens are what --embeddings-to-lora converts
    tokens = config.replace(trainable_token_indices=None) if embeddings_to_lora else config
    refuse_variants(tokens, label, _VARIANT_HINT)
    folded = None
    if peft_version is not None and config.use_rslora and not knows(peft_version, "use_rslora"):
        # rslora written in that release's terms exactly: its scaling folded into B (--portable)
        portable, folded = (
            True,
            (
                f"PEFT {peft_version} does not know rslora (first in PEFT "
                f"{KEYS['use_rslora'].since}): each module's scaling is folded into its lora_B and "
                "every module padded to one rank, as --portable does"
            ),
        )
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(OpenStore(files.weights_path, files.format))
        provider: Initial | None = None
        method = None
        dora: DoraDeltas | None = None
        embeddings: EmbeddingDeltas | None = None
        if initial is not None:
            init_files = one_adapter(initial, "initial adapter")
            assert init_files.config_path is not None
            init_store = stack.enter_context(OpenStore(init_files.weights_path, init_files.format))
            init_config = LoraConfig.from_file(init_files.config_path)
            refuse_variants(init_config, os.fspath(initial), _VARIANT_HINT)
            provider = SavedInitial(init_store, init_config)
            # what the pair says it was (either config may already say `true`), else null
            inits = (config.init_lora_weights, init_config.init_lora_weights)
            method = next((str(m) for m in inits if residual_init(m)), None)
        elif dora_to_lora:
            from adapterctl.format.checkpoint import BaseCheckpoint

            assert base is not None  # _check_dora
            phase = "finding ranks" if energy is not None else "factoring"
            dora = DoraDeltas(
                store, config, stack.enter_context(BaseCheckpoint(base)),
                rank=rank, energy=energy, progress=_phase(progress, phase),
            )  # fmt: skip
            store, config, rank, energy, method = dora, dora.config, None, None, "dora"
        elif embeddings_to_lora:
            from adapterctl.format.checkpoint import BaseCheckpoint

            assert base is not None  # _check_embeddings
            phase = "finding ranks" if energy is not None else "factoring"
            embeddings = EmbeddingDeltas(
                store, config, stack.enter_context(BaseCheckpoint(base)),
                rank=rank, energy=energy, out_dtype=code, progress=_phase(progress, phase),
            )  # fmt: skip
            store, config, rank, energy = embeddings, embeddings.config, None, None
            method = "embeddings"
        elif base is not None:
            from adapterctl.format.checkpoint import BaseCheckpoint

            method = rebuild_method(config, init)
            checkpoint = stack.enter_context(BaseCheckpoint(base))
            provider = RebuiltInitial(checkpoint, method, config)
        ranking = None
        if rank is not None or energy is not None:  # the spectra are computed while planning
            ranking = _phase(progress, "finding ranks" if energy is not None else "reducing ranks")
        plan = Plan(
            store, config, Options(provider, code, rank, energy, portable), progress=ranking
        )
        if dora is not None:
            dora_reports(dora, plan)
        if embeddings is not None:
            embedding_reports(embeddings, plan)
        missing = missing_from_trained(plan)
        if missing:
            raise ConversionError(
                f"`{missing[0]}` is in the initial adapter but not in the trained one",
                hint="pass the initial adapter saved right before this adapter was trained",
            )
        if peft_version is not None:  # the config rewritten last, after every other change
            modules = [m.report.module for m in plan.modules]
            plan.config, notes = for_release(plan.config, peft_version, modules)
            plan.warnings += [folded, *notes] if folded else notes
        if config.encoding_problem:
            plan.warnings.insert(
                0,
                f"`{files.config_path}`: {config.encoding_problem}; the output's config is UTF-8",
            )
        for message in plan.warnings:
            log.warning("%s", message)
        total = sum(o.dtype.bits * numel(o.shape) // 8 for o in plan.outputs)
        result = ConversionResult(
            source=label,
            output=os.fspath(output),
            initial=os.fspath(initial) if initial is not None else None,
            base=os.fspath(base) if base is not None else None,
            method=method,
            dtype=dtype,
            config=plan.config,
            bytes_in=os.path.getsize(files.weights_path),
            bytes_out=0,
            modules=plan.reports,
            warnings=list(plan.warnings),
            portable=portable,
            not_portable=list(plan.not_portable),
        )
        # SOURCE's card, read before any output exists: a card that cannot be read is its error
        from adapterctl.ops.card import read_card

        existing_card = read_card(files.directory) if files.directory is not None else None
        with atomic_directory(out, force=force, inputs=inputs) as tmp:
            result.bytes_out = _write(plan, tmp, total, progress)
            if peft_version is not None:  # only the fields that release knows
                (tmp / CONFIG_NAME).write_text(release_json(plan.config, peft_version))
            if existing_card is not None and files.directory is not None:
                _write_card(existing_card, files.directory, tmp, out, plan.config, result.warnings)
            if verify_output:
                result.verification = verify(plan, tmp, _phase(progress, "verifying"))
                if dora is not None:  # the new deltas against W_dora - W, from the base again
                    result.verification = with_checks(result.verification, dora_checks(dora, tmp))
                if embeddings is not None:  # the new deltas against copy - base, read again
                    checks = embedding_checks(embeddings, tmp)
                    result.verification = with_checks(result.verification, checks)
                if not result.verification.passed:
                    raise VerificationFailed(result)
    return result


def _phase(progress: Progress | None, phase: str) -> Callable[[int, int], None] | None:
    """A two-argument progress callback for one phase (started at once, at 0)."""
    if progress is None:
        return None
    started = False

    def advance(n: int, total: int) -> None:
        nonlocal started
        if not started:
            progress(0, total, phase)
            started = True
        progress(n, total, phase)

    return advance


def _write_card(
    existing: str, source: Path, tmp: Path, out: Path, config: LoraConfig, warnings: list[str]
) -> None:
    """SOURCE's card with its adapter facts rewritten for the converted config, into `tmp` (what
    becomes `out`)."""
    from adapterctl.ops.card import facts_note, refresh_card

    where = f"`{source / README_NAME}`"
    text = refresh_card(existing, {"default": config}, where)
    (tmp / README_NAME).write_bytes(text.encode("utf-8"))
    written = f"the card written to `{out / README_NAME}`"
    note = facts_note(existing, {"default": config}, written, where)
    if note:
        warnings.append(note)
        log.warning("%s", note)


def _write(plan: Plan, directory: Path, total: int, progress: Progress | None) -> int:
    def source(o: OutputTensor) -> TensorSource:
        def data() -> Any:
            t = o.produce()
            if (t.dtype, t.shape) != (o.dtype, o.shape):  # pragma: no cover - a planning bug
                raise ConversionError(
                    f"`{o.name}` came out {t.dtype.code}{list(t.shape)}, planned "
                    f"{o.dtype.code}{list(o.shape)}"
                )
            return t.buffer()

        return TensorSource(o.name, o.dtype, o.shape, data)

    def advance(n: int) -> None:
        if progress is not None:
            progress(n, total)

    with open(directory / SAFETENSORS_NAME, "wb") as f:
        written = write_safetensors(f, [source(o) for o in plan.outputs], progress=advance)
    (directory / CONFIG_NAME).write_text(plan.config.to_json())
    return written
