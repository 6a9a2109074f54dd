"""A new adapter as the `save` command describes it, and the config fields it becomes.

`NewAdapter` holds what a person chooses for a new adapter (rank, alpha, targets, init, ...),
checks each value where it is made, and gives the `adapter_config.json` fields PEFT would write
for it (`config_fields()`). A bad value is an `OptionValueError` naming the option it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from adapterctl.errors import InvalidOptionError
from adapterctl.format.config import TASK_TYPES, pissa_niter

#: `--init` values and the `init_lora_weights` each writes (and pissa_niter_K as itself)
INITS: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}
INIT_CHOICES = ("default", "gaussian", "pissa", "pissa_niter_K", "olora")
#: `--save-embedding-layers` values: PEFT's "auto", or always/never
EMBEDDING_CHOICES = ("auto", "true", "false")


class OptionValueError(InvalidOptionError):
    """A value that the option it was given to does not take (`--init foo`): a usage error."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def split_targets(values: Sequence[str]) -> list[str]:
    """`--target` values: each a module name or a comma-separated list of them."""
    return [n.strip() for item in values for n in item.split(",") if n.strip()]


def number(text: str) -> int | float:
    """A number as typed: `8` an int, `8.0` or `0.5` a float."""
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def parse_pairs(values: Sequence[str], option: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    """`KEY=VALUE` items (the value a number made by `cast`) as a dict; the key may hold `=`."""
    out = {}
    for item in values:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise OptionValueError(option, f"{item!r}: expected KEY=VALUE")
        try:
            out[key] = cast(value)
        except ValueError as e:
            raise OptionValueError(option, f"{item!r}: {value!r} is not a number") from e
    return out


@dataclass(frozen=True)
class NewAdapter:
    """A new LoRA adapter: exactly one of `targets` (names, or ["all-linear"]) and
    `target_regex`; `alpha` None means r."""

    r: int
    targets: list[str] = field(default_factory=list)
    target_regex: str | None = None
    alpha: float | None = None
    init: str = "default"
    dropout: float = 0.0
    bias: str = "none"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    task_type: str | None = None
    base_model: str | None = None
    save_embedding_layers: str = "auto"

    def __post_init__(self) -> None:
        if bool(self.targets) == bool(self.target_regex):
            raise OptionValueError(
                "--target", "pass --target NAME ... or --target-regex REGEX (one of them)"
            )
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise OptionValueError(
                "--task-type", f"{self.task_type!r} is not one of {', '.join(TASK_TYPES)}"
            )
        if any(n < 0 for n in self.layers):
            raise InvalidOptionError(
                f"--layers takes layer indices (0, 1, ...), not {min(self.layers)}"
            )
        if self.save_embedding_layers not in EMBEDDING_CHOICES:
            raise OptionValueError("--save-embedding-layers", "auto, true or false")
        if self.init not in INITS and pissa_niter(self.init) is None:
            raise OptionValueError(
                "--init", f"{self.init!r}: {', '.join(INIT_CHOICES[:-1])} or olora"
            )

    @classmethod
    def from_options(
        cls, *, targets: Sequence[str], rank_pattern: Sequence[str], alpha_pattern: Sequence[str],
        **options: Any,
    ) -> NewAdapter:  # fmt: skip
        """From the command line's values: `--target` items split at commas, the patterns as
        KEY=VALUE items (checked after every other value)."""
        new = cls(targets=split_targets(targets), **options)
        return replace(
            new,
            rank_pattern=parse_pairs(rank_pattern, "--rank-pattern", int),
            alpha_pattern=parse_pairs(alpha_pattern, "--alpha-pattern", number),
        )

    @property
    def init_value(self) -> bool | str:
        """What `init_lora_weights` says for this init."""
        return INITS.get(self.init, self.init)

    @property
    def embeddings(self) -> str | bool:
        """`save_embedding_layers` as PEFT's save_pretrained takes it: "auto", True or False."""
        if self.save_embedding_layers == "auto":
            return "auto"
        return self.save_embedding_layers == "true"

    def config_fields(self) -> dict[str, Any]:
        """The LoraConfig fields this adapter sets (the rest keep PEFT's defaults)."""
        fields: dict[str, Any] = {
            "r": self.r,
            "lora_alpha": number(str(self.alpha)) if self.alpha is not None else self.r,
            "target_modules": self.target_regex
            if self.target_regex
            else ("all-linear" if self.targets == ["all-linear"] else list(self.targets)),
            "init_lora_weights": self.init_value,
            "lora_dropout": self.dropout,
            "bias": self.bias,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "modules_to_save": list(self.modules_to_save) or None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": list(self.layers) or None,
            "exclude_modules": list(self.exclude) or None,
            "task_type": self.task_type,
        }
        if self.base_model is not None:
            fields["base_model_name_or_path"] = self.base_model
        return fields


#: PEFT condenses a stored target list of this many entries or more (docs/peft-format.md §4.3)
CONDENSE_FROM = 20


def condense(targets: list[str], others: list[str]) -> list[str]:
    """A minimal set of suffixes that selects `targets` and none of `others` (PEFT condenses a
    target list of 20 or more entries this way before it stores it; docs/peft-format.md §4.3)."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first

    taken_by_others = {s for name in others for s in suffixes(name)}
    chosen: set[str] = set()
    for options in sorted(suffixes(name) for name in set(targets)):
        name = options[-1]
        if any(name == c or name.endswith("." + c) for c in chosen):
            continue
        for suffix in options:
            if suffix not in taken_by_others and suffix not in chosen:
                chosen.add(suffix)
                break
    return sorted(chosen) if chosen else sorted(set(targets))
