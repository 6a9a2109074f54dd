"""What each PEFT release from 0.6 to 0.21 knows of `adapter_config.json`, and the rules for
writing a config that an older release reads with the same meaning (`convert --peft-version`)
or telling what it would do with one (`peft_version_findings`, for `inspect --engine peft@X.Y`).

Sources (github.com/huggingface/peft; tests/peft_sources.py regenerates `KEYS` from them):

* the keys: the dataclass fields of `LoraConfig` in `src/peft/tuners/lora/config.py` and of its
  bases `PeftConfigMixin`/`PeftConfig` in `src/peft/config.py`, at tags v0.6.0 ... v0.20.0, and in
  the peft-0.21.0 wheel (`peft/config.py`, `peft/tuners/lora/config.py`). No key was removed
  and no default changed in that range.
* unknown keys on load: `PeftConfigMixin.from_pretrained` calls `config_cls(**kwargs)`, so up to
  0.13 an unknown key raises `TypeError: __init__() got an unexpected keyword argument`
  (config.py@v0.13.0); from 0.14 `from_peft_type` catches it, drops the keys
  (`_check_and_remove_unused_kwargs`) and warns (config.py@v0.14.0).
* init_lora_weights values: the `Literal[...]` of its annotation (lora/config.py@v0.X.0); an
  unknown string raises `ValueError: Unknown initialization` in `LoraLayer.reset_lora_parameters`
  (lora/layer.py@v0.7.0 on) when the layer is built; 0.6 initialises any true value as `true`.
* target_modules="all-linear": `INCLUDE_LINEAR_LAYERS_SHORTHAND`, tuners/tuners_utils.py@v0.8.0;
  before, the string is a regex that matches no module.
* rank_pattern/alpha_pattern keys: up to 0.14 the first key with `re.match(rf".*\\.{key}$", name)`,
  else the module's own name if it is a key (lora/model.py@v0.6.0, utils/other.py@v0.14.0:
  get_pattern_key); from 0.15 the first key with `re.match(rf"(.*\\.)?({key})$", name)`
  (utils/other.py@v0.15.0). Before 0.15 a key matching a name from its first character (a
  regex, or a whole name behind a suffix key) loses to a suffix key, or does not apply.
* layers_to_transform: the layer index is `re.match(r".*\\.[^.]*\\.(\\d+)\\.", name)` (the last
  indexed part) up to 0.19 and `r".*?\\.[^.]*\\.(\\d+)\\."` (the first) from 0.20
  (tuners_utils.py@v0.20.0:check_target_module_exists).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from adapterctl.errors import ConversionError, InvalidOptionError
from adapterctl.format.config import LoraConfig, residual_init
from adapterctl.format.patterns import layer_index
from adapterctl.format.variants import BY_FIELD, INERT, VARIANT

RELEASES: tuple[str, ...] = tuple(f"0.{n}" for n in range(6, 22))

#: from this release on, unknown config keys are dropped with a warning (before: TypeError)
DROPS_UNKNOWN_SINCE = "0.14"
#: target_modules="all-linear" is understood from this release on
ALL_LINEAR_SINCE = "0.8"
ALL_LINEAR = "all-linear"
#: rank/alpha pattern keys are matched as in PEFT 0.21 from this release on
WHOLE_NAME_PATTERNS_SINCE = "0.15"
#: the layer index of layers_to_transform is the first indexed part of a name from this release on
FIRST_LAYER_INDEX_SINCE = "0.20"


@dataclass(frozen=True)
class Key:
    name: str
    since: str  # the first release whose LoraConfig has the field
    default: Any
    removed: str | None = None  # the first release without it again (none in 0.6 .. 0.21)


def _keys(*rows: tuple[str, str, Any]) -> dict[str, Key]:
    return {name: Key(name, since, default) for name, since, default in rows}


#: every LoraConfig field of 0.6 .. 0.21, with the first release that has it and its default
KEYS: dict[str, Key] = _keys(
    # peft/config.py: PeftConfigMixin, PeftConfig
    ("peft_type", "0.6", None),
    ("auto_mapping", "0.6", None),
    ("base_model_name_or_path", "0.6", None),
    ("revision", "0.6", None),
    ("task_type", "0.6", None),
    ("inference_mode", "0.6", False),
    ("peft_version", "0.18", None),
    # peft/tuners/lora/config.py: LoraConfig
    ("r", "0.6", 8),
    ("target_modules", "0.6", None),
    ("lora_alpha", "0.6", 8),
    ("lora_dropout", "0.6", 0.0),
    ("fan_in_fan_out", "0.6", False),
    ("bias", "0.6", "none"),
    ("modules_to_save", "0.6", None),
    ("init_lora_weights", "0.6", True),
    ("layers_to_transform", "0.6", None),
    ("layers_pattern", "0.6", None),
    ("rank_pattern", "0.6", {}),
    ("alpha_pattern", "0.6", {}),
    ("megatron_config", "0.7", None),
    ("megatron_core", "0.7", "megatron.core"),
    ("loftq_config", "0.7", {}),
    ("use_rslora", "0.8", False),
    ("use_dora", "0.9", False),
    ("layer_replication", "0.10", None),
    ("runtime_config", "0.12", "LoraRuntimeConfig()"),  # never saved (to_dict drops it)
    ("exclude_modules", "0.14", None),
    ("eva_config", "0.14", None),
    ("lora_bias", "0.14", False),
    ("trainable_token_indices", "0.15", None),
    ("corda_config", "0.15", None),
    ("use_qalora", "0.16", False),
    ("qalora_group_size", "0.16", 16),
    ("target_parameters", "0.17", None),
    ("alora_invocation_tokens", "0.18", None),
    ("arrow_config", "0.18", None),
    ("ensure_weight_tying", "0.18", False),
    ("lora_ga_config", "0.19", None),
    ("use_bdlora", "0.19", None),
    ("velora_config", "0.20", None),
    ("monteclora_config", "0.20", None),
    ("kasa_config", "0.21", None),
)

#: from this release on an unknown init_lora_weights string raises ValueError (lora/layer.py@v0.7.0:
#: reset_lora_parameters); 0.6 initialises any true value as `true` (lora/layer.py@v0.6.0)
INIT_CHECKED_SINCE = "0.7"
#: init_lora_weights strings, with the first release whose annotation lists them
#: (`pissa_niter_K` goes with "pissa"); true and false are known everywhere
INIT_VALUES: dict[str, str] = {
    "gaussian": "0.7",
    "loftq": "0.7",
    "pissa": "0.11",
    "olora": "0.12",
    "eva": "0.14",
    "corda": "0.15",
    "orthogonal": "0.16",
    "mica": "0.20",
}

Finding = tuple[str, str, str]  # (level: "error" | "warning", rule, message)


def _at_least(version: str, since: str) -> bool:
    return RELEASES.index(version) >= RELEASES.index(since)


def release(version: str) -> str:
    """ "0.10", "0.10.0" or "0.10.2" -> "0.10"; anything outside 0.6 .. 0.21 is refused."""
    m = re.fullmatch(r"(0\.\d+)(?:\.\d+)?", version.strip())
    if m is None or m.group(1) not in RELEASES:
        raise InvalidOptionError(
            f"unknown PEFT version {version!r}",
            hint=f"give a release from {RELEASES[0]} to {RELEASES[-1]}, e.g. 0.10",
        )
    return m.group(1)


def knows(version: str, key: str) -> bool:
    """Whether PEFT `version`'s LoraConfig has the field `key`."""
    k = KEYS.get(key)
    return (
        k is not None
        and _at_least(version, k.since)
        and (k.removed is None or not _at_least(version, k.removed))
    )


