"""The CLI shell: exit codes, stdout/stderr split, JSON documents and errors, human output golden."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterctl import __version__
from adapterctl.cli.main import app
from tests.conftest import GOLDEN
from tests.helpers import P, V, lora_tensors, write_adapter

runner = CliRunner()


def invoke(*args: str | Path, **kwargs: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl", **kwargs)


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    tensors = {**lora_tensors(), **lora_tensors(V, r=2, d_out=4)}
    config = {
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"v_proj": 4},
        "task_type": "CAUSAL_LM",
    }
    return write_adapter(tmp_path / "adapter", tensors, config)


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"adapterctl {__version__}\n"


def test_no_args_shows_help() -> None:
    result = invoke()
    assert result.exit_code == 2
    assert "inspect" in result.stdout + result.stderr


def test_inspect_json_document(adapter: Path) -> None:
    result = invoke("inspect", adapter, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["source"] == str(adapter)
    (a,) = doc["adapters"]
    assert set(a) == {
        "name", "path", "format", "config", "tensors", "modules",
        "num_parameters", "total_bytes", "problems",
    }  # fmt: skip
    assert a["config"] == json.loads((adapter / "adapter_config.json").read_text())
    assert [t["name"] for t in a["tensors"]] == sorted(t["name"] for t in a["tensors"])
    assert a["tensors"][0] == {
        "name": f"{P}model.layers.0.self_attn.q_proj.lora_A.weight",
        "shape": [4, 8],
        "dtype": "float32",
        "nbytes": 128,
    }
    assert a["modules"] == [
        {"path": "model.layers.0.self_attn.q_proj", "kinds": ["lora_A", "lora_B"], "r": 4, "alpha": 8, "scaling": 2.0},
        {"path": "model.layers.0.self_attn.v_proj", "kinds": ["lora_A", "lora_B"], "r": 2, "alpha": 4, "scaling": 2.0},
    ]  # fmt: skip
    assert a["num_parameters"] == 4 * 8 + 8 * 4 + 2 * 8 + 4 * 2
    assert a["total_bytes"] == 4 * a["num_parameters"]
    assert a["problems"] == []


def test_inspect_human_output_golden(adapter: Path, update_golden: bool) -> None:
    result = invoke("inspect", adapter, env={"NO_COLOR": "1", "COLUMNS": "100"})
    assert result.exit_code == 0
    text = result.stdout.replace(str(adapter), "<ADAPTER>")
    golden = GOLDEN / "inspect_human.txt"
    if update_golden:
        golden.write_text(text)
    assert text == golden.read_text()
    assert "\x1b[" not in result.stdout


def test_check_exits_1_after_the_full_report(adapter: Path) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 16
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    plain = invoke("inspect", adapter)
    assert plain.exit_code == 0
    checked = invoke("inspect", adapter, "--check")
    assert checked.exit_code == 1
    assert "error: `model.layers.0.self_attn.q_proj`: the config gives rank 16" in checked.stdout
    as_json = invoke("inspect", adapter, "--check", "--json")
    assert as_json.exit_code == 1
    doc = json.loads(as_json.stdout)
    assert doc["adapters"][0]["problems"][0]["severity"] == "error"
    assert json.loads(as_json.stderr)["error"]["type"] == "CheckFailed"
    assert checked.stderr.startswith(f"error: `{adapter}` fails the check: `model.layers.0")


def test_failure_is_one_error_line_and_a_hint(tmp_path: Path) -> None:
    result = invoke("inspect", tmp_path / "missing")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: `{tmp_path / 'missing'}` does not exist\n"
        f"hint: `{tmp_path}` exists; check the rest of the path\n"
    )
    (tmp_path / "out").mkdir()
    src = write_adapter(tmp_path / "src")
    result = invoke("select", src, tmp_path / "out", "--adapter", "default")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines == [
        f"error: output `{tmp_path / 'out'}` already exists",
        "hint: pass --force to replace it",
    ]


def test_json_error_is_one_line_on_stderr(tmp_path: Path) -> None:
    result = invoke("inspect", tmp_path / "missing", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert json.loads(line) == {
        "error": {
            "type": "AdapterNotFoundError",
            "message": f"`{tmp_path / 'missing'}` does not exist",
            "hint": f"`{tmp_path}` exists; check the rest of the path",
        }
    }


def test_usage_error_exits_2() -> None:
    result = invoke("inspect", "--bogus")
    assert result.exit_code == 2
    result = invoke("select", "a", "b")  # --adapter is required
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "a", "b", "--rank", "x"], "'x' is not an integer"),
        (["convert", "a", "b", "--energy", "most"], "'most' is not a number"),
        (["save", "a", "b", "--r", "0", "--target", "q"], "greater than or equal to 1"),
    ],
)
def test_parameter_types_and_bounds_exit_2(args: list[str], message: str) -> None:
    """Plain parameters skip Typer's pydantic coercion; bounds (`min=`) still go through it."""
    result = runner.invoke(app, args, prog_name="adapterctl")
    assert result.exit_code == 2
    assert message in result.stderr


