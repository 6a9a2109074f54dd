"""`adapterctl extract` from the command line: the report, --json, --target/--modules-to-save
comma lists, --verify failing, refusals (one error line, at most one hint, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.fixtures import _quiet, tiny_llama

runner = CliRunner()
pytestmark = pytest.mark.slow


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, ["extract", *[str(a) for a in args]], prog_name="adapterctl")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """BASE, TUNED (q_proj and v_proj changed at rank 2, one norm changed) and GROWN (a
    vocabulary of 72 rows where BASE has 64)."""

    def run() -> tuple[Path, Path, Path]:
        import torch

        root = tmp_path_factory.mktemp("extract-cli")
        model = tiny_llama()
        model.save_pretrained(str(root / "base"))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "v_proj.weight")):
                    b = torch.randn(p.shape[0], 2, generator=g)
                    p.add_(0.05 * b @ torch.randn(2, p.shape[1], generator=g))
                elif name == "model.norm.weight":
                    p.add_(0.1)
        model.save_pretrained(str(root / "tuned"), max_shard_size="30KB")
        grown = tiny_llama()
        grown.resize_token_embeddings(72, mean_resizing=False)
        grown.save_pretrained(str(root / "grown"))
        return root / "base", root / "tuned", root / "grown"

    result: tuple[Path, Path, Path] = _quiet(run)
    return result


def test_human_report(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, tuned, _ = models
    result = invoke(base, tuned, tmp_path / "out", "--rank", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["module", "kind", "shape", "r", "method", "energy", "rel.", "error"]
    assert lines[1].split()[:5] == [
        "model.layers.0.self_attn.q_proj",
        "linear",
        "32×32",
        "2",
        "svd",
    ]
    assert f"✓ {tmp_path / 'out'} (4 modules, " in result.stdout
    assert "unchanged (not written): 10 modules" in result.stdout
    assert "changed, not stored: model.norm.weight" in result.stdout
    assert result.stderr == ""


def test_json_report(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, tuned, _ = models
    result = invoke(base, tuned, tmp_path / "out", "--energy", "0.99", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert [m["rank"] for m in doc["modules"]] == [2, 2, 2, 2]
    assert doc["modules"][0]["kind"] == "linear"
    assert doc["changed_not_stored"] == ["model.norm.weight"]
    assert doc["verification"]["passed"] is True
    assert doc["config"]["r"] == doc["config"]["lora_alpha"] == 2


def test_comma_lists_and_modules_to_save(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, tuned, _ = models
    out = tmp_path / "out"
    result = invoke(
        base, tuned, out, "--rank", "1", "--target", "q_proj,k_proj", "--target", "o_proj",
        "--modules-to-save", "model.norm", "--dtype", "float16", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [m["module"].rsplit(".", 1)[-1] for m in doc["modules"]] == ["q_proj", "q_proj"]
    assert doc["unchanged"] == 4  # k_proj, o_proj
    assert doc["changed_not_stored"] == [
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    assert doc["modules_to_save"] == ["base_model.model.model.norm.weight"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]
    assert config["target_modules"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_verify_failure_writes_nothing(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    import adapterctl.ops.extract.deltas as deltas

    real = deltas.factor
    monkeypatch.setattr(deltas, "factor", lambda d, t: replace(f := real(d, t), a=f.a * 1.01))
    base, tuned, _ = models
    result = invoke(base, tuned, tmp_path / "out", "--rank", "2", "--verify", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["verification"]["passed"] is False
    error = json.loads(result.stderr.splitlines()[-1])["error"]
    assert error["message"].startswith("verification failed: ")
    assert list(tmp_path.iterdir()) == []


def test_refusals(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, tuned, grown = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # an adapter folder: --force may replace it
    (out / "keep.txt").write_text("mine")
    cases = [
        ([base, grown, out, "--rank", "2", "--force"], 1, "from 64 (BASE) to 72 (TUNED)"),
        ([base, tuned, out, "--force"], 2, "pass --rank N or --energy E"),
        ([base, tuned, out, "--rank", "2", "--energy", "0.9", "--force"], 2, "one of them"),
        ([base, tuned, out, "--rank", "2", "--bias", "some", "--force"], 2, "--bias"),
        ([base, tuned, out, "--rank", "2", "--seed", "-1", "--force"], 2, "--seed must be"),
        ([base, tuned, out, "--rank", "2"], 1, "already exists"),
    ]
    for args, code, message in cases:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.stderr)
        lines = result.stderr.splitlines()
        assert lines[0].startswith("error: "), result.stderr
        assert message in lines[0]
        assert len(lines) <= 2
        assert all(line.startswith("hint: ") for line in lines[1:])
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "keep.txt"]
        assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    grown_hint = invoke(base, grown, tmp_path / "new", "--rank", "2").stderr.splitlines()[1]
    assert (
        grown_hint == "hint: store the grown tensors whole: --modules-to-save embed_tokens,lm_head"
    )