def init_since(value: Any) -> str | None:
    """The first release that knows this init_lora_weights value; None if no release does."""
    if isinstance(value, bool):
        return RELEASES[0]
    if isinstance(value, str):
        return INIT_VALUES.get("pissa" if value.startswith("pissa_niter_") else value)
    return None


def is_on(key: str, value: Any) -> bool:
    """Whether `value` switches something on that the key's default leaves off (an inert key,
    metadata or initialisation only, never does)."""
    rule = BY_FIELD.get(key)
    if rule is not None and rule.kind == INERT:
        return False
    if rule is not None and rule.kind == VARIANT:
        return rule.is_on(value)
    default = KEYS[key].default if key in KEYS else None
    empty: tuple[Any, ...] = (None, {}, [])
    if value in empty and default in empty:
        return False
    return bool(value != default)


def _dict(config: LoraConfig | dict[str, Any]) -> dict[str, Any]:
    return config.raw if isinstance(config, LoraConfig) else dict(config)


# --- how each release matches rank/alpha pattern keys and layer indices --------------------------


def _old_key(config: LoraConfig, field: str, keys: list[str], module: str) -> str | None:
    """The key of `keys` PEFT <= 0.14 applies to `module`: the first with `.*\\.{key}$`, else
    the module's own name (`pattern.get(name, default)`)."""
    for key in keys:
        if config.regex(rf".*\.{key}$", f"`{field}` key", source=key).match(module):
            return key
    return module if module in keys else None


