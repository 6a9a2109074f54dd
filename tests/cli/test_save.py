"""`adapterctl save` end to end: PEFT's files, determinism, PiSSA's residual base, refusals."""

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
    return runner.invoke(app, ["save", *[str(a) for a in args]], prog_name="adapterctl")


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("savebase") / "llama"
    tiny_llama().save_pretrained(str(d))
    return d


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits


def test_same_config_and_keys_as_peft(base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    args = ["--r", "4", "--alpha", "8", "--target", "q_proj,v_proj", "--target", "down_proj",
            "--rank-pattern", "down_proj=6", "--alpha-pattern", "v_proj=16", "--use-dora",
            "--modules-to-save", "lm_head", "--task-type", "CAUSAL_LM"]  # fmt: skip
    result = invoke(base, tmp_path / "ours", *args, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["modules"] == 6
    assert doc["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base)),
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"down_proj": 6},
                alpha_pattern={"v_proj": 16},
                use_dora=True,
                modules_to_save=["lm_head"],
                task_type="CAUSAL_LM",
            ),
        )
        ref.save_pretrained(str(tmp_path / "peft"))

    def shapes(d: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")

    def config(d: Path) -> dict[str, Any]:
        return {
            k: sorted(v) if isinstance(v, list) else v
            for k, v in json.loads((d / "adapter_config.json").read_text()).items()
        }

    assert config(tmp_path / "ours") == config(tmp_path / "peft")
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "ours")
        )


def test_same_seed_same_bytes(base: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert (
            invoke(
                base, tmp_path / name, "--r", "4", "--target", "all-linear", "--seed", "7"
            ).exit_code
            == 0
        )
    for f in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (
        invoke(base, tmp_path / "c", "--r", "4", "--target", "all-linear", "--seed", "8").exit_code
        == 0
    )
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != (
        tmp_path / "c" / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_residual_base_plus_adapter_is_the_original(base: Path, tmp_path: Path, init: str) -> None:
    from transformers import AutoModelForCausalLM

    from adapterctl.engine.model import AdapterModel

    result = invoke(base, tmp_path / "ad", "--r", "4", "--target", "q_proj,v_proj", "--init", init,
                    "--residual-out", tmp_path / "res")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "adapterctl convert TRAINED OUT --initial" in result.stdout
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # loading it does not decompose again
    original = _logits(AutoModelForCausalLM.from_pretrained(str(base)))
    model = AdapterModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "res")), tmp_path / "ad"
    )
    assert (_logits(model) - original).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--r", "4", "--target", "q_proj", "--init", "pissa"], 2, "pass --residual-out DIR"),
        (
            [
                "--r",
                "4",
                "--target",
                "q_proj",
                "--alpha-pattern",
                "q_proj=16",
                "--alpha-pattern",
                "layers.1.self_attn.q_proj=32",
            ],
            2,
            "overlapping rank/alpha patterns",
        ),
        (["--r", "4"], 2, ""),
        (["--r", "4", "--target", "q_proj", "--target-regex", ".*q_proj"], 2, ""),
        (["--r", "4", "--target", "q_proj", "--init", "corda"], 2, ""),
        (["--r", "4", "--target", "nothing_here"], 1, "no module of the LlamaForCausalLM matches"),
    ],
)
def test_refusals(base: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = invoke(base, tmp_path / "out", *args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(base: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert invoke(base, tmp_path / "out", "--r", "2", "--target", "q_proj").exit_code == 1
    assert (
        invoke(base, tmp_path / "out", "--r", "2", "--target", "q_proj", "--force").exit_code == 0
    )
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
