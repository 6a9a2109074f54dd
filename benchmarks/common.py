"""What the benchmark scripts share: targets and the versions measured."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

DISTRIBUTIONS = ("adapterctl", "peft", "safetensors", "torch", "transformers", "typer", "rich")


@dataclass
class Target:
    """One performance target: a measured value and the limit it must not exceed."""

    name: str
    value: float
    unit: str
    limit: float
    detail: str

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 6),
            "unit": self.unit,
            "target_max": self.limit,
            "met": self.met,
            "detail": self.detail,
        }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found
