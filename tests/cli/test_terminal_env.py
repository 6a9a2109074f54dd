"""Environments (issue 11, section 5): a stdout/stderr that is not UTF-8, HF_HOME that is a file.

Each command runs in a fresh interpreter with `LANG=C` / `PYTHONIOENCODING=ascii` on an adapter
whose names hold non-ASCII text, so that our own symbols (✓ × …) and the untrusted text both meet
an encoding that cannot hold them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import P, write_adapter, write_tensors

ROOT = Path(__file__).resolve().parents[2]
NAME = "model.layers.0.self_attn.q_proj_é✓×\u202e"


def run(*args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterctl", *map(str, args)],
        capture_output=True,
        text=True,
        encoding="ascii",
        errors="strict",  # what came out must be ASCII, or this raises
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", **env},
        check=False,
        timeout=120,
    )


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    tensors = {
        f"{P}{NAME}.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        f"{P}{NAME}.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32),
    }
    src = write_adapter(tmp_path / "src", tensors, {"target_modules": ["q_proj_é✓×\u202e"]})
    (src / "README.md").write_text("# café ✓ → …\n", encoding="utf-8")
    weight = rng.standard_normal((8, 8)).astype(np.float32)
    for name, change in (("base", 0.0), ("tuned", 0.5)):  # checkpoints for extract
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
        write_tensors(tmp_path / name / "model.safetensors", {f"{NAME}.weight": weight + change})
    return src


ENCODINGS = [
    pytest.param({"PYTHONIOENCODING": "ascii"}, id="pythonioencoding-ascii"),
    pytest.param({"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0"}, id="lang-c"),
]
COMMANDS = [
    pytest.param(["inspect", "src"], id="inspect"),
    pytest.param(["inspect", "src", "--tensors"], id="inspect-tensors"),
    pytest.param(["inspect", "src", "--json"], id="inspect-json"),
    pytest.param(["select", "src", "out", "-a", "default"], id="select"),
    pytest.param(["select", "src", "out", "-a", "default", "--json"], id="select-json"),
    pytest.param(["convert", "src", "out", "--dtype", "bfloat16", "--verify"], id="convert"),
    pytest.param(["convert", "src", "out", "--rank", "2", "--json"], id="convert-json"),
    pytest.param(["push", "src", "alice/x", "--dry-run", "--base-model", "a/b"], id="push"),
    pytest.param(["combine", "src", "out", "--weights", "1", "--method", "cat"], id="combine"),
    pytest.param(
        ["combine", "src", "out", "--weights", "2", "--method", "svd", "--json"], id="combine-json"
    ),
    pytest.param(["extract", "base", "tuned", "out", "--rank", "1"], id="extract"),
    pytest.param(["extract", "base", "tuned", "out", "--rank", "1", "--json"], id="extract-json"),
    pytest.param(["--help"], id="help"),
    pytest.param(["inspect", "--help"], id="inspect-help"),
    pytest.param(["combine", "--help"], id="combine-help"),
    pytest.param(["extract", "--help"], id="extract-help"),
]
#: the commands that report the adapter's (non-ASCII) module names
NAMING = ("inspect", "convert", "combine", "extract")


@pytest.mark.parametrize("env", ENCODINGS)
@pytest.mark.parametrize("args", COMMANDS)
def test_every_command_on_an_ascii_terminal(
    adapter: Path, env: dict[str, str], args: list[str]
) -> None:
    proc = run(*args, cwd=adapter.parent, **env)
    assert proc.returncode == 0, proc.stderr
    if "--help" in args:
        return
    if "--json" in args:
        doc = json.loads(proc.stdout)  # \u escapes: the same document
        if args[0] in NAMING:
            assert NAME in json.dumps(doc, ensure_ascii=False)
    elif args[0] in NAMING:
        assert "\\xe9" in proc.stdout  # untrusted non-ASCII text escaped, not dropped
    if args[0] in ("select", "convert", "combine", "extract") and "--json" not in args:
        assert "\nok " in "\n" + proc.stdout  # the ASCII spelling of the check mark


@pytest.mark.parametrize("env", ENCODINGS)
def test_errors_and_warnings_on_an_ascii_terminal(
    adapter: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """(Under LANG=C the argument itself arrives as surrogate escapes of its UTF-8 bytes.)"""
    proc = run("inspect", "nowhere-é", cwd=tmp_path, **env)
    assert proc.returncode == 1
    line, hint = proc.stderr.splitlines()  # the error and a hint that names the rule
    assert line.startswith(
        ("error: `nowhere-\\xe9` does not exist", "error: `nowhere-\\udcc3\\udca9` does not exist")
    )
    assert hint.startswith("hint: ")
    as_json = run("inspect", "nowhere-é", "--json", cwd=tmp_path, **env)
    assert as_json.returncode == 1
    message = json.loads(as_json.stderr)["error"]["message"]
    assert message.startswith(
        ("`nowhere-é` does not exist", "`nowhere-\udcc3\udca9` does not exist")
    )


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["inspect", "alice/adapter"], id="inspect"),
        pytest.param(["inspect", "alice/adapter", "--json"], id="inspect-json"),
        pytest.param(["select", "alice/adapter", "out", "-a", "default"], id="select"),
        pytest.param(["convert", "alice/adapter", "out", "--dtype", "float16"], id="convert"),
        pytest.param(
            ["combine", "alice/adapter", "out", "--weights", "1", "--method", "cat"], id="combine"
        ),
        pytest.param(["extract", "alice/base", "alice/tuned", "out", "--rank", "1"], id="extract"),
    ],
)
@pytest.mark.parametrize("offline", ["0", "1"])
@pytest.mark.parametrize("below", [False, True], ids=["file", "below-a-file"])
def test_hf_home_that_is_a_file(tmp_path: Path, args: list[str], offline: str, below: bool) -> None:
    """HF_HOME naming a file (or a folder under one) is one error line, exit 1, never exit 3."""
    home = tmp_path / "hf-home"
    home.write_text("not a folder")
    proc = run(
        *args,
        cwd=tmp_path,
        HF_HOME=str(home / "sub" if below else home),
        HF_HUB_OFFLINE=offline,
        HF_ENDPOINT="http://127.0.0.1:9",  # nothing listens there: no network, ever
        PYTHONIOENCODING="utf-8",
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    if "--json" in args:
        (line,) = lines
        assert "HF_HOME" in json.loads(line)["error"]["message"]
    else:
        assert lines[0].startswith("error: the Hugging Face folder")
        assert "HF_HOME" in lines[0]
        assert len(lines) == 2
        assert lines[1].startswith("hint: ")


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_output_that_cannot_be_written_is_an_error(
    adapter: Path, tmp_path: Path, json_flag: list[str]
) -> None:
    """stdout is a file that may not grow past 512 bytes (RLIMIT_FSIZE, SIGXFSZ ignored): the
    report is cut short, so the command fails with one error line (never exit 0, never 3)."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "adapterctl", "inspect", str(adapter), *json_flag],
            stdout=f, stderr=subprocess.PIPE, text=True, preexec_fn=limit, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    if json_flag:
        assert json.loads(lines[-1])["error"]["type"] == "StandardOutputError"
    else:
        assert lines[0] == "error: cannot write to standard output: File too large", lines
    assert "Exception ignored" not in proc.stderr


def test_a_full_non_blocking_pipe_is_waited_for(tmp_path: Path) -> None:
    """stdout a non-blocking pipe (as some CI runners leave it) that fills up: the writer waits
    for the reader instead of failing with EAGAIN."""
    import fcntl
    import time

    tensors = {
        f"{P}model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": np.zeros((1, 1), np.float32)
        for i in range(1500)
        for ab in "AB"
    }
    src = write_adapter(tmp_path / "src", tensors)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterctl", "inspect", str(src), "--json"],
        stdout=w, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    os.close(w)
    time.sleep(1.5)  # the pipe (64 KiB) fills while nobody reads
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(data) > 1 << 17
    assert len(json.loads(data)["adapters"][0]["tensors"]) == 3000
