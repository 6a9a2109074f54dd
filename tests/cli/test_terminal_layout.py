"""Tables at 80 columns (issue 11, section 6): names shortened in the middle, never cut at the
end; layers in numeric order; long lines wrapped; one row per module for big adapters; one unit
system and one dtype spelling."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli.columns import cells, distinct_names, natural_key, shorten, table_lines
from adapterctl.cli.main import app
from tests.helpers import P, lora_tensors, write_adapter

ROOT = Path(__file__).resolve().parents[2]

runner = CliRunner()
LLAMA = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LLAMA += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def invoke(*args: str | Path, columns: str | None = "80") -> Any:
    return runner.invoke(
        app, [str(a) for a in args], prog_name="adapterctl", env={"COLUMNS": columns}
    )


def llama_adapter(directory: Path, layers: int, prefix: str = "model.layers", r: int = 4) -> Path:
    """A Llama-shaped adapter: every linear layer of `layers` layers (float16 factors)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        for m in LLAMA:
            module = f"{P}{prefix}.{layer}.{m}"
            tensors[f"{module}.lora_A.weight"] = rng.standard_normal((r, 16)).astype(np.float16)
            tensors[f"{module}.lora_B.weight"] = rng.standard_normal((16, r)).astype(np.float16)
    config = {
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": [m.split(".")[1] for m in LLAMA],
        "base_model_name_or_path": "meta-llama/Llama-3.1-8B-Instruct",
        "task_type": "CAUSAL_LM",
        "rank_pattern": {f"{prefix}.3.self_attn.q_proj": r},
    }
    return write_adapter(directory, tensors, config)


def assert_fits(text: str, columns: int = 80) -> None:
    wide = [line for line in text.splitlines() if len(line) > columns]
    assert wide == [], "\n".join(wide)


def layer_order(text: str, marker: str = "self_attn.q_proj") -> list[int]:
    """The layer numbers of `marker` rows as they come, each once."""
    found = [int(n) for n in re.findall(rf"layers\.(\d+)\.{re.escape(marker)}\b", text)]
    return list(dict.fromkeys(found))


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Relative paths, so that the lines measured are ours and not the temp folder's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("layers", "args"),
    [
        pytest.param(12, [], id="tensors-12-layers"),
        pytest.param(32, [], id="modules-32-layers"),
        pytest.param(32, ["--tensors"], id="tensors-32-layers"),
    ],
)
def test_inspect_of_a_llama_adapter_fits_80_columns(
    cwd: Path, layers: int, args: list[str]
) -> None:
    llama_adapter(cwd / "llama", layers)
    result = invoke("inspect", "llama", *args)
    assert result.exit_code == 0, result.stderr
    assert_fits(result.stdout)
    assert layer_order(result.stdout) == list(range(layers))
    assert "model.layers.31.mlp.down_proj" in result.stdout or layers != 32


