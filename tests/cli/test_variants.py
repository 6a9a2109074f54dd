"""LoRA variants and Git LFS pointers through the commands: one `error:` line naming the variant
or the pointer (exit 1), `inspect --check` passing what PEFT loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import write_adapter
from tests.variant_adapters import PEFT_CASES, lfs_pointer, peft_variants, refusal

__all__ = ["peft_variants"]  # the session fixture, used below

runner = CliRunner()
LFS = "is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"


def cli(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl")


def error_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_commands_on_peft_variant_adapters(
    case: str, peft_variants: dict[str, Path], llama_base: Path, tmp_path: Path
) -> None:
    src = peft_variants[case]
    message = refusal(PEFT_CASES[case])

    result = cli("load", llama_base, src)
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"error: `{src}`: {message}"]
    assert "match nothing" not in result.stderr
    assert "size mismatch" not in result.stderr

    result = cli("inspect", src, "--check", "--json")
    assert result.exit_code == 0, result.output
    (adapter,) = json.loads(result.stdout)["adapters"]
    assert adapter["problems"] == [{"severity": "warning", "message": message}]

    result = cli("convert", src, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 1
    assert error_lines(result) == [f"error: `{src}`: {message}"]
    assert not (tmp_path / "out").exists()

    result = cli("select", src, tmp_path / "copy", "-a", "default")
    assert result.exit_code == 0, result.output
    assert message in result.stderr

    result = cli("push", src, "alice/tiny", "--base-model", "org/m", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"`{src}`: {message}; it is uploaded as is" in result.stderr


def test_inspect_human_names_the_variant_not_shape_errors(tmp_path: Path) -> None:
    """BD-LoRA's block-diagonal lora_B has r/nblocks columns: no "rows but columns" error."""
    import numpy as np

    p = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{p}.lora_A.weight": np.zeros((4, 8), "float32"),
        f"{p}.lora_B.weight": np.zeros((8, 2), "float32"),
        f"{p}.lora_diag": np.zeros((4,), "float32"),
    }
    src = write_adapter(tmp_path / "a", tensors, {"use_bdlora": {"nblocks": 2}, "kasa_config": {}})
    result = cli("inspect", src, "--check")
    assert result.exit_code == 0, result.output
    assert "rows but" not in result.output
    assert "no known kind" not in result.output
    # the tensor table lists KaSA's vector under its module and its own kind
    diag_rows = [line.split() for line in result.stdout.splitlines() if "lora_diag" in line]
    assert [row[:2] for row in diag_rows] == [["model.layers.0.self_attn.q_proj", "lora_diag"]]
    assert (
        "this adapter uses BD-LoRA (`use_bdlora`) and KaSA (`kasa_config`), which adapterctl "
        "does not compute" in " ".join((result.stderr + result.stdout).split())  # lines wrap
    )


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("command", ["inspect", "select", "convert", "push"])
def test_lfs_pointer_adapter(fmt: str, command: str, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "a")
    (src / "adapter_model.safetensors").unlink()
    weights = src / f"adapter_model.{fmt}"
    weights.write_bytes(lfs_pointer())
    args: list[str | Path] = {
        "inspect": ["inspect", src],
        "select": ["select", src, tmp_path / "out", "-a", "default"],
        "convert": ["convert", src, tmp_path / "out", "--dtype", "bfloat16"],
        "push": ["push", src, "alice/tiny", "--base-model", "org/m", "--dry-run"],
    }[command]
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"error: `{weights}` {LFS}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lfs_pointer_in_load(
    llama_base: Path, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(peft_adapters["llama_basic"], adapter)
    (adapter / "adapter_model.safetensors").write_bytes(lfs_pointer())
    result = cli("load", llama_base, adapter)
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"error: `{adapter / 'adapter_model.safetensors'}` {LFS}"]

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    (base / "model.safetensors").write_bytes(lfs_pointer(10**9))
    result = cli("load", base, peft_adapters["llama_basic"])
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"error: `{base / 'model.safetensors'}` {LFS}"]
