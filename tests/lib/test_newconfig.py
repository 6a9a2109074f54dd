"""format.newconfig: a new adapter's values, checked where they are made, and the config fields
they become; the one pissa_niter_K rule in format.config."""

from __future__ import annotations

from typing import Any

import pytest

from adapterctl.errors import InvalidOptionError
from adapterctl.format.config import (
    TASK_TYPES,
    LoraConfig,
    is_pissa_niter,
    pissa_niter,
    residual_init,
)
from adapterctl.format.newconfig import NewAdapter, OptionValueError, parse_pairs


def test_config_fields_as_peft_takes_them() -> None:
    new = NewAdapter.from_options(
        r=4,
        alpha=8.0,
        targets=["q_proj,v_proj", "down_proj"],
        rank_pattern=["down_proj=6"],
        alpha_pattern=["v_proj=16", "a=b=0.5"],
        init="gaussian",
        task_type="CAUSAL_LM",
        base_model="org/base",
    )
    fields = new.config_fields()
    assert fields == {
        "r": 4,
        "lora_alpha": 8.0,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": "gaussian",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "rank_pattern": {"down_proj": 6},
        "alpha_pattern": {"v_proj": 16, "a=b": 0.5},
        "layers_to_transform": None,
        "exclude_modules": None,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "org/base",
    }
    LoraConfig(**fields)  # a valid config


def test_defaults_all_linear_and_regex() -> None:
    assert NewAdapter(r=8, targets=["all-linear"]).config_fields()["target_modules"] == "all-linear"
    fields = NewAdapter(r=8, target_regex=r".*\.q_proj").config_fields()
    assert fields["target_modules"] == r".*\.q_proj"
    assert fields["lora_alpha"] == 8  # alpha: r when not given
    assert fields["init_lora_weights"] is True  # --init default
    assert "base_model_name_or_path" not in fields


@pytest.mark.parametrize(
    ("given", "embeddings"), [("auto", "auto"), ("true", True), ("false", False)]
)
def test_embeddings(given: str, embeddings: Any) -> None:
    new = NewAdapter(r=1, targets=["q"], save_embedding_layers=given)
    assert new.embeddings == embeddings


@pytest.mark.parametrize(
    ("options", "option", "message"),
    [
        ({}, "--target", "pass --target NAME ... or --target-regex REGEX (one of them)"),
        ({"targets": ["q"], "target_regex": "q"}, "--target", "(one of them)"),
        ({"targets": ["q"], "task_type": "LM"}, "--task-type", "'LM' is not one of CAUSAL_LM"),
        ({"targets": ["q"], "save_embedding_layers": "yes"}, "--save-embedding-layers", "auto"),
        ({"targets": ["q"], "init": "pissa_niter_x"}, "--init", "'pissa_niter_x': default, "),
        ({"targets": ["q"], "init": "corda"}, "--init", "pissa_niter_K or olora"),
    ],
)
def test_bad_values_name_their_option(options: dict[str, Any], option: str, message: str) -> None:
    with pytest.raises(OptionValueError) as e:
        NewAdapter(r=4, **options)
    assert e.value.option == option
    assert message in e.value.message
    assert isinstance(e.value, InvalidOptionError)  # a usage error for a library caller too


def test_negative_layers_are_an_invalid_option() -> None:
    with pytest.raises(InvalidOptionError, match=r"not -1") as e:
        NewAdapter(r=4, targets=["q"], layers=[0, -1])
    assert not isinstance(e.value, OptionValueError)


def test_pairs_are_checked_after_every_other_value() -> None:
    with pytest.raises(OptionValueError) as e:  # a bad init and a bad pair: the init is named
        NewAdapter.from_options(
            r=4, targets=["q"], init="x", rank_pattern=["nokey"], alpha_pattern=[]
        )
    assert e.value.option == "--init"
    with pytest.raises(OptionValueError, match="expected KEY=VALUE") as e:
        parse_pairs(["=3"], "--rank-pattern", int)
    assert e.value.option == "--rank-pattern"
    with pytest.raises(OptionValueError, match="'x' is not a number"):
        parse_pairs(["q=x"], "--alpha-pattern", float)


@pytest.mark.parametrize(
    ("init", "k", "residual"),
    [
        ("pissa_niter_4", 4, True),
        ("pissa_niter_16", 16, True),
        ("pissa_niter_", None, True),  # the prefix says residual; no K to run with
        ("pissa_niter_x", None, True),
        ("pissa", None, True),
        ("corda", None, True),
        ("gaussian", None, False),
        (True, None, False),
    ],
)
def test_pissa_niter_rule(init: Any, k: int | None, residual: bool) -> None:
    assert pissa_niter(init) == k
    assert is_pissa_niter(init) == (isinstance(init, str) and init.startswith("pissa_niter_"))
    assert residual_init(init) is residual
    ok = init in ("default", "gaussian", "pissa", "olora") or k is not None
    if isinstance(init, str) and ok:
        assert NewAdapter(r=4, targets=["q"], init=init).init_value == init


def test_task_types_in_help_order() -> None:
    assert TASK_TYPES[0] == "CAUSAL_LM"
    assert len(set(TASK_TYPES)) == len(TASK_TYPES) == 6