def test_big_adapters_get_one_row_per_module(cwd: Path) -> None:
    """448 tensors: one row per module by default, one per tensor with --tensors; the JSON keeps
    every tensor either way."""
    llama_adapter(cwd / "llama", 32)
    compact = invoke("inspect", "llama")
    full = invoke("inspect", "llama", "--tensors")
    rows = [line for line in compact.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 32 * 7
    assert "`--tensors` lists all 448 tensors" in compact.stdout
    assert re.search(r"^model\.layers\.0\.mlp\.down_proj +A B +4 +8 +float16 +256 B$", compact.stdout, re.M)  # fmt: skip
    full_rows = [line for line in full.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(full_rows) == 448
    doc = json.loads(invoke("inspect", "llama", "--json").stdout)
    assert len(doc["adapters"][0]["tensors"]) == 448
    small = llama_adapter(cwd / "small", 2)
    assert "--tensors" not in invoke("inspect", small).stdout  # below 400: every tensor


def test_long_module_names_keep_their_distinguishing_end(cwd: Path) -> None:
    """A multimodal prefix makes names too long for 80 columns: the prefix every row shares is
    said once above the table and the rows show the rest, each with its layer number and
    module, all still distinct."""
    prefix = "model.language_model.transformer.decoder.layers"
    llama_adapter(cwd / "mm", 12, prefix=prefix)
    for args in (["inspect", "mm"], ["convert", "mm", "out", "--dtype", "bfloat16"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.stderr
        assert_fits(result.stdout)
        assert "module: model.language_model.transformer.decoder.… in every row" in result.stdout
        lines = result.stdout.splitlines()
        names = [ln.split()[0] for ln in lines if ln.startswith("layers.")]
        assert all(re.fullmatch(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj", n) for n in names)
        assert layer_order(result.stdout) == list(range(12))
        if args[0] == "inspect":  # two rows (lora_A, lora_B) per module, nothing else equal
            assert len(set(names)) == len(names) // 2 == 12 * 7
        else:
            assert len(set(names)) == len(names) == 12 * 7


def test_without_a_width_names_are_never_shortened(cwd: Path) -> None:
    """Piped output (no COLUMNS, not a terminal) keeps every full name for grep."""
    prefix = "model.language_model.transformer.decoder.layers"
    llama_adapter(cwd / "mm", 2, prefix=prefix)
    result = invoke("inspect", "mm", columns=None)
    assert "…" not in result.stdout
    assert f"{prefix}.1.mlp.down_proj" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--dtype", "bfloat16", "--verify"], id="dtype-verify"),
        pytest.param(["--rank", "2", "--verify"], id="rank-verify"),
    ],
)
def test_convert_table_fits_80_columns(cwd: Path, args: list[str]) -> None:
    """The table was 94 columns: what every module had done is said once, above it."""
    llama_adapter(cwd / "llama", 12)
    result = invoke("convert", "llama", "out", *args)
    assert result.exit_code == 0, result.stderr
    assert_fits(result.stdout)
    assert layer_order(result.stdout) == list(range(12))
    first = result.stdout.splitlines()[0]
    assert first in ("every module: float16->bfloat16", "every module: rank 4->2")
    assert "BF16" not in result.stdout
    assert "F16" not in result.stdout


def test_convert_table_shows_differing_actions_per_module(cwd: Path) -> None:
    """Modules stored in different dtypes: a cast to float16 changes only the float32 one, so
    the `done` column stays, per module."""
    rng = np.random.default_rng(0)
    tensors = {}
    for module, dtype in (("q_proj", np.float32), ("v_proj", np.float16)):
        name = f"{P}model.layers.0.self_attn.{module}"
        tensors[f"{name}.lora_A.weight"] = rng.standard_normal((4, 8)).astype(dtype)
        tensors[f"{name}.lora_B.weight"] = rng.standard_normal((8, 4)).astype(dtype)
    write_adapter(cwd / "mixed", tensors, {"target_modules": ["q_proj", "v_proj"]})
    result = invoke("convert", "mixed", "out", "--dtype", "float16")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["module", "done", "r", "alpha"]
    assert lines[1].split()[:2] == ["model.layers.0.self_attn.q_proj", "float32->float16"]
    assert lines[2].split()[:2] == ["model.layers.0.self_attn.v_proj", "copied"]


def test_target_modules_line_wraps(cwd: Path) -> None:
    targets = [f"module_number_{i}_proj" for i in range(30)]
    a = np.zeros((4, 8), np.float32)
    tensors = {
        f"{P}model.layers.0.{targets[0]}.lora_A.weight": a,
        f"{P}model.layers.0.{targets[0]}.lora_B.weight": a.T.copy(),
    }
    write_adapter(cwd / "t", tensors, {"target_modules": targets})
    result = invoke("inspect", "t")
    assert result.exit_code == 0, result.stderr
    assert_fits(result.stdout)
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  target modules"))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 19):
            break
        block.append(line)
    assert len(block) > 5
    assert " ".join(block).split("target modules")[1].split() == [
        f"{t}," for t in sorted(targets)[:-1]
    ] + [sorted(targets)[-1]]


def test_one_unit_system_and_dtype_spelling(cwd: Path) -> None:
    """Sizes in binary units (KiB, MiB) in every command; dtypes as torch names."""
    llama_adapter(cwd / "llama", 2, r=64)
    outputs = [
        invoke("inspect", "llama").stdout,
        invoke("convert", "llama", "c", "--dtype", "bfloat16").stdout,
        invoke("select", "llama", "s", "-a", "default").stdout,
        invoke("push", "llama", "alice/x", "--dry-run").stdout,
    ]
    text = "\n".join(outputs)
    assert re.search(r"\d KiB", text)
    assert not re.search(r"\d (kB|KB|MB|GB)\b", text)
    assert not re.search(r"\b(BF16|F16|F32)\b", text)
    assert "bfloat16" in text


def test_natural_key_and_shorten() -> None:
    huge, big = "1" + "0" * 5000, "7" + "0" * 4999  # past int()'s 4300-digit limit
    numbers = ["10", "2", "1", "0", "21", huge, "3", big]
    names = [f"model.layers.{i}.mlp" for i in numbers]
    ordered = sorted(names, key=natural_key)
    expected = ["0", "1", "2", "3", "10", "21", big, huge]
    assert ordered == [f"model.layers.{i}.mlp" for i in expected]
    assert sorted(["a.07", "a.7", "a.10"], key=natural_key) == ["a.07", "a.7", "a.10"]
    name = "model.language_model.layers.10.self_attn.q_proj"
    for room in range(16, len(name)):
        short = shorten(name, room)
        assert len(short) == room
        assert short.endswith("q_proj")
        assert "…" in short
    assert shorten(name, 30).endswith("layers.10.self_attn.q_proj")
    assert shorten(name, len(name)) == name


def test_table_never_cuts_the_end_of_a_name() -> None:
    rows = [[f"model.decoder.block.{i}.layer.0.SelfAttention.q", "lora_A"] for i in range(12)]
    lines = list(table_lines(["module", "kind"], rows, "ll", columns=40))
    assert all(len(line) <= 40 for line in lines)
    assert lines[0].startswith("module: mo")
    assert lines[0].endswith("decoder.… in every row below")
    assert [line.split()[0][-20:] for line in lines[2:]] == [
        f"{i}.layer.0.SelfAttention.q"[-20:] for i in range(12)
    ]


LEAF = "self_attn.out_proj_extremely_long_name_here"
VISION = "model.vision_tower.vision_model.encoder.layers"
LANGUAGE = "model.language_model.model.layers"


def towers(
    directory: Path, layers: dict[str, list[int]], ranks: dict[str, int] | None = None
) -> list[str]:
    """An adapter with module `{tower}.{layer}.{LEAF}` for each tower and layer (rank 4, or
    `ranks[module]`); returns the module names."""
    modules = [f"{tower}.{i}.{LEAF}" for tower, ids in layers.items() for i in ids]
    tensors: dict[str, Any] = {}
    for m in modules:
        tensors |= lora_tensors(module=m, r=(ranks or {}).get(m, 4), d_in=4, d_out=4)
    config = {"target_modules": [LEAF.split(".")[1]], "rank_pattern": ranks or {}}
    write_adapter(directory, tensors, config)
    return modules


def name_rows(text: str) -> list[str]:
    """The module cells of every table row of ours (they all end with the leaf's end)."""
    cells = [ln.split()[0] for ln in text.splitlines() if ln.split()]
    return [c for c in cells if c.endswith("_here") and not c.startswith("module")]


def assert_told_apart(text: str, modules: list[str], rows_per_module: int) -> None:
    """Every module's rows are the same and no two modules' are: as many distinct cells as
    modules, each naming its layer (and its tower where the towers differ)."""
    rows = name_rows(text)
    assert len(rows) == rows_per_module * len(modules), text
    assert len(set(rows)) == len(modules), text
    towers_seen = {m.rsplit(".layers.", 1)[0] for m in modules}
    for row in rows:
        assert re.search(r"(^|[.…])\d+([.…]|$)", row), row  # its layer number, whole
        if len(towers_seen) > 1:
            assert "vision" in row or "language" in row, row


def test_reviewer_repro_convert_and_inspect_tell_the_modules_apart(cwd: Path) -> None:
    """Three modules that differ only in their layer number, behind a long common prefix, at
    80 columns: convert printed three identical rows `…self_attn.out_proj_…`."""
    modules = towers(cwd / "src", {VISION: [0, 1, 11]})
    for args, per in ((["convert", "src", "out", "--rank", "2"], 1), (["inspect", "src"], 2)):
        result = invoke(*args)
        assert result.exit_code == 0, result.stderr
        assert_fits(result.stdout)
        assert_told_apart(result.stdout, modules, per)
        assert "module: model.vision_tower.vision_model.encoder.… in every row" in result.stdout
        assert re.search(
            r"^layers\.11[.…]\S*out_proj_extremely_long_name_here ", result.stdout, re.M
        )


def test_vision_and_language_towers_in_every_table(cwd: Path) -> None:
    """Two towers with the same layers and leaves: tensor table, per-module r/alpha table and
    convert's table keep the tower and the layer of each row, within 80 columns."""
    ranks = {f"{LANGUAGE}.1.{LEAF}": 2}
    modules = towers(cwd / "src", {VISION: [0, 1, 11], LANGUAGE: [0, 1, 11]}, ranks)
    inspect = invoke("inspect", "src")
    assert inspect.exit_code == 0, inspect.stderr
    assert_fits(inspect.stdout)
    tables = inspect.stdout.split("\nmodule ")
    assert len(tables) == 3, inspect.stdout  # the tensor table, then the r/alpha one
    assert_told_apart(tables[1], modules, 2)
    assert_told_apart(tables[2], modules, 1)
    assert re.search(r"language_model\S*1\S*  +2  +8  +4$", tables[2], re.M), tables[2]
    convert = invoke("convert", "src", "out", "--rank", "2")
    assert convert.exit_code == 0, convert.stderr
    assert_fits(convert.stdout)
    assert_told_apart(convert.stdout, modules, 1)


def test_compact_view_of_two_towers_tells_every_module_apart(cwd: Path) -> None:
    """448 tensors (one row per module) across two towers: 224 distinct rows in 80 columns."""
    layers = list(range(112))
    modules = towers(cwd / "src", {VISION: layers, LANGUAGE: layers})
    result = invoke("inspect", "src")
    assert result.exit_code == 0, result.stderr
    assert "`--tensors` lists all 448 tensors" in result.stdout
    assert_fits(result.stdout)
    assert_told_apart(result.stdout, modules, 1)


def test_cjk_names_are_measured_in_terminal_columns(cwd: Path) -> None:
    """Wide characters take two columns: the next column starts at the same place in every
    row, and no row is wider than 80 columns."""
    names = [
        f"model.层.{i}.注意力投影_非常长的名字_这里还有更多的字符_以及更多" for i in (0, 1, 11)
    ]
    tensors: dict[str, Any] = {}
    for m in names:
        tensors |= lora_tensors(module=m, d_in=4, d_out=4)
    write_adapter(
        cwd / "src",
        tensors,
        {"target_modules": ["注意力投影_非常长的名字_这里还有更多的字符_以及更多"]},
    )
    result = invoke("inspect", "src")
    assert result.exit_code == 0, result.stderr
    rows = [ln for ln in result.stdout.splitlines() if "lora_" in ln]
    assert len(rows) == 6
    assert all(cells(ln) <= 80 for ln in result.stdout.splitlines())
    assert len({cells(ln.split("lora_")[0]) for ln in rows}) == 1, "\n".join(rows)
    assert len({ln.split()[0] for ln in rows}) == 3
    assert cells("层注意") == 6
    assert cells("ab") == 2


def test_an_ascii_stream_gets_the_escapes_measured(cwd: Path) -> None:
    """Under PYTHONIOENCODING=ascii, `é` is written `\\xe9` (4 columns): widths are measured on
    that, so the columns line up and the lines stay within 80 columns."""
    names = [f"model.layers.{i}.self_attn.caméra_très_longue_projection_éééééé" for i in (0, 1)]
    names += ["model.layers.2.mlp.down_proj"]
    tensors: dict[str, Any] = {}
    for m in names:
        tensors |= lora_tensors(module=m, d_in=4, d_out=4)
    write_adapter(cwd / "src", tensors, {"target_modules": ["down_proj"]})
    result = subprocess.run(
        [sys.executable, "-m", "adapterctl", "inspect", "src"],
        capture_output=True,
        encoding="ascii",
        errors="strict",
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "PYTHONIOENCODING": "ascii"},
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_fits(result.stdout)
    rows = [ln for ln in result.stdout.splitlines() if "lora_" in ln]
    assert len(rows) == 6
    assert len({ln.index("lora_") for ln in rows}) == 1, result.stdout
    assert len({ln.split()[0] for ln in rows}) == 3
    assert "\\xe9" in result.stdout  # escaped
    assert "..." in result.stdout  # and shortened


def test_names_that_differ_inside_one_long_segment_stay_distinct() -> None:
    """No dot to cut at: the characters around where each name parts from the others are kept,
    with its start and its end, within the room."""
    names = ["x" * 300 + str(i) + "y" * 300 for i in range(50)]
    short = distinct_names(names, 60)
    assert len(set(short)) == 50
    assert all(cells(s) <= 60 for s in short)
    assert all(s.startswith("xxx") and s.endswith("yyy") for s in short)
    assert all(re.search(rf"x{i}y", s) for i, s in enumerate(short))


def test_distinct_names_never_merges_two_names() -> None:
    """Names built to collide under any one cutting rule (equal starts, ends and lengths):
    every room from 16 columns up keeps them apart."""
    names = [f"a.{p}.{m}.{q}.z" for p in ("bb", "bc") for m in ("x" * 40, "y" * 40) for q in "01"]
    for room in range(16, 60):
        short = distinct_names(names, room)
        assert len(set(short)) == len(names), (room, short)
