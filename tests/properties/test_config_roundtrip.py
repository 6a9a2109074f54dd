"""adapter_config.json: lossless, stable round-trips in PEFT's layout, read back by PEFT itself."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterctl.errors import ConfigError
from adapterctl.format.config import (
    BIAS_VALUES,
    CONFIG_NAME,
    DEFAULTS,
    SET_FIELDS,
    TASK_TYPES,
    LoraConfig,
)

IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
MODULE = st.lists(IDENT | st.integers(0, 31).map(str), min_size=1, max_size=3).map(".".join)
# rank_pattern / alpha_pattern keys: module names or suffixes, and a few regex-flavoured ones.
PATTERN_KEYS = MODULE | st.sampled_from(
    [r"layers\.0\.self_attn\.q_proj", r"\d+\.mlp\..*", "q_proj|v_proj"]
)
REGEXES = st.sampled_from(
    [
        r".*\.(q_proj|v_proj)$",
        r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
        r".*(attn|mlp).*",
        "q_proj",
    ]
) | st.lists(IDENT, min_size=1, max_size=3).map("|".join)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
ALPHA = st.integers(-(2**53), 2**53) | FINITE
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | FINITE | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
UNKNOWN_KEYS = st.text(min_size=1, max_size=12).filter(lambda k: k not in DEFAULTS)

# The fields the brief names, which PEFT reads back.
CORE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "r": st.integers(1, 2**31),
    "lora_alpha": ALPHA,
    "target_modules": st.none() | st.lists(IDENT, max_size=6) | REGEXES,
    "rank_pattern": st.dictionaries(PATTERN_KEYS, st.integers(1, 512), max_size=3),
    "alpha_pattern": st.dictionaries(PATTERN_KEYS, ALPHA, max_size=3),
    "modules_to_save": st.none() | st.lists(IDENT, max_size=3),
    "bias": st.sampled_from(BIAS_VALUES),
    "task_type": st.none() | st.sampled_from(sorted(TASK_TYPES)),
    "use_rslora": st.booleans(),
    "use_dora": st.booleans(),
}
MORE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "lora_dropout": st.floats(0, 1, exclude_max=True),
    "fan_in_fan_out": st.booleans(),
    "inference_mode": st.booleans(),  # always written as true
    "lora_bias": st.booleans(),
    "init_lora_weights": st.booleans() | st.sampled_from(["gaussian", "eva", "orthogonal"]),
    "exclude_modules": st.none() | st.lists(IDENT, max_size=4) | REGEXES,
    "base_model_name_or_path": st.none() | st.text(max_size=20),
    "revision": st.none() | st.text(max_size=8),
    "peft_version": st.text(max_size=8),
    "megatron_core": st.text(max_size=8),
}


@st.composite
def configs(draw, more: bool = True, extras: bool = True) -> dict[str, Any]:
    """A valid adapter_config.json as a dict: any subset of the fields, unknown keys too."""
    d: dict[str, Any] = {"peft_type": "LORA"}
    fields = {**CORE_FIELDS, **(MORE_FIELDS if more else {})}
    for key in draw(st.permutations(sorted(fields))):  # random key order in the input
        if draw(st.booleans()):
            d[key] = draw(fields[key])
    if more and not isinstance(d.get("target_modules"), str) and draw(st.booleans()):
        d["layers_to_transform"] = draw(
            st.integers(0, 31) | st.lists(st.integers(0, 31), max_size=3)
        )
        if draw(st.booleans()):
            d["layers_pattern"] = draw(IDENT | st.lists(IDENT, min_size=1, max_size=2))
    if d.get("lora_bias") and (d.get("use_dora") or isinstance(d.get("init_lora_weights"), str)):
        d["lora_bias"] = False  # PEFT refuses these combinations (see PEFT_REFUSES)
    if extras:
        d.update(draw(st.dictionaries(UNKNOWN_KEYS, JSON, max_size=3)))
    return d


def expected_dict(d: dict[str, Any]) -> dict[str, Any]:
    out = {**DEFAULTS, **d, "inference_mode": True}
    for field in SET_FIELDS:
        if isinstance(out[field], list):
            out[field] = sorted(set(out[field]))
    return out


def canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


@given(d=configs())
def test_to_json_round_trips_and_is_peft_layout(d: dict[str, Any]) -> None:
    c = LoraConfig.from_dict(d)
    text = c.to_json()
    assert text == c.to_json()  # stable
    assert LoraConfig(**d).to_json() == text  # the constructor takes the same fields
    assert text == json.dumps(expected_dict(d), indent=2, sort_keys=True)
    assert not text.endswith("\n")
    assert text == text.rstrip()

    back = LoraConfig.from_json(text)
    assert back == c
    assert back.to_json() == text  # idempotent, byte for byte
    assert LoraConfig.from_json(text.encode()).to_json() == text

    written = json.loads(text)
    assert set(DEFAULTS) <= set(written)
    assert written["inference_mode"] is True
    unknown = sorted(set(d) - set(DEFAULTS))
    assert c.unknown_keys == unknown
    assert set(written) == set(DEFAULTS) | set(unknown)
    for key in unknown:  # verbatim (JSON writes nested objects with sorted keys)
        assert canon(written[key]) == canon(d[key])
    for key in set(d) - set(SET_FIELDS) - {"inference_mode"}:
        assert canon(written[key]) == canon(d[key])
    for field in SET_FIELDS:
        value = d.get(field)
        if isinstance(value, list):
            assert written[field] == sorted(set(value))
        else:
            assert written[field] == value


@settings(max_examples=8)
@given(d=configs(more=False))
def test_peft_reads_what_we_write(
    d: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    c = LoraConfig.from_dict(d)
    folder: Path = tmp_path_factory.mktemp("cfg")
    (folder / CONFIG_NAME).write_text(c.to_json(), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys, and PEFT's own notices
        from peft import LoraConfig as PeftLoraConfig

        p = PeftLoraConfig.from_pretrained(str(folder))
    assert p.r == c.r
    assert p.lora_alpha == c.lora_alpha
    assert type(p.lora_alpha) is type(c.lora_alpha)
    if isinstance(c.target_modules, list):
        assert set(p.target_modules) == set(c.target_modules)
    else:
        assert p.target_modules == c.target_modules
    assert p.rank_pattern == c.rank_pattern
    assert p.alpha_pattern == c.alpha_pattern
    assert p.modules_to_save == c.modules_to_save
    assert (p.bias, p.use_rslora, p.use_dora) == (c.bias, c.use_rslora, c.use_dora)


INVALID = [
    ({"r": 0}, "r"),
    ({"r": -4}, "r"),
    ({"r": "8"}, "r"),
    ({"r": True}, "r"),
    ({"r": 8.0}, "r"),
    ({"r": None}, "r"),
    ({"lora_alpha": "x"}, "lora_alpha"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"lora_alpha": math.nan}, "lora_alpha"),
    ({"lora_alpha": math.inf}, "lora_alpha"),
    ({"peft_type": "lora"}, "peft_type"),
    ({"peft_type": "LOHA"}, "peft_type"),
    ({"peft_type": None}, "peft_type"),
    ({"target_modules": 5}, "target_modules"),
    ({"target_modules": "("}, "target_modules"),
    ({"target_modules": ["q_proj", 1]}, "target_modules"),
    ({"exclude_modules": "[a-"}, "exclude_modules"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": 2.0}}, "rank_pattern"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern"),
    ({"rank_pattern": []}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": "16"}}, "alpha_pattern"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"use_dora": "yes"}, "use_dora"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"bias": "some"}, "bias"),
    ({"task_type": "causal_lm"}, "task_type"),
    ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ({"init_lora_weights": 1}, "init_lora_weights"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
]


@pytest.mark.parametrize(("patch", "field"), INVALID, ids=[f"{f}={p[f]!r}" for p, f in INVALID])
def test_invalid_configs_raise_config_error_naming_the_field(
    patch: dict[str, Any], field: str
) -> None:
    d = {"peft_type": "LORA", **patch}
    with pytest.raises(ConfigError, match=f"`{field}`"):
        LoraConfig.from_dict(d)
    text = json.dumps(d)
    # NaN and Infinity are not JSON at all: the file is refused before any field is looked at
    not_json = "NaN" in text or "Infinity" in text
    with pytest.raises(ConfigError, match="not valid JSON" if not_json else f"`{field}`"):
        LoraConfig.from_json(text)
    with pytest.raises(ConfigError, match=f"`{field}`"):
        LoraConfig(**d)


def test_missing_peft_type_is_named() -> None:
    with pytest.raises(ConfigError, match="`peft_type`"):
        LoraConfig.from_dict({"r": 8})
    with pytest.raises(ConfigError, match="`peft_type`"):
        LoraConfig.from_json('{"r": 8, "lora_alpha": 16}')


# --- robustness: any JSON object is either a config or a ConfigError ------------------------------

# Random values for the known fields (unhashable task_type values and integers too large for a
# float have their own tests below).
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | FINITE | st.text(max_size=6),
    lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=4), c, max_size=2),
    max_leaves=4,
)
KNOWN_KEYS = sorted(set(DEFAULTS) - {"peft_type"})


@st.composite
def arbitrary_configs(draw) -> dict[str, Any]:
    d = draw(configs())
    for key in draw(st.lists(st.sampled_from(KNOWN_KEYS), max_size=3, unique=True)):
        value = draw(ANY_VALUE)
        if key == "task_type" and isinstance(value, (list, dict)):
            value = str(value)
        d[key] = value
    if draw(st.integers(0, 9)) == 0:
        d["peft_type"] = draw(ANY_VALUE | st.sampled_from(["lora", "LoRA", "ADALORA"]))
    return d


@given(d=arbitrary_configs())
def test_any_json_object_is_a_config_or_a_config_error(d: dict[str, Any]) -> None:
    error: ConfigError | None = None
    try:
        c = LoraConfig.from_json(json.dumps(d))
    except ConfigError as e:
        error = e
    if error is not None:
        assert error.message.startswith(f"`{CONFIG_NAME}`: `")  # names the file and a field
        return
    assert LoraConfig.from_json(c.to_json()).to_json() == c.to_json()


@pytest.mark.parametrize(
    "text", ['{"peft_type": "LORA", "task_type": []}', '{"peft_type": "LORA", "task_type": {}}']
)
def test_unhashable_task_type_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="`task_type`"):
        LoraConfig.from_json(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"peft_type": "LORA", "lora_alpha": 1' + "0" * 400 + "}",
        '{"peft_type": "LORA", "lora_dropout": 1' + "0" * 400 + "}",
        '{"peft_type": "LORA", "alpha_pattern": {"q_proj": 1' + "0" * 400 + "}}",
    ],
    ids=["lora_alpha", "lora_dropout", "alpha_pattern"],
)
def test_huge_integer_is_a_config_or_a_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):  # accepting it would do too
        LoraConfig.from_json(text)


@pytest.mark.parametrize(
    ("a", "b"),
    [({"lora_alpha": 16}, {"lora_alpha": 16.0}), ({"x_flag": True}, {"x_flag": 1})],
    ids=["16 vs 16.0", "true vs 1"],
)
def test_equal_configs_hash_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    ca, cb = LoraConfig(**a), LoraConfig(**b)
    assert ca != cb or hash(ca) == hash(cb)


# Configs PEFT 0.21.2 refuses when loading (checked by hand with PeftLoraConfig.from_pretrained).
PEFT_REFUSES = {
    "lora_bias with use_dora": {"lora_bias": True, "use_dora": True},
    "lora_bias with a string init": {"lora_bias": True, "init_lora_weights": "gaussian"},
    "target_parameters as a string": {"target_parameters": "mlp.experts.gate_up_proj"},
    "use_dora with megatron_config": {"use_dora": True, "megatron_config": {"tensor_parallel": 2}},
}


@pytest.mark.parametrize("patch", list(PEFT_REFUSES.values()), ids=list(PEFT_REFUSES))
def test_configs_peft_refuses_are_config_errors(patch: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LoraConfig.from_dict({"peft_type": "LORA", **patch})


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
     "modules_to_save", "layers_to_transform", "layers_pattern", "use_rslora", "use_dora",
     "init_lora_weights", "bias", "lora_dropout", "exclude_modules", "fan_in_fan_out", "task_type"]
)  # fmt: skip


@given(
    fields=st.dictionaries(_FIELDS, _JSON, max_size=6),
    raw=st.binary(max_size=64),
    as_bytes=st.booleans(),
)
def test_parser_fuzz_never_crashes(fields: dict[str, Any], raw: bytes, as_bytes: bool) -> None:
    """Any JSON value in any field, or any bytes at all: a LoraConfig or a ConfigError naming
    the file, never another exception."""
    import json

    from adapterctl.errors import AdapterctlError

    text = raw if as_bytes else json.dumps({"peft_type": "LORA", **fields}).encode()
    message = "fuzz.json"
    try:
        LoraConfig.from_json(text, label="fuzz.json")
    except AdapterctlError as e:
        message = e.message
    assert "fuzz.json" in message