def _pattern_values(config: LoraConfig, version: str, module: str) -> tuple[int, Any]:
    """(rank, alpha) of `module` as PEFT `version` reads the config's patterns, keys in the
    config's order (a file's order, as PEFT reads it)."""
    if _at_least(version, WHOLE_NAME_PATTERNS_SINCE):
        return config.rank_for(module), config.alpha_for(module)
    ranks: dict[str, Any] = config.rank_pattern or {}
    alphas: dict[str, Any] = config.alpha_pattern or {}
    rk = _old_key(config, "rank_pattern", list(ranks), module)
    ak = _old_key(config, "alpha_pattern", list(alphas), module)
    rank = int(ranks[rk]) if rk is not None else int(config.r)
    return rank, alphas[ak] if ak is not None else config.lora_alpha


def _layer_index(version: str, module: str) -> int | None:
    return layer_index(module, first=_at_least(version, FIRST_LAYER_INDEX_SINCE))


# --- convert --peft-version --------------------------------------------------------------------


def for_release(
    config: LoraConfig, version: str, modules: Iterable[str]
) -> tuple[LoraConfig, list[str]]:
    """`config` rewritten so that PEFT `version` reads it with the meaning PEFT 0.21.2 gives it,
    for an adapter whose weights hold the LoRA `modules`; and notes on what was rewritten. Write
    it with `release_json`. Raises ConversionError, naming the key and the first release that
    knows it, where `version` cannot express a feature that is on."""
    version = release(version)
    modules = list(modules)
    data = config.raw
    changes: dict[str, Any] = {}
    notes: list[str] = []
    for key in data:
        if key in KEYS and not knows(version, key) and is_on(key, data[key]):
            if key == "exclude_modules":
                continue  # resolved below
            _refuse(key, version)
    reasons = []
    if is_on("exclude_modules", data.get("exclude_modules")) and not knows(
        version, "exclude_modules"
    ):
        reasons.append("exclude_modules")
    if data.get("target_modules") == ALL_LINEAR and not _at_least(version, ALL_LINEAR_SINCE):
        reasons.append('"all-linear"')
    if data.get("layers_to_transform") is not None and version != RELEASES[-1]:
        reasons.append("layers_to_transform")  # matched by other rules in older releases
    if reasons:
        if not modules:
            raise ConversionError(
                f"PEFT {version} cannot express this config's targets and the weights hold no "
                "LoRA module to list instead"
            )
        changes.update(
            target_modules=sorted(modules),
            exclude_modules=None,
            layers_to_transform=None,
            layers_pattern=None,
        )
        notes.append(
            f"PEFT {version}: target_modules written as the {len(modules)} modules the weights "
            f"hold ({' and '.join(reasons)} resolved)"
        )
    init = data.get("init_lora_weights", True)
    since = init_since(init)
    if since is None or not _at_least(version, since):
        if residual_init(init) or since is None:
            raise ConversionError(
                f'PEFT {version} does not know init_lora_weights "{init}"'
                + (f" (first in PEFT {since})" if since else ""),
                hint="convert it to plain LoRA first (--initial or --base)"
                if residual_init(init)
                else None,
            )
        changes["init_lora_weights"] = True  # initialisation only: the saved weights replace it
        notes.append(f'PEFT {version}: init_lora_weights "{init}" written as true')
    out = config.replace(**changes) if changes else config
    if not _at_least(version, WHOLE_NAME_PATTERNS_SINCE):  # read from the file: keys sorted
        out, note = _old_patterns(out, version, modules)
        notes += note
    dropped = sorted(k for k in data if k not in KEYS)
    if dropped:
        notes.append(
            f"PEFT {version}: dropped {', '.join(f'`{k}`' for k in dropped)}, which no PEFT "
            "release knows (PEFT 0.21.2 ignores them too)"
        )
        out = LoraConfig.from_dict({k: v for k, v in out.raw.items() if k in KEYS})
    return out, notes


