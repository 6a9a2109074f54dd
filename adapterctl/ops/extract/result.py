"""What `extract` reports: per module, the rank it was written at and what the cut cost; the
tensors that changed but were not stored; what was stored whole; sizes, time, memory, --verify."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterctl.errors import ConversionError
from adapterctl.format.config import LoraConfig
from adapterctl.ops import SCHEMA_VERSION, failure_message
from adapterctl.ops.convert import Verification


@dataclass(frozen=True)
class ModuleResult:
    module: str
    kind: str  # linear, conv1d or embedding
    shape: tuple[int, ...]  # the weight as the checkpoints store it
    rank: int
    method: str  # "exact" (no SVD), "svd" or "randomized" (ops/convert/dense.py)
    energy: float  # the fraction of ||ΔW||² kept
    relative_error: float  # ||ΔW - B·A|| / ||ΔW||
    capped: bool  # a rank above the module's full rank was asked for: its full rank written
    tied: tuple[str, ...] = ()  # output heads written from the same change

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "shape": list(self.shape),
            "rank": self.rank,
            "method": self.method,
            "energy": self.energy,
            "relative_error": self.relative_error,
            "capped": self.capped,
            "tied": list(self.tied),
        }


@dataclass
class ExtractResult:
    base: str
    tuned: str
    output: str
    dtype: str | None  # --dtype; None: each module's TUNED dtype
    config: LoraConfig
    modules: list[ModuleResult]
    unchanged: int  # targeted modules whose weight did not change (nothing written for them)
    changed_not_stored: list[str]  # TUNED tensors that changed and are not in the adapter
    modules_to_save: list[str]  # the stored keys of tensors stored whole
    bytes: int
    seconds: float
    peak_memory: int  # bytes (maxrss)
    warnings: list[str] = field(default_factory=list)
    verification: Verification | None = None

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "schema_version": SCHEMA_VERSION,
            "base": self.base,
            "tuned": self.tuned,
            "output": self.output,
            "dtype": self.dtype,
            "config": {
                "r": c.r,
                "lora_alpha": c.lora_alpha,
                "rank_pattern": c.rank_pattern or {},
                "alpha_pattern": c.alpha_pattern or {},
                "target_modules": c.target_modules,
                "modules_to_save": c.modules_to_save,
                "task_type": c.task_type,
            },
            "modules": [m.to_dict() for m in self.modules],
            "unchanged": self.unchanged,
            "changed_not_stored": self.changed_not_stored,
            "modules_to_save": self.modules_to_save,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "peak_memory": self.peak_memory,
            "warnings": self.warnings,
            "verification": None if self.verification is None else self.verification.to_dict(),
        }


class VerificationFailed(ConversionError):
    """The written factors do not give TUNED - BASE within the thresholds; nothing was renamed."""

    def __init__(self, result: ExtractResult) -> None:
        worst = result.verification.worst if result.verification else None
        super().__init__(
            failure_message(worst),
            hint="the output was not written; report this with the command line you ran",
        )
        self.result = result
