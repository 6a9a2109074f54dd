"""What a new user hits first (issue 11, section 6): mistyped local paths never go to the Hub,
bad command lines are usage errors (exit 2, JSON under --json), `-h`, and a model passed where an
adapter belongs is one error line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from adapterctl.errors import AdapterNotFoundError
from adapterctl.ops.hub import hub_or_local, is_local_path, is_repo_id
from tests.helpers import write_adapter, write_tensors

runner = CliRunner()
COMMANDS = ["inspect", "select", "convert", "load", "save", "push"]


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl")


def not_sent(stderr: str) -> bool:
    """No sign of a Hub request: not the offline cache, not the connection."""
    return all(w not in stderr for w in ("HF_HUB_OFFLINE", "cache", "connection", "hf://"))


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with a `checkpoint` folder (holding one adapter) in it."""
    write_adapter(tmp_path / "checkpoint" / "good")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- local paths and Hub ids: one rule -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "local"),
    [
        ("./checkpoint/mth", True),  # starts with ./
        ("../elsewhere", True),
        ("/abs/path", True),
        ("~/adapters/x", True),
        ("a/b/c", True),  # more than one /
        ("checkpoint/mth", True),  # its first part exists here
        ("model.safetensors", True),  # a file name
        ("owner/name", False),
        ("gpt2", False),
    ],
)
def test_what_is_a_local_path(cwd: Path, text: str, local: bool) -> None:
    assert is_local_path(text) is local
    assert is_repo_id(text, bare=True) is (not local)


def test_a_missing_local_path_is_an_error_naming_it(cwd: Path) -> None:
    for text in ("./checkpoint/mth", "checkpoint/mth", "a/b/c", "../nowhere", "~nobody/x"):
        with pytest.raises(AdapterNotFoundError, match="does not exist") as e:
            hub_or_local(text)
        assert f"`{text}`" in e.value.message
    assert hub_or_local("owner/name") == "owner/name"
    assert hub_or_local("gpt2", bare=True) == "gpt2"
    assert hub_or_local("checkpoint/good") == Path("checkpoint/good")
    with pytest.raises(AdapterNotFoundError):  # a bare name is a Hub id for bases only
        hub_or_local("gpt2")


def test_the_issue_case_returns_at_once_with_a_local_path_error(cwd: Path) -> None:
    start = time.perf_counter()
    result = invoke("inspect", "./checkpoint/mth")
    took = time.perf_counter() - start
    assert result.exit_code == 1
    assert took < 1.0
    lines = result.stderr.splitlines()
    assert lines[0] == "error: `./checkpoint/mth` does not exist"
    assert lines[1:] == ["hint: `checkpoint` exists; check the rest of the path"]
    assert not_sent(result.stderr)


