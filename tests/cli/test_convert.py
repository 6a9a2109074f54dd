"""`adapterctl convert` from the command line: reports, --verify refusing to write, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import P, Q, V, lora_tensors, write_adapter

runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, ["convert", *[str(a) for a in args]], prog_name="adapterctl")


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    tensors = {**lora_tensors(Q), **lora_tensors(V, r=4, d_in=8, d_out=16)}
    return write_adapter(tmp_path / "src", tensors, {"target_modules": ["q_proj", "v_proj"]})


def test_json_report(adapter: Path, tmp_path: Path) -> None:
    result = invoke(adapter, tmp_path / "out", "--rank", "2", "--dtype", "bfloat16", "--verify", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["config"] == {
        "r": 2, "lora_alpha": 2, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True,
    }  # fmt: skip
    assert [m["module"] for m in doc["modules"]] == [Q, V]
    for m in doc["modules"]:
        assert m["actions"] == ["rank 4->2", "float32->bfloat16"]
        assert (m["r_in"], m["r"], m["alpha_in"], m["alpha"]) == (4, 2, 8, 2)
        assert 0 < m["energy"] < 1
        assert m["relative_error"] == pytest.approx(np.sqrt(1 - m["energy"]), rel=1e-6)
    assert doc["bytes_in"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert doc["bytes_out"] == (tmp_path / "out" / "adapter_model.safetensors").stat().st_size
    assert doc["verification"]["passed"] is True


def test_table_report(adapter: Path, tmp_path: Path) -> None:
    result = invoke(adapter, tmp_path / "out", "--energy", "0.8")
    assert result.exit_code == 0, result.stderr
    assert "energy" in result.stdout
    assert f"✓ {tmp_path / 'out'} (2 modules" in result.stdout


def test_overflow_writes_nothing(adapter: Path, tmp_path: Path) -> None:
    """float16 overflows 1e6: refused where the tensor is made (one error line naming the file
    and the module, before any verification), and the old output stays."""
    tensors = lora_tensors(Q)
    tensors[f"{P}{Q}.lora_B.weight"][0, 0] = 1e6
    src = write_adapter(tmp_path / "big", tensors)
    out = tmp_path / "out"
    assert invoke(src, out, "--dtype", "bfloat16").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = invoke(src, out, "--dtype", "float16", "--verify", "--force", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    message = json.loads(result.stderr)["error"]["message"]
    assert f"`{Q}` (lora_B.weight)" in message, message
    assert str(src) in message, message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_verification_writes_nothing(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite error planted in the written file: the report still comes out, exit 1, and the
    old output stays."""
    import adapterctl.ops.convert.adapter as mod
    from adapterctl.format.header import read_header

    out = tmp_path / "out"
    assert invoke(adapter, out, "--dtype", "bfloat16").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = mod._write

    def write_then_plant(plan: Any, directory: Path, total: int, progress: Any) -> int:
        n = real_write(plan, directory, total, progress)
        header = read_header(directory / "adapter_model.safetensors")
        t = header.tensors[f"{P}{Q}.lora_B.weight"]
        with open(directory / "adapter_model.safetensors", "r+b") as f:
            f.seek(header.data_start + t.start)
            f.write(b"\x00\x3c")  # 1.0 in float16
        return n

    monkeypatch.setattr(mod, "_write", write_then_plant)
    result = invoke(adapter, out, "--dtype", "float16", "--verify", "--force", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)  # the report still comes out
    assert doc["verification"]["passed"] is False
    assert doc["verification"]["worst"]["name"] == Q
    assert json.loads(result.stderr)["error"]["message"].startswith("verification failed")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [  # a bad command line is a usage error (2); an input that cannot be done, a failure (1)
        (["--rank", "0"], "--rank must be at least 1", 2),
        (["--energy", "0"], "--energy must be a fraction", 2),
        (["--dtype", "float64"], "unknown dtype", 2),
        ([], "nothing to convert", 1),
        (["--init", "pissa"], "--init does nothing without --base", 2),
    ],
)
def test_refusals(adapter: Path, tmp_path: Path, args: list[str], message: str, code: int) -> None:
    result = invoke(adapter, tmp_path / "out", *args)
    assert result.exit_code == code
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: {message}"), result.stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines)
    assert not (tmp_path / "out").exists()


def test_mismatched_pair(tmp_path: Path) -> None:
    both = {"target_modules": ["q_proj", "v_proj"]}
    tensors = {**lora_tensors(Q), **lora_tensors(V, d_out=16)}
    trained = write_adapter(tmp_path / "trained", tensors, {**both, "init_lora_weights": "pissa"})
    fewer = write_adapter(tmp_path / "fewer", lora_tensors(Q), both)
    result = invoke(trained, tmp_path / "out", "--initial", fewer)
    assert result.exit_code == 1
    assert "is in the trained adapter but not in the initial one" in result.stderr
    smaller = {**lora_tensors(Q, r=2), **lora_tensors(V, d_out=16)}
    result = invoke(
        trained, tmp_path / "out", "--initial", write_adapter(tmp_path / "r2", smaller, both)
    )
    assert result.exit_code == 1
    assert "differs between the pair" in result.stderr
    alpha = write_adapter(tmp_path / "alpha", tensors, {**both, "lora_alpha": 16})
    result = invoke(trained, tmp_path / "out", "--initial", alpha)
    assert result.exit_code == 1
    assert "differ in `lora_alpha`: 8 vs 16" in result.stderr
    assert not (tmp_path / "out").exists()