def _refuse(key: str, version: str) -> None:
    hint = f"convert for PEFT {KEYS[key].since} or later"
    if key == "use_rslora":
        hint = (
            "rslora can be folded into lora_B: `adapterctl convert --portable` does it; "
            f"then pass --peft-version {version} to its output"
        )
    raise ConversionError(
        f"`{key}` is on and PEFT {version} does not know it (first in PEFT {KEYS[key].since})",
        hint=hint,
    )


def _old_patterns(
    config: LoraConfig, version: str, modules: list[str]
) -> tuple[LoraConfig, list[str]]:
    """Rank and alpha patterns that PEFT < 0.15 applies as PEFT 0.21.2 does, else ConversionError."""
    want = {m: (config.rank_for(m), config.alpha_for(m)) for m in modules}
    written = config.replace(  # the file release_json writes holds the keys sorted
        rank_pattern=dict(sorted((config.rank_pattern or {}).items())),
        alpha_pattern=dict(sorted((config.alpha_pattern or {}).items())),
    )
    if all(_pattern_values(written, version, m) == want[m] for m in modules):
        return config, []
    ranks: dict[str, int] = {}
    alphas: dict[str, Any] = {}
    for m, (r, a) in want.items():  # whole names: looked up as they are when no key matches
        if r != config.r:
            ranks[m] = r
        if a != config.lora_alpha:
            alphas[m] = a
    out = config.replace(
        rank_pattern=dict(sorted(ranks.items())), alpha_pattern=dict(sorted(alphas.items()))
    )
    for m in modules:
        if (
            _pattern_values(out, version, m) != want[m]
            or (out.rank_for(m), out.alpha_for(m)) != want[m]
        ):
            _refuse_patterns(version, m)
    return out, [f"PEFT {version}: rank_pattern/alpha_pattern written as one key per module"]


def _refuse_patterns(version: str, module: str) -> None:
    raise ConversionError(
        f"PEFT {version} matches rank_pattern/alpha_pattern keys differently, and no keys give "
        f"`{module}` its rank and alpha in both (keys are matched as PEFT 0.21 does from PEFT "
        f"{WHOLE_NAME_PATTERNS_SINCE} on)",
        hint=f"convert for PEFT {WHOLE_NAME_PATTERNS_SINCE} or later",
    )


def release_json(config: LoraConfig, version: str) -> str:
    """`config` as PEFT `version` would write it: its own fields only (indent 2, sorted keys)."""
    import json

    version = release(version)
    fields = {
        k: v for k, v in config.to_dict().items() if knows(version, k) and k != "runtime_config"
    }
    return json.dumps(fields, indent=2, sort_keys=True)


# --- inspect --engine peft@X.Y -----------------------------------------------------------------