def test_no_network_is_tried_even_online(cwd: Path) -> None:
    """Online, against an endpoint that never answers: a Hub request would hang on connect."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env["HF_ENDPOINT"] = "http://10.255.255.1"  # unroutable: a connection attempt would hang
    code = (
        "import sys; from adapterctl.cli.main import main; sys.argv[1:] = "
        "['inspect', './checkpoint/mth']; main()"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert time.perf_counter() - start < 5.0
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: `./checkpoint/mth` does not exist\n")


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["inspect", "checkpoint/mth"], "checkpoint/mth"),
        (["inspect", "a/b/c", "--json"], "a/b/c"),
        (["select", "./checkpoint/mth", "out", "-a", "default"], "./checkpoint/mth"),
        (["convert", "./checkpoint/mth", "out", "--dtype", "bfloat16"], "./checkpoint/mth"),
        (["convert", "checkpoint/good", "out", "--initial", "./init", "--dtype", "F16"], "./init"),
        (["convert", "checkpoint/good", "out", "--base", "./nobase"], "./nobase"),
        (["load", "./nobase", "checkpoint/good"], "./nobase"),
        (["load", "nobase/x/y", "checkpoint/good"], "nobase/x/y"),
        (["load", "./base", "./checkpoint/mth"], "./checkpoint/mth"),
        (["save", "./nobase", "out", "--r", "2", "--target", "q_proj"], "./nobase"),
        (["push", "./checkpoint/mth", "owner/name", "--dry-run"], "./checkpoint/mth"),
    ],
)
def test_every_command_says_a_mistyped_local_path_does_not_exist(
    cwd: Path, args: list[str], missing: str
) -> None:
    args = [a if a != "F16" else "float16" for a in args]
    result = invoke(*args)
    assert result.exit_code == 1, result.stderr
    if "--json" in args:
        message = json.loads(result.stderr)["error"]["message"]
    else:
        message = result.stderr.splitlines()[0].removeprefix("error: ")
    assert message.startswith(f"`{missing}` does not exist"), result.stderr
    assert not_sent(result.stderr)
    assert not (cwd / "out").exists()


def test_the_library_resolvers_share_the_rule(cwd: Path) -> None:
    from adapterctl.ops.hub import resolve

    for kind in ("adapter", "adapters", "base"):
        with pytest.raises(AdapterNotFoundError, match=r"^`\./checkpoint/mth` does not exist$"):
            resolve("./checkpoint/mth", kind=kind)
    with pytest.raises(AdapterNotFoundError, match="an adapter on the Hub is named OWNER/NAME"):
        resolve("nothing-here", kind="adapter")
    with pytest.raises(AdapterNotFoundError, match="not a valid Hub repo id"):
        resolve("no--such", kind="base")


def test_the_resolver_takes_everything_after_the_source_by_keyword(cwd: Path) -> None:
    """`revision` and `subfolder` are both `str | None`: passed by position, a swap would pass
    every type check, so nothing but the source is positional."""
    import inspect

    from adapterctl.ops.hub import download_adapter, download_base, hub_errors, label, resolve

    for fn in (resolve, download_adapter, download_base, label, hub_errors):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, fn.__name__
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), fn.__name__
    with pytest.raises(TypeError):
        resolve("owner/name", "adapter", "main")  # type: ignore[misc]


def test_a_valid_hub_id_still_goes_to_the_hub(cwd: Path) -> None:
    result = invoke("inspect", "owner/name")
    assert result.exit_code == 1
    assert "not in the local cache and HF_HUB_OFFLINE is set" in result.stderr


# --- usage errors --------------------------------------------------------------------------


USAGE = [
    ["convert", "checkpoint/good", "out", "--rank", "2", "--energy", "0.5"],
    ["convert", "checkpoint/good", "out", "--rank", "0"],
    ["convert", "checkpoint/good", "out", "--rank", "-3"],
    ["convert", "checkpoint/good", "out", "--energy", "-0.5"],
    ["convert", "checkpoint/good", "out", "--energy", "1.5"],
    ["convert", "checkpoint/good", "out", "--dtype", "int8"],
    ["convert", "checkpoint/good", "out", "--init", "pissa"],
    ["convert", "checkpoint/good", "out", "--initial", "checkpoint/good", "--base", "checkpoint"],
    ["convert", "checkpoint/good", "out", "--rank", "two"],
    ["select", "checkpoint", "out", "-a", "good", "--rename", "nonsense"],
    ["select", "checkpoint", "out"],
    ["inspect", "--bogus", "checkpoint/good"],
    ["inspect"],
    ["load", "base", "checkpoint/good", "--max-new-tokens", "5"],
    ["load", "base", "checkpoint/good", "--compare-base"],
    ["load", "base", "checkpoint/good", "--force"],
    ["load", "base", "checkpoint/good", "--prompt", "hi", "--max-new-tokens", "0"],
    ["load", "base", "checkpoint/good", "--device", "gpu0"],
    ["load", "base", "checkpoint/good", "--dtype", "float64"],
    ["load", "base", "checkpoint/good", "--model-class", "nonsense"],
    ["load", "base", "checkpoint/good", "--device", "cpu", "--device-map", "auto"],
    ["save", "base", "out", "--r", "0", "--target", "q_proj"],
    ["save", "base", "out", "--r", "2", "--target", "q_proj", "--dropout", "2"],
    ["save", "base", "out", "--r", "2", "--target", "q_proj", "--layers", "-1"],
    ["save", "base", "out", "--r", "2", "--target", "q_proj", "--residual-out", "res"],
    ["save", "base", "out", "--r", "2", "--target", "q_proj", "--init", "pissa"],
    ["save", "base", "out", "--r", "2", "--target", "q_proj", "--dtype", "float64"],
    ["save", "base", "out", "--r", "2", "--target", "q_proj", "--rank-pattern", "q_proj=0"],
    ["push", "checkpoint/good"],
    ["push", "checkpoint/good", "bad id!", "--dry-run"],
    ["push", "checkpoint/good", "alice/x", "--dry-run", "--base-model", "not a repo!"],
    ["select", "checkpoint", "out", "-a", "good", "-a", "good"],
    ["select", "checkpoint", "out", "-a", "good", "--rename", "other=x"],
    ["select", "checkpoint", "out", "-a", "good", "--rename", "good=../x"],
    ["select", "checkpoint", "out", "-a", "good", "--rename", "good=.hidden"],
    ["load", "base", "checkpoint/good", "--adapter-name", ""],
    ["load", "base", "checkpoint/good", "--adapter-name", "a/b"],
    ["save", "base", "out", "--r", "2", "--target", "q_proj", "--adapter-name", "../x"],
    # --revision picks a Hub repo's branch: with a local path it would do nothing
    ["inspect", "checkpoint/good", "--revision", "main"],
    ["select", "checkpoint", "out", "-a", "good", "--revision", "v1"],
    ["convert", "checkpoint/good", "out", "--dtype", "float16", "--revision", "main"],
    ["load", "base", "checkpoint/good", "--revision", "main"],
]


@pytest.mark.parametrize("args", USAGE, ids=lambda a: " ".join(a))
def test_bad_command_lines_are_usage_errors(cwd: Path, args: list[str]) -> None:
    (cwd / "base").mkdir()
    result = invoke(*args)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    as_json = invoke(*args, "--json")
    assert as_json.exit_code == 2, as_json.stderr
    assert as_json.stdout == ""
    (line,) = as_json.stderr.splitlines()  # one JSON document, nothing else
    error = json.loads(line)["error"]
    assert set(error) == {"type", "message", "hint"}
    assert error["message"]
    assert not (cwd / "out").exists()


def test_options_that_need_another_say_so(cwd: Path) -> None:
    result = invoke("load", "base", "checkpoint/good", "--max-new-tokens", "5")
    assert result.stderr == "error: --max-new-tokens does nothing without --prompt\n"
    result = invoke("load", "base", "checkpoint/good", "--force")
    assert result.stderr == "error: --force does nothing without --merge-to\n"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help(command: str | None) -> None:
    args = [command] if command else []
    short, long = invoke(*args, "-h"), invoke(*args, "--help")
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout
    assert short.stdout.startswith("Usage: adapterctl")


def test_load_force_is_described_with_merge_to() -> None:
    text = " ".join(invoke("load", "--help").stdout.split())
    assert "Replace OUTPUT" not in text
    assert "--force With --merge-to: replace DIR" in text


# --- a model is not an adapter ---------------------------------------------------------------


def _model_dir(path: Path, *, sharded: bool = False) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tensors = {
        f"model.layers.{i}.self_attn.{p}.weight": np.zeros((4, 4), np.float32)
        for i in range(3)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    name = "model-00001-of-00001.safetensors" if sharded else "model.safetensors"
    write_tensors(path / name, tensors)
    if sharded:
        index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, name)}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("what", ["directory", "sharded", "file"])
def test_a_model_is_one_error_line(tmp_path: Path, what: str) -> None:
    model = _model_dir(tmp_path / "model", sharded=what == "sharded")
    source = model / "model.safetensors" if what == "file" else model
    for extra in ([], ["--check"]):
        result = invoke("inspect", source, *extra)
        assert result.exit_code == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 2, result.stderr
        assert lines[0] == (
            f"error: `{source}` is a model, not an adapter"
            + (" (12 tensors, none of them an adapter's)" if what == "file" else "")
            + (
                " (config.json and model.safetensors.index.json)"
                if what == "sharded"
                else " (config.json and model.safetensors)"
                if what == "directory"
                else ""
            )
        )
        assert lines[1].startswith("hint: use ")
        assert "as BASE" in lines[1]
    result = invoke("convert", source, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 1
    assert "is a model, not an adapter" in result.stderr
