"""`extract --verify`: the written adapter read back, each module's s·B·A (s from the written
config) against TUNED - BASE recomputed from the checkpoints, ||difference|| / ||TUNED - BASE||;
allowed: the relative error the report gives, plus the rounding of the factors' dtype
(||B||·||A|| <= sqrt(k)·||ΔW|| for these factors), plus 1e-6 (as `convert --dora-to-lora`'s
checks). Tied heads are checked as written (their own keys); whole tensors byte for byte."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterctl.format.checkpoint import BaseCheckpoint
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.keys import stored_key
from adapterctl.format.layout import SAFETENSORS_NAME
from adapterctl.format.rawtensor import RawTensor, cast, to_float64
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops.convert import Check, Verification, factored_allowance
from adapterctl.ops.extract.deltas import Extracted, delta
from adapterctl.ops.extract.plan import Whole


def _read(reader: SafetensorsReader, key: str) -> tuple[object, str]:
    info = reader.tensors[key]
    return to_float64(RawTensor(info.dtype, info.shape, reader.array(key))), info.dtype.code


#: float64 values per piece of s·B·A (32 MiB): the product is never made whole
_PIECE = 1 << 22


def _off_by(s: float, b: Any, a: Any, want: Any, transposed: bool) -> float:
    """||s·B·A - want||² (`want` transposed for a tied head), made in pieces of rows."""
    target = want.T if transposed else want
    total = 0.0
    step = max(1, _PIECE // max(1, a.shape[1]))
    for start in range(0, len(b), step):
        got = s * (b[start : start + step] @ a)
        got -= target[start : start + step]
        total += float((got**2).sum())
    return total


def factor_keys(e: Extracted) -> list[tuple[str, str, str, bool]]:
    """(module, B key, A key, transposed) of every LoRA module `e` is written as: an embedding's
    lora_embedding_B/A, a tied head's lora_B/A (its B·A is the embedding change transposed)."""
    m = e.job.module
    if e.job.kind == "embedding":
        keys = [(m, stored_key(m, "lora_embedding_B"), stored_key(m, "lora_embedding_A"), False)]
    else:
        keys = [(m, stored_key(m, "lora_B"), stored_key(m, "lora_A"), False)]
    keys += [(h, stored_key(h, "lora_B"), stored_key(h, "lora_A"), True) for h in e.job.heads]
    return keys


def check(
    directory: Path,
    base: BaseCheckpoint,
    tuned: BaseCheckpoint,
    extracted: list[Extracted],
    whole: list[tuple[Whole, str | None]],
    progress: Callable[[int, int], None] | None = None,
) -> Verification:
    import numpy as np

    config = LoraConfig.from_file(directory / CONFIG_NAME)
    checks: list[Check] = []
    total = len(extracted) + len(whole)
    with SafetensorsReader(directory / SAFETENSORS_NAME) as reader:
        for e in extracted:
            want = delta(base, tuned, e.job)
            norm = float(np.linalg.norm(want))
            for module, b_key, a_key, transposed in factor_keys(e):
                (b, b_code), (a, a_code) = _read(reader, b_key), _read(reader, a_key)
                s = config.scaling(config.alpha_for(module), config.rank_for(module))
                error = math.sqrt(_off_by(s, np.asarray(b), np.asarray(a), want, transposed))
                rel = error / norm if norm else (0.0 if error == 0.0 else math.inf)
                k = np.asarray(a).shape[0]
                allowed = factored_allowance(e.factored.relative_error, (b_code, a_code), k)
                checks.append(Check(f"{module} (TUNED - BASE)", rel, allowed))
            del want
            if progress is not None:
                progress(1, total)
        for w, code in whole:
            raw = tuned.read(w.key)
            expected = raw if code is None else cast(raw, code)
            same = bytes(expected.buffer()) == reader.read_bytes(w.stored)
            checks.append(Check(w.stored, 0.0 if same else math.inf, 0.0))
            if progress is not None:
                progress(1, total)

    def ratio(c: Check) -> float:
        return c.error / c.threshold if c.threshold else (0.0 if c.error == 0.0 else math.inf)

    return Verification(len(checks), max(checks, key=ratio, default=None))