def test_multi_adapter_source(tmp_path: Path) -> None:
    write_adapter(tmp_path / "multi", lora_tensors(Q))
    write_adapter(tmp_path / "multi" / "other", lora_tensors(Q))
    result = invoke(tmp_path / "multi", tmp_path / "out", "--dtype", "float16")
    assert result.exit_code == 1
    assert "holds 2 adapters" in result.stderr
    assert "hint: pass one adapter's own folder" in result.stderr
    assert (
        invoke(tmp_path / "multi" / "other", tmp_path / "out", "--dtype", "float16").exit_code == 0
    )


@pytest.mark.parametrize(
    ("trained_init", "initial_init", "expected"),
    [
        ("pissa", True, "pissa"),
        (True, "olora", "olora"),
        (True, True, None),
        ("gaussian", "pissa", "pissa"),  # not a residual init: not what was converted
    ],
)
def test_converted_from_names_the_method(
    tmp_path: Path, trained_init: object, initial_init: object, expected: str | None
) -> None:
    """`converted_from` is the init the pair says it had; null when both configs say `true`."""
    trained = write_adapter(tmp_path / "t", lora_tensors(Q), {"init_lora_weights": trained_init})
    init = write_adapter(tmp_path / "i", lora_tensors(Q), {"init_lora_weights": initial_init})
    result = invoke(trained, tmp_path / "out", "--initial", init, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["converted_from"] == expected


def test_portable_report(adapter: Path, tmp_path: Path) -> None:
    """--portable: the scaling folded into B; the table says so and the JSON document has
    `portable` and an empty `not_portable`."""
    result = invoke(adapter, tmp_path / "out", "--portable", "--verify")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "every module: scaling 2 into B"
    assert lines[1].split() == ["module", "r", "alpha"]
    assert lines[2].split() == [Q, "4", "->", "4", "8", "->", "4"]
    assert lines[3].split() == [V, "4", "->", "4", "8", "->", "4"]
    assert f"✓ {tmp_path / 'out'} (2 modules" in result.stdout
    assert "not portable" not in result.stdout
    result = invoke(adapter, tmp_path / "out2", "--portable", "--rank", "3", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["portable"] is True
    assert doc["not_portable"] == []
    assert doc["config"]["r"] == doc["config"]["lora_alpha"] == 3
    assert doc["config"]["use_rslora"] is False
    assert [m["actions"] for m in doc["modules"]] == [["rank 4->3"], ["rank 4->3"]]
    # every other conversion's document is as before: no `portable` keys
    plain = json.loads(invoke(adapter, tmp_path / "out3", "--dtype", "float16", "--json").stdout)
    assert "portable" not in plain
    assert "not_portable" not in plain


def test_portable_pads_and_names_what_it_keeps(tmp_path: Path) -> None:
    tensors = {**lora_tensors(Q, r=2), **lora_tensors(V, r=6, d_out=16)}
    tensors[f"{P}{Q}.lora_magnitude_vector"] = np.ones(8, dtype=np.float32)
    tensors[f"{P}lm_head.weight"] = np.zeros((4, 8), dtype=np.float32)
    config = {
        "r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"], "use_dora": True,
        "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"v_proj": 6},
        "modules_to_save": ["lm_head"],
    }  # fmt: skip
    src = write_adapter(tmp_path / "src", tensors, config)
    result = invoke(src, tmp_path / "out", "--portable", "--verify")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["module", "done", "r", "alpha"]
    assert lines[1].split() == [Q, "padded", "2->6", "2", "->", "6", "2", "->", "6"]
    assert lines[2].split() == [V, "copied", "6", "->", "6", "6", "->", "6"]
    assert f"  not portable (kept as is): modules_to_save lm_head; dora {Q}\n" in result.stdout
    result = invoke(src, tmp_path / "out2", "--portable", "--json")
    doc = json.loads(result.stdout)
    assert doc["not_portable"] == [  # in key order
        {"kind": "modules_to_save", "name": "lm_head"},
        {"kind": "dora", "name": Q},
    ]
    assert doc["config"]["r"] == doc["config"]["lora_alpha"] == 6
    assert doc["config"]["rank_pattern"] == doc["config"]["alpha_pattern"] == {}


def test_portable_names_three_a_kind(tmp_path: Path) -> None:
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(5)]
    tensors = {k: v for m in modules for k, v in lora_tensors(m).items()}
    tensors.update({f"{P}{m}.lora_magnitude_vector": np.ones(8, dtype=np.float32) for m in modules})
    src = write_adapter(tmp_path / "src", tensors, {"use_dora": True})
    result = invoke(src, tmp_path / "out", "--portable")
    assert result.exit_code == 0, result.stderr
    shown = ", ".join(modules[:3])
    text = " ".join(result.stdout.split())  # wrapped to the width
    assert f"not portable (kept as is): dora {shown} and 2 more" in text
    doc = json.loads(invoke(src, tmp_path / "out2", "--portable", "--json").stdout)
    assert [k["name"] for k in doc["not_portable"]] == modules
