"""adapter_config.json: read, validate, and write it back as PEFT 0.21.2 writes it.

`LoraConfig` keeps every key it was given, including keys a newer PEFT wrote that this version does
not know, and writes them back verbatim. Output is PEFT's serialization (`indent=2`, sorted keys, no
trailing newline, all 41 fields) with the lists PEFT keeps as sets (target_modules,
exclude_modules) written sorted, so the same config always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from adapterctl.errors import ConfigError
from adapterctl.format.patterns import (
    Pattern,
    PatternSet,
    layers_pattern_regex,
    modules_to_save_regex,
)

CONFIG_NAME = "adapter_config.json"
PEFT_VERSION = "0.21.2"

#: Every field LoraConfig writes in PEFT 0.21.2, with its default.
DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

#: PEFT's task types, in the order `save --help` lists them
TASK_TYPES = (
    "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", "QUESTION_ANS",
)  # fmt: skip
BIAS_VALUES = ("none", "all", "lora_only")
#: Fields PEFT holds as sets: written in arbitrary order by PEFT, sorted by us.
SET_FIELDS = ("target_modules", "exclude_modules")
#: init_lora_weights values that rewrite the base model when PEFT builds the layer
#: (docs/peft-format.md, Trap T9).
RESIDUAL_INITS = ("pissa", "olora", "corda")


_PISSA_NITER = "pissa_niter_"


def is_pissa_niter(init: Any) -> bool:
    """Whether `init_lora_weights` names PiSSA from a randomized SVD (`pissa_niter_...`)."""
    return isinstance(init, str) and init.startswith(_PISSA_NITER)


def pissa_niter(init: Any) -> int | None:
    """K of `pissa_niter_K` (the randomized SVD's iterations); None for anything else."""
    if not is_pissa_niter(init):
        return None
    k = init.removeprefix(_PISSA_NITER)
    return int(k) if k.isdecimal() else None


def residual_init(init: Any) -> bool:
    """Whether `init_lora_weights` leaves a residual base (pissa, pissa_niter_K, olora, corda)."""
    return isinstance(init, str) and (init in RESIDUAL_INITS or is_pissa_niter(init))


_BOOL_FIELDS = ("fan_in_fan_out", "inference_mode", "lora_bias", "use_rslora", "use_dora")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if _is_int(v):
        return bool(abs(v) < 2**1023)  # larger ones overflow any float arithmetic
    return isinstance(v, float) and math.isfinite(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"`{name}` is not a JSON value")


def validate(data: dict[str, Any], label: str, patterns: PatternSet | None = None) -> None:
    """Raise ConfigError naming `label` and the field for anything PEFT would reject or misread
    (every regex in it is compiled, into `patterns` when given)."""
    patterns = patterns if patterns is not None else PatternSet(label)

    def fail(field: str, problem: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"`{label}`: `{field}` {problem}", hint=hint)

    if "peft_type" not in data:
        raise fail("peft_type", "is missing", 'an adapter config needs `"peft_type": "LORA"`')
    if data["peft_type"] != "LORA":
        raise fail(
            "peft_type",
            f"is {json.dumps(data['peft_type'])}; only LoRA adapters are supported",
            'PEFT spells it exactly `"LORA"` (upper case)',
        )
    r = data.get("r", DEFAULTS["r"])
    if not _is_int(r) or not 0 < r <= 2**32:
        raise fail("r", f"must be a positive integer up to 2**32, not {json.dumps(r)}")
    alpha = data.get("lora_alpha", DEFAULTS["lora_alpha"])
    if not _is_number(alpha):
        raise fail("lora_alpha", f"must be a number, not {json.dumps(alpha)}")
    dropout = data.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout <= 1:
        raise fail("lora_dropout", f"must be a number in [0, 1], not {json.dumps(dropout)}")
    for field in _BOOL_FIELDS:
        if field in data and not isinstance(data[field], bool):
            raise fail(field, f"must be true or false, not {json.dumps(data[field])}")
    bias = data.get("bias", "none")
    if bias not in BIAS_VALUES:
        raise fail("bias", f"must be one of {', '.join(BIAS_VALUES)}, not {json.dumps(bias)}")
    task = data.get("task_type")
    if task is not None and (not isinstance(task, str) or task not in TASK_TYPES):
        raise fail(
            "task_type", f"is {json.dumps(task)}, not one of {', '.join(sorted(TASK_TYPES))}"
        )
    init = data.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise fail("init_lora_weights", f"must be true, false or a string, not {json.dumps(init)}")
    # combinations PEFT 0.21.2 refuses when it builds the config
    if data.get("lora_bias") and data.get("use_dora"):
        raise fail("lora_bias", "cannot be combined with `use_dora`", "PEFT refuses this too")
    if data.get("lora_bias") and isinstance(init, str):
        raise fail(
            "lora_bias",
            f"cannot be combined with `init_lora_weights` {init!r}",
            "PEFT refuses this too",
        )
    if data.get("use_dora") and data.get("megatron_config"):
        raise fail("use_dora", "cannot be combined with `megatron_config`", "PEFT refuses this too")
    tp = data.get("target_parameters")
    if tp is not None and not _is_str_list(tp):
        raise fail("target_parameters", "must be a list of parameter names or null")
    for field in ("base_model_name_or_path", "revision"):
        if data.get(field) is not None and not isinstance(data[field], str):
            raise fail(field, f"must be a string or null, not {json.dumps(data[field])}")
    for field in SET_FIELDS:
        value = data.get(field)
        if isinstance(value, str):
            patterns.get(value, f"`{field}`")
        elif value is not None and not _is_str_list(value):
            raise fail(field, "must be a list of module names, a regex string or null")
    mts = data.get("modules_to_save")
    if mts is not None and not _is_str_list(mts):
        raise fail("modules_to_save", "must be a list of module names or null")
    for name in mts or []:
        patterns.get(modules_to_save_regex(name), "`modules_to_save` entry", source=name)
    for field, check, kind in (
        ("rank_pattern", lambda v: _is_int(v) and 0 < v <= 2**32, "a positive integer"),
        ("alpha_pattern", _is_number, "a number"),
    ):
        mapping = data.get(field, {})
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            raise fail(field, "must be an object mapping module patterns to values")
        for key, value in mapping.items():
            if not check(value):
                raise fail(
                    field, f"value for {json.dumps(key)} must be {kind}, not {json.dumps(value)}"
                )
            patterns.check_key(field, key)
    ltt = data.get("layers_to_transform")
    if (
        ltt is not None
        and not _is_int(ltt)
        and not (isinstance(ltt, list) and all(_is_int(x) for x in ltt))
    ):
        raise fail("layers_to_transform", "must be an integer, a list of integers or null")
    lp = data.get("layers_pattern")
    if lp is not None and not isinstance(lp, str) and not _is_str_list(lp):
        raise fail("layers_pattern", "must be a string, a list of strings or null")
    for name in [lp] if isinstance(lp, str) else lp or []:
        patterns.get(layers_pattern_regex(name), "`layers_pattern`", source=name)
    if lp and ltt is None:
        raise fail(
            "layers_pattern", "is set but `layers_to_transform` is not", "PEFT refuses this too"
        )
    if isinstance(data.get("target_modules"), str) and (ltt is not None or lp):
        raise fail(
            "layers_to_transform",
            "cannot be combined with a regex `target_modules`",
            "PEFT refuses this too; put the layer index into the regex instead",
        )


class LoraConfig:
    """A LoRA adapter config, kept losslessly.

    Attribute access returns the value in the file, or PEFT's default where the file has none
    (`config.r`, `config.lora_alpha`, ...). Unknown keys are kept and written back verbatim.
    """

    __slots__ = ("_data", "_encoding", "_patterns")

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("peft_type", "LORA")
        self._encoding = "utf-8"
        self._patterns = PatternSet("LoraConfig")
        validate(fields, "LoraConfig", self._patterns)
        self._data = fields

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, label: str = CONFIG_NAME) -> LoraConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"`{label}` does not hold a JSON object")
        obj = cls.__new__(cls)
        obj._encoding = "utf-8"
        obj._patterns = PatternSet(label)
        validate(data, label, obj._patterns)
        obj._data = dict(data)
        return obj

    @classmethod
    def from_json(cls, text: str | bytes, *, label: str = CONFIG_NAME) -> LoraConfig:
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"`{label}` is not valid JSON: {e}") from e
        return cls.from_dict(data, label=label)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LoraConfig:
        from adapterctl.format.files import read_small

        return cls.from_raw(read_small(path, "adapter config"), label=os.fspath(path))

    @classmethod
    def from_raw(cls, raw: bytes, *, label: str = CONFIG_NAME) -> LoraConfig:
        """A config from a file's bytes, remembering their encoding (see `encoding_problem`)."""
        config = cls.from_json(raw, label=label)
        config._encoding = json.detect_encoding(raw)
        return config

    @property
    def encoding_problem(self) -> str | None:
        """Why PEFT 0.21.2 cannot read the file this config came from, when the only problem is
        its encoding (a UTF-8 BOM, UTF-16 or UTF-32: PEFT reads plain UTF-8); else None."""
        if self._encoding == "utf-8":
            return None
        what = (
            "has a UTF-8 byte order mark"
            if self._encoding == "utf-8-sig"
            else (f"is encoded in {self._encoding.upper()}")
        )
        return f"the config file {what}: PEFT 0.21.2 cannot read it (it reads UTF-8 only)"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        data = object.__getattribute__(self, "_data")
        if name in data:
            return data[name]
        if name in DEFAULTS:
            return DEFAULTS[name]
        raise AttributeError(f"LoraConfig has no field `{name}`")

    def __eq__(self, other: object) -> bool:
        # equal when they write the same bytes (so 16 and 16.0 differ, as their files do)
        return isinstance(other, LoraConfig) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"LoraConfig({', '.join(f'{k}={v!r}' for k, v in sorted(self._data.items()))})"

    @property
    def raw(self) -> dict[str, Any]:
        """The keys as given or as read, nothing filled in."""
        return dict(self._data)

    @property
    def unknown_keys(self) -> list[str]:
        """Keys that PEFT 0.21.2 does not know (it drops them with a warning when loading)."""
        return sorted(k for k in self._data if k not in DEFAULTS)

    def replace(self, **changes: Any) -> LoraConfig:
        return LoraConfig.from_dict({**self._data, **changes}, label="LoraConfig")

    def to_dict(self) -> dict[str, Any]:
        """All 41 PEFT fields (defaults filled in), unknown keys kept, set-like lists sorted."""
        out = {**DEFAULTS, **self._data}
        out["inference_mode"] = True
        for field in SET_FIELDS:
            if isinstance(out[field], list):
                out[field] = sorted(set(out[field]))
        return out

    def to_json(self) -> str:
        """PEFT's serialization: indent 2, sorted keys, no trailing newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # --- per-module rank, alpha and scaling (docs/peft-format.md §3.1) -------------------------

    def regex(self, regex: str, field: str, *, source: str | None = None) -> Pattern:
        """A regex from this config (`field` names it in errors), compiled once, matched within
        the budget its config's patterns share for the run (adapterctl.format.patterns)."""
        return self._patterns.get(regex, field, source=source)

    def in_exclude_modules(self, module: str) -> bool:
        """Whether `exclude_modules` excludes module path `module` (PEFT's rule: a string is a
        regex matched in full, within the config's pattern budget; a list names modules by their
        path or its last dotted parts)."""
        exclude = self.exclude_modules
        if not exclude:
            return False
        if isinstance(exclude, str):
            return self.regex(exclude, "`exclude_modules`").fullmatch(module) is not None
        return module in exclude or any(module.endswith("." + e) for e in exclude)

    def matching_patterns(self, field: str, module: str) -> list[str]:
        """The keys of `rank_pattern` / `alpha_pattern` that match `module`, in file order."""
        # each module is looked up once per config: every caller asks again per module
        memo = self._patterns.memo(field)
        found = memo.get(module)
        if found is None:
            patterns = getattr(self, field) or {}
            if not patterns:
                return []
            keys = self._patterns.keys_matching(field, patterns, module)
            found = memo[module] = self._patterns.shared(keys)
        return list(found)

    def rank_for(self, module: str) -> int:
        keys = self.matching_patterns("rank_pattern", module)
        return int(self.rank_pattern[keys[0]]) if keys else int(self.r)

    def alpha_for(self, module: str) -> float:
        keys = self.matching_patterns("alpha_pattern", module)
        value = self.alpha_pattern[keys[0]] if keys else self.lora_alpha
        return value  # type: ignore[no-any-return]

    def scaling(self, alpha: float, r: int) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def edited_json(raw: bytes, **fields: Any) -> str:
    """A config file's JSON (bytes, as `from_file` reads them: a BOM or UTF-16 is fine) with
    `fields` set and everything else as the file has it: key order too, nested keys included,
    since `rank_pattern`/`alpha_pattern` are tried in file order
    (docs/peft-format.md, Trap T1)."""
    doc = json.loads(raw, parse_constant=_reject_constant)
    doc.update(fields)
    return json.dumps(doc, indent=2)


def reload_drift(config: LoraConfig, modules: list[str]) -> list[str]:
    """Modules whose rank or alpha would change once the config is written and read back
    (docs/peft-format.md, Trap T1).

    In memory PEFT tries pattern keys in insertion order; the file is written with sorted keys, and
    a reader tries them in that order. Where overlapping keys resolve differently, the reloaded
    adapter means something else (PEFT then fails on a rank, or silently changes a scaling).
    """
    problems = []
    for field in ("rank_pattern", "alpha_pattern"):
        patterns: dict[str, Any] = getattr(config, field) or {}
        resorted = {k: patterns[k] for k in sorted(patterns)}
        for module in modules:
            now = config.matching_patterns(field, module)
            later = [k for k in resorted if k in now]
            if now and later and patterns[now[0]] != patterns[later[0]]:
                problems.append(
                    f"`{module}`: {field} gives {patterns[now[0]]} (key {now[0]!r}) now but "
                    f"{patterns[later[0]]} (key {later[0]!r}) once saved and reloaded"
                )
    return problems
