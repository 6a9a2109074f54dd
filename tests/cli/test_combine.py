"""`adapterctl combine` from the command line: the report, --json, DIR/NAME sources, warnings,
refusals (one error line and a hint, nothing written, an existing output untouched)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import P, Q, V, lora_deltas, lora_tensors, write_adapter

runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, ["combine", *[str(a) for a in args]], prog_name="adapterctl")


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    """`a` (q_proj, r 4, alpha 8) and, in a multi-adapter folder, `multi/b` (q_proj and v_proj,
    r 2, rslora) with the root adapter `multi` beside it."""
    a = write_adapter(tmp_path / "a")
    multi = write_adapter(tmp_path / "multi", lora_tensors(V), {"target_modules": ["v_proj"]})
    rng = np.random.default_rng(7)
    tensors = {
        **{
            k: rng.standard_normal(v.shape).astype(np.float32)
            for k, v in lora_tensors(Q, r=2).items()
        },
        **lora_tensors(V, r=2),
    }
    write_adapter(
        multi / "b",
        tensors,
        {"r": 2, "lora_alpha": 3, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    )
    return a, multi / "b"


def test_human_report(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = sources
    out = tmp_path / "out"
    result = invoke(a, b, out, "--weights", "1,-0.5", "--method", "cat", "--verify")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["module", "r", "rel.", "error"]
    assert lines[1].split()[:4] == [Q, "4+2", "->", "6"]
    assert lines[2].split()[:4] == [V, "2", "->", "2"]
    assert lines[3].startswith(f"✓ {out} (cat, 2 sources, 2 modules, ")
    assert lines[4].startswith("  verified 2 modules, worst ")
    assert result.stderr == ""


def test_json_document(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = sources
    out = tmp_path / "out"
    result = invoke(a, b, out, "--weights", "1,2", "--method", "svd", "--rank", "3", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["sources"] == [str(a), str(b)]
    assert (doc["method"], doc["weights"], doc["seed"], doc["dtype"]) == (
        "svd",
        [1.0, 2.0],
        0,
        "F32",
    )
    assert doc["config"]["r"] == doc["config"]["lora_alpha"] == 3
    assert doc["config"]["use_rslora"] is False
    assert doc["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert [m["module"] for m in doc["modules"]] == [Q, V]
    q = doc["modules"][0]
    assert (q["ranks_in"], q["rank_out"]) == ([4, 2], 3)
    assert 0 < q["energy"] < 1
    assert doc["verification"] is None
    assert doc["bytes_out"] == (out / "adapter_model.safetensors").stat().st_size
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (3, 3, {})


def test_root_adapter_of_a_multi_adapter_folder_as_dir_default(
    sources: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = sources
    out = tmp_path / "out"
    result = invoke(b.parent / "default", a, out, "--weights", "2,1", "--method", "cat")
    assert result.exit_code == 0, result.stderr
    got = lora_deltas(out)
    root, first = lora_deltas(b.parent), lora_deltas(a)
    np.testing.assert_allclose(got[V], 2 * root[V], rtol=1e-6)
    np.testing.assert_allclose(got[Q], first[Q], rtol=1e-6)


def test_a_multi_adapter_folder_itself_is_refused(
    sources: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = sources
    result = invoke(b.parent, a, tmp_path / "out", "--weights", "1,1", "--method", "cat")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: source ")
    assert "holds 2 adapters" in lines[0]
    assert lines[1].startswith("hint: ")
    assert not (tmp_path / "out").exists()


def test_base_names_that_differ_are_a_warning(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", None, {"base_model_name_or_path": "org/one"})
    b = write_adapter(tmp_path / "b", None, {"base_model_name_or_path": "org/two"})
    result = invoke(a, b, tmp_path / "out", "--weights", "1,1", "--method", "linear", "--json")
    assert result.exit_code == 0, result.stderr
    warning = json.loads(result.stderr.splitlines()[0])["warning"]["message"]
    assert "different base models" in warning
    assert "`org/one`" in warning
    assert "`org/two`" in warning


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--weights", "1", "--method", "cat"], 2, "error: 1 weight for 2 sources"),
        (["--weights", "1,x", "--method", "cat"], 2, "is not a comma-separated list"),
        (["--weights", "1,1", "--method", "ties"], 2, "error: --method ties needs --density"),
        (
            ["--weights", "1,1", "--method", "dare_ties", "--density", "0"],
            2,
            "error: --density must be a fraction in (0, 1], not 0.0",
        ),
        (
            ["--weights", "1,1", "--method", "linear"],
            1,
            "error: --method linear combines the A's and the B's separately",
        ),
    ],
)
def test_refusals(
    sources: tuple[Path, Path], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    a, b = sources
    existing = write_adapter(tmp_path / "existing")
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    result = invoke(a, b, existing, "--force", *args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before


def test_json_error(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = sources
    dora = write_adapter(
        tmp_path / "dora",
        {**lora_tensors(), f"{P}{Q}.lora_magnitude_vector": np.ones(8, np.float32)},
        {"use_dora": True},
    )
    result = invoke(a, dora, tmp_path / "out", "--weights", "1,1", "--method", "cat", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stderr.splitlines()[-1])["error"]
    assert error["type"] == "UnsupportedVariantError"
    assert "DoRA" in error["message"]
    assert "--dora-to-lora" in error["hint"]
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_help_and_a_combine_stay_light(sources: tuple[Path, Path], tmp_path: Path) -> None:
    """`combine --help` imports nothing heavy; an svd combine with --verify only numpy (no torch,
    transformers, safetensors or peft)."""
    from tests.perf.test_startup import assert_light, heavy_in, run_cli

    assert_light(*run_cli("combine", "--help"))
    a, b = sources
    out = tmp_path / "out"
    args = ("--weights", "1,1", "--method", "svd", "--verify", "--json")
    proc, modules = run_cli("combine", str(a), str(b), str(out), *args)
    assert proc.returncode == 0, proc.stderr
    assert [m for m in heavy_in(modules) if m.split(".")[0] != "numpy"] == []
    assert json.loads(proc.stdout)["verification"]["passed"] is True


@pytest.mark.parametrize(
    ("dtype", "value", "found"),
    [
        (np.float32, np.nan, "2 NaN (of 32 values)"),
        (np.float16, np.inf, "2 +Inf (of 32 values)"),
        (np.float32, -np.inf, "2 -Inf (of 32 values)"),
    ],
    ids=["nan", "f16-inf", "neg-inf"],
)
def test_a_nonfinite_factor_is_refused_before_anything_is_written(
    sources: tuple[Path, Path], tmp_path: Path, dtype: Any, value: float, found: str
) -> None:
    """One NaN or ±Inf in a factor would make the combined module meaningless (cat would carry
    it into the output): one error line naming the source and the tensor, nothing written."""
    a, _ = sources
    tensors = {k: v.astype(dtype) for k, v in lora_tensors(V).items()}
    bad_key = f"{P}{V}.lora_B.weight"
    tensors[bad_key][3, 1] = tensors[bad_key][5, 0] = value
    bad = write_adapter(tmp_path / "bad", tensors, {"target_modules": ["v_proj"]})
    existing = write_adapter(tmp_path / "existing")
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    for method in ("cat", "svd"):
        result = invoke(a, bad, existing, "--force", "--weights", "1,1", "--method", method)
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert (
            lines[0] == f"error: `{bad}`: `{bad_key}` holds {found}: its module cannot be combined"
        )
        assert lines[1].startswith("hint: nothing was written")
        assert len(lines) == 2
        assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    tensors[bad_key][3, 1] = tensors[bad_key][5, 0] = 0.5
    fine = write_adapter(tmp_path / "fine", tensors, {"target_modules": ["v_proj"]})
    assert invoke(a, fine, tmp_path / "out", "--weights", "1,1", "--method", "cat").exit_code == 0


# --- the model card ---------------------------------------------------------------------------


def _front_matter(card: str) -> dict[str, Any]:
    """The card's front matter, parsed as the Hub does, after adapterctl's own bounded check."""
    import yaml

    from adapterctl.ops.card import load_card

    assert card.startswith("---\n")
    load_card(card, "the card")  # the bounded scan and huggingface_hub's ModelCard accept it
    data = yaml.safe_load(card.split("---\n")[1])
    assert isinstance(data, dict)
    return data


def test_the_card_names_the_base_and_the_combination(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", None, {"base_model_name_or_path": "org/base"})
    b = write_adapter(
        tmp_path / "b",
        None,
        {"base_model_name_or_path": "org/base", "task_type": "CAUSAL_LM"},
    )
    out = tmp_path / "out"
    args = ("--method", "dare_ties", "--density", "0.25", "--seed", "11")
    result = invoke(a, b, out, "--weights", "0.7,-0.4", *args)
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    data = _front_matter(card)
    assert data["library_name"] == "peft"
    assert data["base_model"] == "org/base"
    assert "base_model:adapter:org/base" in data["tags"]
    assert "pipeline_tag" not in data  # the first source's task type (none) is the output's
    assert "method `dare_ties`, density 0.25, majority sign method `total`, seed 11, from:" in card
    assert f"- `{a}` with weight 0.7\n- `{b}` with weight -0.4\n" in card
    assert "- `default`: r=4, lora_alpha=4" in card  # the output's facts: scale 1


def test_the_card_of_sources_for_different_bases_names_none(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", None, {"base_model_name_or_path": "org/one"})
    b = write_adapter(tmp_path / "b", None, {"base_model_name_or_path": "org/two"})
    out = tmp_path / "out"
    result = invoke(a, b, out, "--weights", "1,1", "--method", "svd", "--rank", "3")
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    data = _front_matter(card)
    assert "base_model" not in data
    assert not any(t.startswith("base_model") for t in data["tags"])
    assert "org/" not in card
    assert "method `svd`, rank 3, from:" in card
    assert "density" not in card
    assert "seed" not in card


def test_a_hostile_source_name_stays_inert_in_the_card(tmp_path: Path) -> None:
    """A folder may be named anything but `/`: a newline, backticks, the facts block's end marker,
    a heading, a link; the card shows the name escaped in one code span and renders none of it."""
    from markdown_it import MarkdownIt

    from adapterctl.ops.card import inert

    name = (
        "x`` <!-- adapterctl: end of adapter facts -->\n## Injected\u2028"
        "[a](javascript:alert(1)) <img src=x onerror=alert(1)>\r\n---\nbase_model: evil"
    )
    a = write_adapter(tmp_path / "a", None, {"base_model_name_or_path": "org/base"})
    b = write_adapter(tmp_path / name, None, {"base_model_name_or_path": "org/base"})
    out = tmp_path / "out"
    result = invoke(a, b, out, "--weights", "1,1", "--method", "cat")
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    assert _front_matter(card)["base_model"] == "org/base"
    assert f"- {inert(str(b))} with weight 1.0\n" in card
    assert card.splitlines().count("<!-- adapterctl: end of adapter facts -->") == 1
    assert card.count("\n---\n") == 1  # the front matter's end, nothing else
    assert not any("Injected" in line for line in card.splitlines() if not line.startswith("- `"))
    html = MarkdownIt("commonmark").render(card)
    assert "<h2>Injected" not in html
    assert html.count("<a href") == 1  # the base model's own link
    assert '<a href="https://huggingface.co/org/base">' in html
    assert "<img" not in html


def test_a_source_named_like_the_framework_heading_splits_nothing(tmp_path: Path) -> None:
    """A source path holding "### Framework versions": the card finds the heading as a whole line
    only, so the facts are not spliced into the name's code span, and the name makes no heading
    or link."""
    from markdown_it import MarkdownIt

    from adapterctl.ops.card import inert

    a = write_adapter(tmp_path / "a", None, {"base_model_name_or_path": "org/base"})
    b = write_adapter(
        tmp_path / "src" / "### Framework versions [x](http://evil)",
        None,
        {"base_model_name_or_path": "org/base"},
    )
    out = tmp_path / "out"
    result = invoke(a, b, out, "--weights", "1,1", "--method", "cat")
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    assert f"- {inert(str(b))} with weight 1.0\n" in card
    lines = card.splitlines()
    assert lines.count("### Framework versions") == 1
    facts = lines.index("<!-- adapterctl: adapter facts (rewritten on every save, convert and push) -->")  # fmt: skip
    assert facts < lines.index("### Framework versions")
    html = MarkdownIt("commonmark").render(card)
    assert html.count("<h3>") == 1
    assert re.search(r'href="[^"]*evil', html) is None
    assert html.count("<a href") == 1  # the base model's own link


def test_new_card_text_writes_what_card_text_writes() -> None:
    """combine writes its card without huggingface_hub (it stays light): the same text as the
    ModelCard path, for any base, task type and body."""
    from adapterctl.format.config import LoraConfig
    from adapterctl.ops.card import card_text, new_card_text

    body = "# Model card\n\nSome text, ünïcode.\n\n- `a` with weight 1.0\n"
    for base in (None, "org/base", "/local/path"):
        for task in (None, "CAUSAL_LM", "SEQ_CLS"):
            config = LoraConfig(
                r=4, target_modules=["q_proj"], base_model_name_or_path=base, task_type=task
            )
            assert new_card_text(config, body) == card_text(config, body)
            assert new_card_text(config) == card_text(config, None)  # extract's card
            assert new_card_text(config, body, "org/x") == card_text(config, body, None, "org/x")


def test_usage_line_reads_sources_then_output(tmp_path: Path) -> None:
    """Usage names SOURCE (repeated) then OUTPUT, in Typer's braces for required arguments as
    every command's usage does; one path alone is a usage error naming SOURCE."""
    result = runner.invoke(app, ["combine", "--help"], prog_name="adapterctl")
    assert result.exit_code == 0
    assert (
        result.stdout.splitlines()[0] == "Usage: adapterctl combine [OPTIONS] {SOURCE}... {OUTPUT}"
    )
    listed = result.stdout.split("Arguments:\n", 1)[1].split("\n\n", 1)[0]
    names = [ln.split()[0] for ln in listed.splitlines() if not ln.startswith("   ")]
    assert names == ["SOURCE", "OUTPUT"]
    alone = invoke(tmp_path / "out", "--weights", "1", "--method", "cat")
    assert alone.exit_code == 2
    assert "Missing argument 'SOURCE'" in alone.stderr
    assert not (tmp_path / "out").exists()
