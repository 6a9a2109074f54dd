"""The one bounded matcher for regexes from files (adapterctl.format.patterns): the same answers as
PEFT's `re` for the patterns PEFT users write, errors naming the field for the others, and matching
that stays linear in the number of modules (counted, not timed)."""

from __future__ import annotations

import itertools
import re
import resource
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterctl.errors import ConfigError
from adapterctl.format import patterns
from adapterctl.format.config import LoraConfig
from adapterctl.format.patterns import (
    PlainIndex,
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


#: a few regex keys, to mix with plain ones (their order against the plain keys must hold)
_REGEX_KEYS = st.sampled_from([r"a+", r"(a|b)\.1", r"[ab]", r".*", r"b?1", r"x|_"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(st.lists(_PLAIN_CHARS, min_size=1, max_size=5).map("".join), _REGEX_KEYS),
        max_size=12,
        unique=True,
    ),
    st.lists(_NAME_CHARS, max_size=14).map("".join),
)
def test_indexed_keys_answer_as_peft_regex_in_file_order(keys: list[str], name: str) -> None:
    """The PlainIndex (plain keys) merged with the regex keys gives exactly the keys PEFT's regex
    matches, in file order: the first is the one PEFT uses."""
    expected = [k for k in keys if re.match(pattern_regex(k), name) is not None]
    config = LoraConfig(rank_pattern=dict.fromkeys(keys, 2))
    assert config.matching_patterns("rank_pattern", name) == expected
    index = PlainIndex("`rank_pattern` key", "t")
    for position, key in enumerate(keys):
        if PlainKey.applies(key):
            index.add(position, key)
    assert [keys[p] for p in index.lookup(name)] == [k for k in expected if PlainKey.applies(k)]


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


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


#: backtracks for ~0.3 s on the name below, a new pattern for every `i`
_SLOW_KEY = "(x|xx)+y|q{}"
_SLOW_NAME = "model.layers.0." + "x" * 29


def test_many_catastrophic_keys_share_one_budget() -> None:
    """1,000 keys that each backtrack on a name spend one budget for the whole config, not one
    each: the first few spend it, the next is refused unmatched, naming its field and itself."""
    config = LoraConfig(rank_pattern={_SLOW_KEY.format(i): 2 for i in range(1000)})
    before, start = patterns.match_calls, _cpu_s()
    with pytest.raises(ConfigError, match="`rank_pattern` key") as e:
        config.rank_for(_SLOW_NAME)
    calls = patterns.match_calls - before
    assert calls < 50, calls  # a few ran (each gets the time left), then the budget was spent
    assert _cpu_s() - start < patterns.BUDGET_S + 5
    assert _SLOW_KEY.format(calls - 1) in e.value.message  # the one running when it ran out
    assert "takes too long" in e.value.message


def test_the_budget_is_shared_across_fields() -> None:
    """rank_pattern and alpha_pattern keys draw on one budget: spent by one, refused to the other."""
    config = LoraConfig(
        rank_pattern={_SLOW_KEY.format(i): 2 for i in range(100)}, alpha_pattern={"q.*": 4}
    )
    with pytest.raises(ConfigError):
        config.rank_for(_SLOW_NAME)
    with pytest.raises(ConfigError, match="`alpha_pattern` key"):
        config.alpha_for("model.q_proj")


def test_a_spent_budget_stays_spent_for_new_names() -> None:
    """Once a pattern has spent the budget, a new name does not revive it with its PER_NAME_S:
    a fast pattern on a name never seen is refused too (with the grant, it ran in its 1 ms)."""
    budget = patterns.Budget()
    budget.left = 0.05
    slow = patterns.compile_pattern("(x|xx)+y", "rank_pattern key", "cfg", budget=budget)
    fast = patterns.compile_pattern("q.*", "alpha_pattern key", "cfg", budget=budget)
    with pytest.raises(ConfigError, match="takes too long"):
        slow.match("x" * 40)
    assert budget.spent
    with pytest.raises(ConfigError, match="alpha_pattern key"):
        fast.match("q_proj, a name never matched before")


def test_the_budget_grows_with_names_not_with_patterns() -> None:
    """What the patterns of a config may spend: BUDGET_S plus PER_NAME_S for each distinct name,
    however many patterns are matched against each (500 keys x 20 names here, each name asked
    three times)."""
    config = LoraConfig(
        rank_pattern={f"q{i}.*_proj": 2 for i in range(500)}, alpha_pattern={"q1.*": 4}
    )
    names = [f"model.layers.{i}.q{i}x_proj" for i in range(20)]
    before = patterns.match_calls
    for name in names * 3:
        assert config.rank_for(name) == 2
        config.alpha_for(name)
    assert patterns.match_calls - before == 501 * 20  # each (key, name) once: memoised
    budget = config._patterns.budget  # the one budget of every pattern of this config
    assert 0 < budget.left <= patterns.BUDGET_S + len(names) * patterns.PER_NAME_S


def _plain_case(n: int) -> tuple[LoraConfig, list[str]]:
    config = LoraConfig(rank_pattern={f"zz{i}.q_proj": 2 for i in range(n)})
    return config, [f"base_model.model.zz{i}.q_proj" for i in range(n)]


def test_plain_keys_are_indexed_not_tried_one_by_one() -> None:
    """8,000 plain keys x 8,000 modules (a 160 KB config): one candidate check per module (the
    key that matches), and trie steps linear in the characters of the names, not keys x modules."""
    counts = []
    for n in (2000, 8000):
        config, names = _plain_case(n)
        before = patterns.match_calls
        ranks = [config.rank_for(name) for name in names]
        calls = patterns.match_calls - before
        assert ranks == [2] * n
        assert calls == n  # one check per module: the one key that matches it
        steps = config._patterns._keys["rank_pattern"].index.steps
        assert steps <= 2 * sum(len(name) + 1 for name in names)
        counts.append(steps)
    assert counts[1] < 4 * counts[0] * 1.2  # linear in the names (4x the names, ~4x the steps)
    config, names = _plain_case(8000)
    assert config.matching_patterns("rank_pattern", "zz7.q_proj") == ["zz7.q_proj"]
    assert config.matching_patterns("rank_pattern", "zz7_q_proj") == ["zz7.q_proj"]  # `.`: any
    assert config.matching_patterns("rank_pattern", "a.bzz7.q_proj") == []  # not dot-aligned


def test_keys_made_to_branch_run_out_of_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys with `.` where others have a letter make a walk branch at every step (here 4,096 keys
    all followed to the last character for every name): the steps are bounded, then an error
    naming the field, never keys x modules of work."""
    monkeypatch.setattr(patterns, "INDEX_STEPS", 50_000)
    keys = {"b" + "".join(p): 2 for p in itertools.product("a.", repeat=12)}
    config = LoraConfig(rank_pattern=keys)
    start = _cpu_s()
    names = [f"m{i}.c" + "a" * 12 for i in range(1000)]
    with pytest.raises(ConfigError, match="`rank_pattern` keys take too long") as e:
        [config.rank_for(name) for name in names]
    assert _cpu_s() - start < 5
    assert e.value.hint is not None


def test_a_layer_index_of_thousands_of_digits_is_no_layer_a_list_names() -> None:
    """A file's module path is untrusted: an index past int()'s 4300-digit limit is a number
    beyond every layer, not a ValueError (exit 3)."""
    from adapterctl.format.patterns import layer_index

    assert layer_index("model.layers.0012.self_attn.q_proj") == 12
    huge = f"model.layers.{'9' * 5000}.self_attn.q_proj"
    assert layer_index(huge) == 10**18
    assert layer_index(huge, first=False) == 10**18
