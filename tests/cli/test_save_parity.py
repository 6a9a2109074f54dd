"""`save` as PEFT writes it (issue 11, section 6): PiSSA/OLoRA with all-linear write the expanded
target list, the parameter count is the one `inspect` and `load` give (DoRA magnitudes included),
and targets or patterns that match nothing name the base's real modules."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.fixtures import tiny_llama

pytestmark = pytest.mark.slow
runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("paritybase") / "llama"
    tiny_llama().save_pretrained(str(d))
    return d


def _config(d: Path) -> dict[str, Any]:
    return {
        k: sorted(v) if isinstance(v, list) else v
        for k, v in json.loads((d / "adapter_config.json").read_text()).items()
    }


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_with_all_linear_writes_the_expanded_targets(
    base: Path, tmp_path: Path, init: str
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    result = invoke("save", base, tmp_path / "ours", "--r", "4", "--target", "all-linear",
                    "--init", init, "--residual-out", tmp_path / "res")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base)),
            LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=init),
        )
        # PEFT's documented workflow: the saved initial adapter says `true`
        ref.peft_config["default"].init_lora_weights = True
        ref.save_pretrained(str(tmp_path / "peft"))
    ours, peft = _config(tmp_path / "ours"), _config(tmp_path / "peft")
    assert isinstance(ours["target_modules"], list)
    assert ours["target_modules"] == peft["target_modules"]
    assert ours == peft


def test_parameter_count_is_inspects_and_loads(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "dora"
    saved = invoke("save", base, out, "--r", "4", "--target", "q_proj,v_proj", "--use-dora",
                   "--json")  # fmt: skip
    assert saved.exit_code == 0, saved.stderr
    inspected = invoke("inspect", out, "--json")
    loaded = invoke("load", base, out, "--json")
    assert loaded.exit_code == 0, loaded.stderr
    count = json.loads(saved.stdout)["parameters"]
    assert count == json.loads(inspected.stdout)["adapters"][0]["num_parameters"]
    assert count == json.loads(loaded.stdout)["adapter"]["parameters"]
    # 4 modules of r (32 + out) factors, plus one magnitude per output feature
    factors = sum(4 * (32 + o) for o in (32, 16, 32, 16))
    assert count == factors + 2 * (32 + 16)


@pytest.mark.parametrize(
    "args",
    [["--target", "qproj"], ["--target-regex", r".*\.attention\.query"]],
)
def test_targets_matching_nothing_name_the_real_modules(
    base: Path, tmp_path: Path, args: list[str]
) -> None:
    result = invoke("save", base, tmp_path / "out", "--r", "2", *args)
    assert result.exit_code == 1
    (line, hint) = result.stderr.splitlines()
    assert line.startswith("error: no module of the LlamaForCausalLM matches")
    names = line.split("its modules: ")[1]
    assert names.split(", ")[:4] == ["embed_tokens", "q_proj", "k_proj", "v_proj"]
    assert names.count("q_proj") == 1  # leaf names, once each
    assert "lm_head" in names
    assert hint.startswith("hint: target some of those names")
    assert not (tmp_path / "out").exists()


def test_a_pattern_key_matching_nothing_is_a_warning_at_save_time(
    base: Path, tmp_path: Path
) -> None:
    result = invoke("save", base, tmp_path / "out", "--r", "2", "--target", "q_proj",
                    "--rank-pattern", "qproj=4", "--alpha-pattern", "v_proj=8")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    warnings_ = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings_) == 2, result.stderr
    assert warnings_[0].startswith("warning: rank_pattern key 'qproj' matches no module")
    assert "(its modules: embed_tokens, q_proj, k_proj" in warnings_[0]
    assert warnings_[1].startswith("warning: alpha_pattern key 'v_proj' matches no module")
    as_json = invoke("save", base, tmp_path / "out2", "--r", "2", "--target", "q_proj",
                     "--rank-pattern", "qproj=4", "--json")  # fmt: skip
    assert as_json.exit_code == 0
    assert any("'qproj'" in w for w in json.loads(as_json.stdout)["warnings"])
