"""`adapterctl convert SOURCE OUTPUT --peft-version X.Y` from the command line: the config written
for an older PEFT, what is resolved and what is refused (one error line naming the key and the
first release that knows it). The rules themselves: tests/lib/test_peftversions.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from adapterctl.format.peftversions import KEYS, knows
from tests.helpers import Q, V, lora_deltas, lora_tensors, write_adapter

runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, ["convert", *[str(a) for a in args]], prog_name="adapterctl")


def adapter(tmp_path: Path, **config: Any) -> Path:
    tensors = {**lora_tensors(Q), **lora_tensors(V, r=4, d_in=8, d_out=16)}
    return write_adapter(
        tmp_path / "src", tensors, {"target_modules": ["q_proj", "v_proj"], **config}
    )


def written(out: Path) -> dict[str, Any]:
    return json.loads((out / "adapter_config.json").read_text())  # type: ignore[no-any-return]


def test_writes_only_the_keys_of_that_release(tmp_path: Path) -> None:
    src = adapter(tmp_path)
    result = invoke(src, tmp_path / "out", "--peft-version", "0.10")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    config = written(tmp_path / "out")
    assert set(config) == {k for k in KEYS if knows("0.10", k)} - {"runtime_config"}
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        4,
        8,
        ["q_proj", "v_proj"],
    )
    weights = "adapter_model.safetensors"
    assert (tmp_path / "out" / weights).read_bytes() == (src / weights).read_bytes()


def test_a_patch_release_names_its_minor(tmp_path: Path) -> None:
    result = invoke(adapter(tmp_path), tmp_path / "out", "--peft-version", "0.17.1")
    assert result.exit_code == 0, result.stderr
    assert "target_parameters" in written(tmp_path / "out")
    assert "alora_invocation_tokens" not in written(tmp_path / "out")


def test_resolutions_are_warnings_and_in_the_json(tmp_path: Path) -> None:
    src = adapter(tmp_path, target_modules="all-linear", exclude_modules=["k_proj"])
    result = invoke(src, tmp_path / "out", "--peft-version", "0.7", "--json")
    assert result.exit_code == 0, result.stderr
    note = (
        "PEFT 0.7: target_modules written as the 2 modules the weights hold (exclude_modules "
        'and "all-linear" resolved)'
    )
    assert json.loads(result.stdout)["warnings"] == [note]
    assert written(tmp_path / "out")["target_modules"] == [Q, V]
    assert "exclude_modules" not in written(tmp_path / "out")


def test_a_feature_the_release_lacks_is_one_error_line(tmp_path: Path) -> None:
    result = invoke(adapter(tmp_path, lora_bias=True), tmp_path / "out", "--peft-version", "0.13")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: `lora_bias` is on and PEFT 0.13 does not know it (first in PEFT 0.14)\n"
        "hint: convert for PEFT 0.14 or later\n"
    )
    assert not (tmp_path / "out").exists()
    result = invoke(adapter(tmp_path, lora_bias=True), tmp_path / "out", "--peft-version", "0.14")
    assert result.exit_code == 0, result.stderr
    assert written(tmp_path / "out")["lora_bias"] is True


def test_rslora_is_folded_for_a_release_without_it(tmp_path: Path) -> None:
    """PEFT 0.7 has no rslora; its meaning is written in 0.7's terms exactly: each module's
    alpha/sqrt(r) folded into lora_B, r = lora_alpha, as --portable does."""
    src = adapter(tmp_path, use_rslora=True, lora_alpha=16, rank_pattern={"v_proj": 4})
    result = invoke(src, tmp_path / "out", "--peft-version", "0.7")
    assert result.exit_code == 0, result.stderr
    assert "PEFT 0.7 does not know rslora" in result.stderr
    config = written(tmp_path / "out")
    assert "use_rslora" not in config
    assert config["r"] == config["lora_alpha"]
    assert not config.get("rank_pattern")
    before, after = lora_deltas(src), lora_deltas(tmp_path / "out")
    assert before.keys() == after.keys()
    for module, d in before.items():
        assert abs(after[module] - d).max() <= 1e-6 * abs(d).max(), module


@pytest.mark.parametrize("version", ["0.5", "0.22", "latest"])
def test_an_unknown_release_is_a_usage_error(tmp_path: Path, version: str) -> None:
    result = invoke(adapter(tmp_path), tmp_path / "out", "--peft-version", version)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: unknown PEFT version {version!r}\nhint: give a release from 0.6 to 0.21, e.g. 0.10\n"
    )
    assert not (tmp_path / "out").exists()


def test_combines_with_dtype_and_verify(tmp_path: Path) -> None:
    """PEFT 0.14 would give q_proj rank 2 (suffix keys first): one whole-name key per module."""
    tensors = {**lora_tensors(Q, r=3), **lora_tensors(V, r=4, d_in=8, d_out=16)}
    config = {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {Q: 3, "q_proj": 2}}
    src = write_adapter(tmp_path / "src", tensors, config)
    result = invoke(src, tmp_path / "out", "--peft-version", "0.14", "--dtype", "bfloat16", "--verify")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        "warning: PEFT 0.14: rank_pattern/alpha_pattern written as one key per module\n"
    )
    assert written(tmp_path / "out")["rank_pattern"] == {Q: 3}
    header = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    assert b'"BF16"' in header[:1000]