def test_internal_error_exits_3_with_a_hint(adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapterctl.ops.inspect as mod

    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(mod, "inspect_adapter", boom)
    result = invoke("inspect", adapter)
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [
        "error: internal error: ZeroDivisionError: a bug",
        "hint: rerun with ADAPTERCTL_DEBUG=1 to see the traceback, and report it",
    ]
    assert "Traceback" not in result.stdout + result.stderr
    debug = invoke("inspect", adapter, env={"ADAPTERCTL_DEBUG": "1"})
    assert isinstance(debug.exception, ZeroDivisionError)


def test_out_of_memory_exits_1(adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapterctl.ops.inspect as mod

    def exhausted(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(mod, "inspect_adapter", exhausted)
    result = invoke("inspect", adapter)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: out of memory"
    assert lines[1].startswith("hint: ")
    assert len(lines) == 2


def test_interrupt_exits_130(adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapterctl.ops.inspect as mod

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "inspect_adapter", interrupted)
    result = invoke("inspect", adapter)
    assert result.exit_code == 130
    assert result.stderr == "error: interrupted\n"


def test_select_json_and_human(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    write_adapter(src / "other")
    result = invoke(
        "select", src, tmp_path / "o1", "-a", "other", "--rename", "other=default", "--json"
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["adapters"][0]["name"] == "default"
    assert doc["adapters"][0]["source_name"] == "other"
    assert doc["adapters"][0]["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    result = invoke("select", src, tmp_path / "o2", "-a", "other")
    assert result.exit_code == 0
    assert re.fullmatch(r"✓ other -> .*o2/other \(\d+(\.\d)? (B|KiB)\)\n", result.stdout)


def test_select_bad_rename_is_a_usage_error_not_a_crash(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    result = invoke("select", src, tmp_path / "o", "-a", "default", "--rename", "nonsense")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid rename 'nonsense'")


def test_push_base_model_is_a_hub_id_whatever_lies_in_the_cwd(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--base-model gpt2` names the Hub's gpt2 even when a folder `gpt2` lies in the current
    directory (it is said to be a Hub id; only the config's name is taken for a local path)."""
    (tmp_path / "gpt2").mkdir()
    monkeypatch.chdir(tmp_path)
    result = invoke("push", adapter, "alice/x", "--base-model", "gpt2", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    card = json.loads(result.stdout)["card"]
    assert "base_model: gpt2" in card
    assert "base_model:adapter:gpt2" in card


def test_debug_keeps_the_cause_of_an_error(tmp_path: Path) -> None:
    """The user sees one `error:` line; ADAPTERCTL_DEBUG=1 raises it with its cause chained."""
    bad = write_adapter(tmp_path / "bad", lora_tensors(), {})
    (bad / "adapter_config.json").write_text("{not json")
    result = invoke("inspect", bad)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    debug = invoke("inspect", bad, env={"ADAPTERCTL_DEBUG": "1"})
    assert isinstance(debug.exception.__cause__, ValueError)


def test_no_translated_error_drops_its_cause() -> None:
    """`raise X from None` hides the OS/library cause from ADAPTERCTL_DEBUG=1: chain with `from e`."""
    import ast

    package = Path(__file__).parents[2] / "adapterctl"
    dropped = [
        f"{path.relative_to(package.parent)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Raise)
        and isinstance(node.cause, ast.Constant)
        and node.cause.value is None
    ]
    assert dropped == []


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("adapterctl save B O --dtype ", ["auto", "float32", "bfloat16", "float16"]),
        ("adapterctl save B O --device c", ["cpu", "cuda"]),
        ("adapterctl save B O --init p", ["pissa", "pissa_niter_4"]),
        ("adapterctl save B O --bias ", ["none", "all", "lora_only"]),
        ("adapterctl save B O --save-embedding-layers ", ["auto", "true", "false"]),
        ("adapterctl save B O --task-type S", ["SEQ_CLS", "SEQ_2_SEQ_LM"]),
        ("adapterctl load B A --model-class causal", ["causal-lm"]),
        ("adapterctl load B A --device-map ", ["auto"]),
        ("adapterctl convert S O --dtype ", ["float32", "bfloat16", "float16"]),
        ("adapterctl convert S O --init ", ["pissa", "olora"]),
        ("adapterctl convert S O --peft-version 0.2", ["0.20", "0.21"]),
        ("adapterctl inspect S --engine l", ["lorax", "llama.cpp"]),
        ("adapterctl inspect S --engine peft@0.1", [f"peft@0.{n}" for n in range(10, 20)]),
        ("adapterctl merge B A O --dtype ", ["auto", "float32", "bfloat16", "float16"]),
    ],
)
def test_choice_values_complete_in_the_shell(words: str, expected: list[str]) -> None:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_ADAPTERCTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = invoke(env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == expected
