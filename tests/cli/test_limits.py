"""Issue 11 section 2: regexes and files from strangers. Every regex field of a config, malformed or
catastrophic, through every command that reads it: exit 1 naming the field, in bounded time (CPU
time: the regex budget is CPU time, and these machines are shared); every special file where a
card, config or token file is read: one `error:` line, never a hang; `.bin` pickles refused by
weights_only: one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import Q, V, lora_tensors, write_adapter, write_tensors

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
MALFORMED = "q_(proj["
#: backtracks for ever under `re`; the `regex` package's own guards do not help either
CATASTROPHIC = "(.*){1,32000}[bc]"
#: the issue's example: hangs `re` (>20 s); `regex` must finish it, one way or the other, at once
ISSUE_EXAMPLE = "([a-z_.0-9]+)+X"
CPU_BOUND_S = 5.0

FIELDS: dict[str, Callable[[str], dict[str, Any]]] = {
    "rank_pattern": lambda p: {"rank_pattern": {p: 4}},
    "alpha_pattern": lambda p: {"alpha_pattern": {p: 8}},
    "target_modules": lambda p: {"target_modules": p},
    "exclude_modules": lambda p: {"exclude_modules": p},
    "modules_to_save": lambda p: {"modules_to_save": [p]},
    "layers_pattern": lambda p: {"layers_pattern": p, "layers_to_transform": [0]},
}
#: the fields each file-level command matches against module names (the others it only compiles)
MATCHED_BY_FILE_COMMANDS = ("rank_pattern", "alpha_pattern")


def _adapter(directory: Path, fields: dict[str, Any]) -> Path:
    """A two-module adapter whose config holds `fields` as they are (no validation on the way)."""
    write_adapter(directory, {**lora_tensors(Q), **lora_tensors(V)})
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return directory


def _invoke(*args: str | Path) -> tuple[Any, float]:
    start = time.process_time()
    result = runner.invoke(app, [str(a) for a in args], prog_name="adapterctl")
    return result, time.process_time() - start


def _commands(src: Path, tmp: Path) -> dict[str, list[str | Path]]:
    return {
        "inspect": ["inspect", src, "--check"],
        "convert": ["convert", src, tmp / "out", "--dtype", "bfloat16"],
        "convert --rank": ["convert", src, tmp / "out2", "--rank", "2"],
        "push": ["push", src, "alice/x", "--dry-run", "--base-model", "org/base"],
    }


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", ["malformed", "catastrophic"])
def test_file_commands_bound_every_regex(field: str, kind: str, tmp_path: Path) -> None:
    pattern = MALFORMED if kind == "malformed" else CATASTROPHIC
    src = _adapter(tmp_path / "a", FIELDS[field](pattern))
    for name, argv in _commands(src, tmp_path).items():
        result, cpu = _invoke(*argv)
        assert cpu < CPU_BOUND_S, (name, cpu)
        if kind == "catastrophic" and field not in MATCHED_BY_FILE_COMMANDS:
            assert result.exit_code in (0, 1), (name, result.output)  # compiled, never matched
            continue
        assert result.exit_code == 1, (name, result.output)
        lines = result.stderr.splitlines()
        assert lines[0].startswith("error: "), (name, lines)
        assert f"`{field}`" in lines[0], (name, lines)
        assert json.dumps(pattern) in lines[0], (name, lines)
        assert "Traceback" not in result.output


def test_the_issue_example_finishes(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", {"rank_pattern": {ISSUE_EXAMPLE: 4}})
    for name, argv in _commands(src, tmp_path).items():
        result, cpu = _invoke(*argv)
        assert cpu < CPU_BOUND_S, (name, cpu)
        assert result.exit_code in (0, 1), (name, result.output)
        assert "Traceback" not in result.output


#: one of many keys that each backtrack for ~0.3 s on the name below (Q's module + 29 x)
MANY_SLOW_KEYS = "(x|xx)+y|q{}"


def test_many_catastrophic_keys_spend_one_budget(tmp_path: Path) -> None:
    """1,000 keys that each backtrack on a module name: one budget for the config, not one each
    (before: ~0.25 s per key, so minutes, then exit 0)."""
    name = "model.layers.0." + "x" * 29
    src = _adapter(
        tmp_path / "a", {"rank_pattern": {MANY_SLOW_KEYS.format(i): 4 for i in range(1000)}}
    )
    write_tensors(src / "adapter_model.safetensors", lora_tensors(name))
    for command, argv in _commands(src, tmp_path).items():
        result, cpu = _invoke(*argv)
        assert cpu < CPU_BOUND_S, (command, cpu)
        assert result.exit_code == 1, (command, result.output)
        first = result.stderr.splitlines()[0]
        assert first.startswith("error: "), (command, first)
        assert "`rank_pattern` key" in first, (command, first)
        assert "takes too long" in first, (command, first)


def test_thousands_of_plain_keys_are_indexed(tmp_path: Path) -> None:
    """8,000 plain rank_pattern keys x 8,000 modules (a 160 KB config, a 2 MB adapter): one key
    check per module, not keys x modules (before: 30 s of CPU)."""
    from adapterctl.format import patterns

    n = 8000
    tensors: dict[str, Any] = {}
    for i in range(n):
        tensors.update(lora_tensors(f"zz{i}.q_proj", r=2, d_in=2, d_out=2))
    src = _adapter(tmp_path / "a", {"r": 2, "rank_pattern": {f"zz{i}.q_proj": 2 for i in range(n)}})
    write_tensors(src / "adapter_model.safetensors", tensors)
    before = patterns.match_calls
    result, cpu = _invoke("inspect", src, "--check")
    assert result.exit_code == 0, result.output
    assert patterns.match_calls - before <= 2 * n
    assert cpu < CPU_BOUND_S, cpu


# --- load: the engine matches every regex field against the base's module names -----------------


def _llama_adapter(directory: Path, fields: dict[str, Any]) -> Path:
    from tests.helpers import lora_tensors as lt

    tensors = {**lt(Q, d_in=32, d_out=32), **lt(V, d_in=32, d_out=16)}
    write_adapter(directory, tensors, {"target_modules": ["q_proj", "v_proj"]})
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", ["malformed", "catastrophic"])
def test_load_bounds_every_regex(field: str, kind: str, llama_base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from adapterctl import AdapterModel
    from adapterctl.errors import ConfigError

    pattern = MALFORMED if kind == "malformed" else CATASTROPHIC
    fields = FIELDS[field](pattern)
    if field == "layers_pattern":
        fields["target_modules"] = ["q_proj", "v_proj"]
    src = _llama_adapter(tmp_path / "a", fields)
    result, cpu = _invoke("load", llama_base, src)
    assert cpu < CPU_BOUND_S + 5, cpu  # building the model is part of it
    assert result.exit_code == 1, result.output
    line = result.stderr.splitlines()[0]
    assert line.startswith("error: "), line
    assert f"`{field}`" in line, line
    model = AutoModelForCausalLM.from_pretrained(str(llama_base), dtype=torch.float32)
    start = time.process_time()
    with pytest.raises(ConfigError, match=f"`{field}`"):
        AdapterModel.from_pretrained(model, src)
    assert time.process_time() - start < CPU_BOUND_S


# --- special files -------------------------------------------------------------------------------


def _special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dev-urandom":
        path.symlink_to("/dev/urandom")
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink-loop":
        path.symlink_to(path.name)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(64 * 1024 * 1024)
    else:
        raise AssertionError(kind)


SPECIAL = ["fifo", "dev-zero", "dev-urandom", "directory", "symlink-loop", "huge"]


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterctl", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "0", **(env or {})},
    )  # fmt: skip


def _one_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: "), lines
    assert len([x for x in lines if x.startswith("error:")]) == 1, lines
    for word in words:
        assert word in lines[0], lines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_readme_is_one_error_line(kind: str, tmp_path: Path) -> None:
    """Decision: an error, not a warning and no card: a README.md is what the user publishes, and
    going on without it would replace their card on the Hub with a generated one."""
    src = _adapter(tmp_path / "a", {"base_model_name_or_path": "org/base"})
    _special(kind, src / "README.md")
    for argv in (
        ["push", src, "alice/x", "--dry-run"],
        ["convert", src, tmp_path / "out", "--dtype", "bfloat16"],
        ["select", src, tmp_path / "sel", "-a", "default", "--rename", "default=beta"],
    ):
        _one_error(_run(*argv), "README.md")
        assert not (tmp_path / "out").exists()
        assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_config_is_one_error_line(kind: str, tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", {})
    (src / "adapter_config.json").unlink()
    _special(kind, src / "adapter_config.json")
    result = _run("inspect", src)
    if kind == "directory":  # not a config file at all: the layout is reported instead
        assert result.returncode in (0, 1)
        assert "Traceback" not in result.stderr
        return
    _one_error(result, "adapter_config.json")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "symlink-loop"])
def test_a_special_token_file_is_one_error_line(kind: str, tmp_path: Path) -> None:
    """huggingface_hub reads HF_TOKEN_PATH itself: adapterctl checks it first (no server needed:
    the check comes before any request)."""
    src = _adapter(tmp_path / "a", {"base_model_name_or_path": "org/base"})
    _special(kind, tmp_path / "token")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= {"HF_TOKEN_PATH": str(tmp_path / "token"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    for argv in (["push", src, "alice/x"], ["inspect", "alice/x"]):
        result = subprocess.run(
            [sys.executable, "-m", "adapterctl", *map(str, argv)],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False, env=env,
        )  # fmt: skip
        _one_error(result, "token file")


# --- .bin pickles refused by weights_only ------------------------------------------------------


class _Custom:
    pass


def _bad_pickle(path: Path) -> None:
    import torch

    torch.save({"x": _Custom()}, path)  # a custom class: weights_only refuses it


def test_a_refused_adapter_pickle_is_one_line(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", {})
    (src / "adapter_model.safetensors").unlink()
    _bad_pickle(src / "adapter_model.bin")
    result = _run("inspect", src)
    _one_error(result, "adapter_model.bin")
    assert len(result.stderr.splitlines()) <= 2


@pytest.mark.slow
def test_a_refused_base_pickle_is_one_line(llama_base: Path, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    (base / "model.safetensors").unlink()
    _bad_pickle(base / "pytorch_model.bin")
    src = _llama_adapter(tmp_path / "a", {})
    result = _run("load", base, src)
    _one_error(result, "pytorch_model.bin")
    assert len(result.stderr.splitlines()) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin"])
@pytest.mark.parametrize("command", ["load", "save"])
def test_a_special_weights_file_in_a_base_is_one_error_line(
    command: str, name: str, kind: str, llama_base: Path, tmp_path: Path
) -> None:
    """Every weights file in BASE is looked at (Git LFS pointers): a FIFO there must not block."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    (base / name).unlink(missing_ok=True)
    _special(kind, base / name)
    src = _llama_adapter(tmp_path / "a", {})
    args = (
        [base, src]
        if command == "load"
        else [base, tmp_path / "out", "--r", "2", "--target", "q_proj"]
    )
    result = _run(command, *args)
    _one_error(result, name)
    assert "not a regular file" in result.stderr