def peft_version_findings(
    config: dict[str, Any] | LoraConfig, version: str, modules: Iterable[str] = ()
) -> list[Finding]:
    """What PEFT `version` does with this saved config: "error" where it refuses to load it,
    "warning" where it loads it but drops or changes a feature that is on. `modules`, the LoRA
    modules the weights hold, lets the rank/alpha patterns and layers_to_transform be checked."""
    version = release(version)
    cfg = config if isinstance(config, LoraConfig) else LoraConfig.from_dict(config)
    data = _dict(config)
    findings: list[Finding] = []
    unknown = [k for k in data if not knows(version, k)]
    on = [k for k in unknown if k in KEYS and is_on(k, data[k])]
    if unknown and not _at_least(version, DROPS_UNKNOWN_SINCE):
        findings.append(
            (
                "error",
                "peft-unknown-key",
                f"PEFT {version} raises TypeError on keys its LoraConfig does not know: "
                + ", ".join(
                    f"`{k}`" + (f" (PEFT {KEYS[k].since})" if k in KEYS else "") for k in unknown
                )
                + f"; unknown keys are dropped from PEFT {DROPS_UNKNOWN_SINCE} on",
            )
        )
    elif on:
        for k in on:
            findings.append(
                (
                    "warning",
                    "peft-dropped-feature",
                    f"PEFT {version} drops `{k}` (first in PEFT {KEYS[k].since}), which is on here",
                )
            )
    init = data.get("init_lora_weights", True)
    since = init_since(init)
    first = f" (first in PEFT {since})" if since else ""
    if (since is None or not _at_least(version, since)) and _at_least(version, INIT_CHECKED_SINCE):
        message = f'PEFT {version} raises "Unknown initialization" for init_lora_weights "{init}"'
        findings.append(("error", "peft-init-value", message + first))
    elif (since is None or not _at_least(version, since)) and residual_init(init):
        message = (
            f'PEFT {version} initialises init_lora_weights "{init}" as true: the base weights '
            "are not rewritten to the residual"
        )
        findings.append(("warning", "peft-init-value", message + first))
    if data.get("target_modules") == ALL_LINEAR and not _at_least(version, ALL_LINEAR_SINCE):
        findings.append(
            (
                "error",
                "peft-all-linear",
                f'PEFT {version} reads target_modules "all-linear" as a regex that matches no '
                f"module (the shorthand is first in PEFT {ALL_LINEAR_SINCE})",
            )
        )
    modules = list(modules)
    findings += _module_findings(cfg, data, version, modules)
    return findings


def _module_findings(
    cfg: LoraConfig, data: dict[str, Any], version: str, modules: list[str]
) -> list[Finding]:
    findings: list[Finding] = []
    for m in modules:
        r_now, a_now = cfg.rank_for(m), cfg.alpha_for(m)
        r_then, a_then = _pattern_values(cfg, version, m)
        if r_then != r_now:
            findings.append(
                (
                    "error",
                    "peft-pattern-rank",
                    f"PEFT {version} gives `{m}` rank {r_then}, not {r_now}: the stored factors do "
                    f"not fit (rank_pattern keys are matched as PEFT 0.21 does from PEFT "
                    f"{WHOLE_NAME_PATTERNS_SINCE} on)",
                )
            )
        elif a_then != a_now:
            findings.append(
                (
                    "warning",
                    "peft-pattern-alpha",
                    f"PEFT {version} gives `{m}` lora_alpha {a_then}, not {a_now} (alpha_pattern keys "
                    f"are matched as PEFT 0.21 does from PEFT {WHOLE_NAME_PATTERNS_SINCE} on)",
                )
            )
    if data.get("layers_to_transform") is not None and data.get("layers_pattern") is None:
        for m in modules:
            then, now = _layer_index(version, m), _layer_index(RELEASES[-1], m)
            if then != now:
                findings.append(
                    (
                        "warning",
                        "peft-layer-index",
                        f"PEFT {version} reads layer {then} of `{m}` for layers_to_transform, not "
                        f"{now} (the first indexed part is used from PEFT {FIRST_LAYER_INDEX_SINCE})",
                    )
                )
    return findings
