"""The one bounded matcher for regexes from files (adapterctl.format.patterns): the same answers as
PEFT's `re` for the patterns PEFT users write, errors naming the field for the others, and matching
that stays linear in the number of modules (counted, not timed)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterctl.errors import ConfigError
from adapterctl.format import patterns
from adapterctl.format.config import LoraConfig
from adapterctl.format.patterns import (
    PlainKey,
    compile_pattern,
    layers_pattern_regex,
    modules_to_save_regex,
    pattern_regex,
)

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.10.self_attn.k_proj",
    "model.layers.2.mlp.down_proj",
    "model.layers.31.mlp.experts.7.w1",
    "transformer.h.3.attn.c_attn",
    "model.decoder.layers.1.encoder_attn.v_proj",
    "lm_head",
    "model.embed_tokens",
    "q_proj",
    "model.layers.0.self_attn.q_proj.base_layer",
    "encoder.block.0.layer.0.SelfAttention.q",
    "model.layers.1.self_attn.o_proj\n",
    "vision_tower.blocks.11.attn.qkv",
]
#: patterns as PEFT users write them (target_modules / exclude_modules strings, pattern keys)
REALISTIC = [
    r".*\.(q_proj|v_proj)",
    r".*(q_proj|k_proj|v_proj|o_proj)$",
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r"^(?!.*vision).*(q_proj|v_proj)",
    r".*layers\.(0|1|2)\..*",
    r"(?:.*\.)?mlp\.(gate|up|down)_proj",
    r".*\.experts\.\d+\.w[123]",
    r".*[qkv]_proj",
    r"model.layers.1[0-9].*",
    r"lm_head|embed_tokens",
    r".*SelfAttention\.(q|v)",
    r".*attn.*",
    r"q_proj",
    r"layers\.0\.self_attn\.q_proj",
    r"down_proj",
    r"experts\.7\.w1",
    r"(?i)Q_PROJ",
    r".*\.(?P<name>q|v)_proj$",
    r"\w+\.\w+",
    r"[^.]+",
]


@pytest.mark.parametrize("pattern", REALISTIC)
def test_regex_answers_as_re_does(pattern: str) -> None:
    """For every wrapper PEFT puts around a file's pattern, match and fullmatch agree with `re`."""
    for regex, method in (
        (pattern, "fullmatch"),  # target_modules, exclude_modules
        (pattern_regex(pattern), "match"),  # rank_pattern / alpha_pattern keys
        (modules_to_save_regex(pattern), "match"),
        (layers_pattern_regex(pattern), "match"),
    ):
        try:
            re.compile(regex)
        except re.error:  # PEFT fails on it too (a flag not at the start, once wrapped)
            with pytest.raises(ConfigError):
                compile_pattern(regex, "`target_modules`", "test")
            continue
        ours = compile_pattern(regex, "`target_modules`", "test")
        for name in NAMES:
            expected = getattr(re, method)(regex, name)
            got = getattr(ours, method)(name)
            assert (got is None) == (expected is None), (regex, name)
            if expected is not None:
                assert got.span() == expected.span()
                assert got.groups() == expected.groups()


_PLAIN_CHARS = st.sampled_from(["a", "b", "1", "_", "-", ".", "\\."])
_NAME_CHARS = st.sampled_from(["a", "b", "1", "_", "-", ".", "\n", "x"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_PLAIN_CHARS, min_size=1, max_size=6).map("".join),
    st.lists(_NAME_CHARS, max_size=14).map("".join),
)
def test_plain_keys_answer_as_peft_regex(key: str, name: str) -> None:
    """The linear path for plain rank/alpha keys is exactly `re.match(pattern_regex(key), name)`."""
    assert PlainKey.applies(key)
    assert PlainKey(key).matches(name) == (re.match(pattern_regex(key), name) is not None)


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("rank_pattern", {"rank_pattern": {"q_(proj[": 4}}),
        ("alpha_pattern", {"alpha_pattern": {"q_(proj[": 4}}),
        ("target_modules", {"target_modules": "q_(proj["}),
        ("exclude_modules", {"exclude_modules": "q_(proj["}),
        ("modules_to_save", {"modules_to_save": ["q_(proj["]}),
        ("layers_pattern", {"layers_pattern": "q_(proj[", "layers_to_transform": [0]}),
        ("layers_pattern", {"layers_pattern": ["layers", "q_(proj["], "layers_to_transform": [0]}),
    ],
)
def test_a_malformed_pattern_names_its_field(field: str, fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as e:
        LoraConfig.from_dict({"peft_type": "LORA", **fields}, label="x/adapter_config.json")
    assert e.value.message.startswith("`x/adapter_config.json`: ")
    assert f"`{field}`" in e.value.message
    assert '"q_(proj["' in e.value.message
    if field not in ("target_modules", "exclude_modules"):  # wrapped by PEFT: a position would
        assert "position" not in e.value.message  # count in the wrapper, not in the text shown


def test_patterns_are_shown_safely() -> None:
    ugly = "\x1b[2J(" + "a" * 500
    with pytest.raises(ConfigError) as e:
        LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ugly})
    assert "\x1b" not in e.value.message
    assert "\\u001b" in e.value.message
    assert len(e.value.message) < 250


def test_a_catastrophic_pattern_spends_its_budget_and_names_its_field() -> None:
    config = LoraConfig.from_dict(
        {"peft_type": "LORA", "rank_pattern": {"(.*){1,32000}[bc]": 4}}, label="c.json"
    )
    start = time.process_time()
    with pytest.raises(ConfigError, match="`rank_pattern` key") as e:
        [config.rank_for(name) for name in NAMES * 100]
    assert time.process_time() - start < patterns.BUDGET_S + 2
    assert "takes too long" in e.value.message
    # the same config keeps refusing at once (the budget is spent), never hangs
    start = time.process_time()
    with pytest.raises(ConfigError):
        config.rank_for(NAMES[1])
    assert time.process_time() - start < 0.5


def test_the_budget_grows_with_the_work() -> None:
    """A plain but non-trivial pattern over 100k names is no error: each match adds its share."""
    config = LoraConfig(rank_pattern={r"layers\.(1|3)\d*\..*_proj": 2})
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(100_000)]
    assert sum(config.rank_for(n) == 2 for n in names) == 22_222


def _tensors(n_modules: int) -> list[object]:
    from adapterctl.ops.checks import TensorEntry

    out = []
    for i in range(n_modules):
        path = f"base_model.model.model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj"
        out += [
            TensorEntry(f"{path}.lora_A.weight", "float32", (2, 8), 64),
            TensorEntry(f"{path}.lora_B.weight", "float32", (8, 2), 64),
        ]
    return out


def test_inspect_matches_each_key_once_per_module() -> None:
    """Linearity by counting: analysing N modules makes at most (number of keys) x N pattern
    matches, whatever else asks for a module's rank or alpha (checks, warnings, scaling)."""
    from adapterctl.ops.checks import analyse

    keys = {"rank_pattern": {"q_proj": 2, r"layers\.1\..*": 2}, "alpha_pattern": {"v_proj": 4}}
    counts = []
    for n in (400, 800):
        config = LoraConfig(r=2, **keys)
        before = patterns.match_calls
        analyse(_tensors(n), config)  # type: ignore[arg-type]
        counts.append(patterns.match_calls - before)
        assert counts[-1] <= 3 * n
    assert counts[1] == 2 * counts[0]
