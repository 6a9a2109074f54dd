"""A Conv2d LoRA (PEFT writes lora_A [r, in, kh, kw] and lora_B [out, r, 1, 1]): `inspect
--check` and `convert` share one rule of what a pair is; casts and copies take any shape, rank
reduction reads the factors as PEFT's delta does (A: r x in·kh·kw, B: out x r)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from adapterctl.format.factors import pair_problem
from tests.helpers import P, write_tensors

runner = CliRunner()


def run(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl")


def _net() -> Any:
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(5, 10, 3)
            self.grouped = nn.Conv2d(4, 8, 3, groups=2)

    return Net()


@pytest.fixture(scope="module")
def conv_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT 0.21.2 adapters on a Conv2d: plain, grouped (lora_B [8, 2, 1, 1]) and DoRA."""
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("conv")
    configs = {
        "plain": {"r": 8, "target_modules": ["conv"]},
        "grouped": {"r": 4, "target_modules": ["grouped"]},
        "dora": {"r": 8, "target_modules": ["conv"], "use_dora": True},
    }
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(_net(), LoraConfig(**cfg))
            with torch.no_grad():
                for key, p in model.named_parameters():
                    if "lora_" in key:
                        p.copy_(torch.randn(p.shape) * 0.1)
            model.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_the_issue_shapes_pass_check_and_cast(tmp_path: Path) -> None:
    """The real-world disagreement, hand-written: it passed --check, and convert refused it."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    write_tensors(
        src / "adapter_model.safetensors",
        {
            f"{P}conv.lora_A.weight": rng.standard_normal((8, 5, 3, 3)).astype(np.float32),
            f"{P}conv.lora_B.weight": rng.standard_normal((10, 8, 1, 1)).astype(np.float32),
        },
    )
    (src / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["conv"]})
    )
    assert run("inspect", src, "--check").exit_code == 0
    result = run("convert", src, tmp_path / "out", "--dtype", "bfloat16", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["verification"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "grouped", "dora"])
def test_peft_conv_adapters_pass_check_and_cast_exactly(
    name: str, conv_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    src = conv_adapters[name]
    assert run("inspect", src, "--check").exit_code == 0
    result = run("convert", src, tmp_path / "out", "--dtype", "bfloat16", "--verify")
    assert result.exit_code == 0, result.stderr
    before, after = _tensors(src), _tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for key, t in before.items():
        assert after[key].shape == t.shape
        assert torch.equal(after[key], t.to(torch.bfloat16)), key


@pytest.mark.slow
def test_conv_rank_reduction_is_peft_delta_truncated(
    conv_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """--rank 4 keeps PEFT's own delta's best rank-4 approximation, and PEFT loads the result."""
    import torch
    from peft import PeftModel

    src = conv_adapters["plain"]
    result = run("convert", src, tmp_path / "out", "--rank", "4", "--verify")
    assert result.exit_code == 0, result.stderr
    out = _tensors(tmp_path / "out")
    a, b = out[f"{P}conv.lora_A.weight"], out[f"{P}conv.lora_B.weight"]
    assert list(a.shape) == [4, 5, 3, 3]
    assert list(b.shape) == [10, 4, 1, 1]

    def delta(path: Path) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(_net(), str(path))
        return model.base_model.model.conv.get_delta_weight("default").double()

    full = delta(src).reshape(10, -1)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    ours = delta(tmp_path / "out").reshape(10, -1)
    assert (ours - best).norm() / full.norm() < 1e-5


@pytest.mark.slow
def test_what_cannot_be_computed_is_refused_by_name(
    conv_adapters: dict[str, Path], tmp_path: Path
) -> None:
    result = run("convert", conv_adapters["grouped"], tmp_path / "out", "--rank", "2")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: `grouped` is a grouped convolution's LoRA")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("a", "b", "problem"),
    [
        ((8, 5, 3, 3), (10, 8, 1, 1), None),  # Conv2d
        ((4, 4, 3, 3), (8, 2, 1, 1), None),  # Conv2d, groups=2
        ((8, 5, 3), (10, 8, 1), None),  # Conv1d
        ((8, 64), (64, 8), None),  # Linear
        ((8, 5, 3, 3), (10, 8, 3, 3), "is not a 1x1 convolution"),
        ((8, 5, 3, 3), (10, 3, 1, 1), "has 8 rows but lora_B has 3 columns"),
        ((8, 64), (64, 4), "has 8 rows but lora_B has 4 columns"),
        ((8, 5, 3, 3), (10, 8), "are not LoRA factors"),
        ((0, 64), (64, 0), "rank 0"),
    ],
)
def test_one_pair_rule(a: tuple[int, ...], b: tuple[int, ...], problem: str | None) -> None:
    found = pair_problem("lora_A", a, "lora_B", b)
    assert found == problem if problem is None else problem in (found or "")


def test_a_pair_in_two_dtypes_is_cast_per_tensor(tmp_path: Path) -> None:
    """A pair whose factors differ in dtype is still a pair (PEFT loads it): a cast takes each
    tensor as it is; a rank reduction, which writes both in one dtype, needs --dtype."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    write_tensors(
        src / "adapter_model.safetensors",
        {
            f"{P}q.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
            f"{P}q.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float16),
        },
    )
    (src / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q"]})
    )
    assert run("inspect", src, "--check").exit_code == 0
    cast = run("convert", src, tmp_path / "cast", "--dtype", "bfloat16", "--verify")
    assert cast.exit_code == 0, cast.stderr
    refused = run("convert", src, tmp_path / "r2", "--rank", "2")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: `q`: lora_A is float32 but lora_B is float16")
    reduced = run("convert", src, tmp_path / "r2", "--rank", "2", "--dtype", "float32", "--verify")
    assert reduced.exit_code == 0, reduced.stderr
