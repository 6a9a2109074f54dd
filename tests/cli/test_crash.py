"""Crash-safe writes, with real processes held mid-write by the test-owned wrapper
(tests/held_writer.py): SIGKILL leaves the old output whole (or none) and a stale temp
sibling the next run removes; SIGINT/SIGTERM clean up; two held writers: exactly one wins."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import held_writer
from tests.helpers import Q, V, lora_tensors, write_adapter

ROOT = Path(__file__).resolve().parents[2]
BIG = {"r": 64, "target_modules": ["q_proj", "v_proj"]}
PAUSE_AT = 1_500_000  # bytes: inside the 4 MiB weights file


@pytest.fixture
def src(tmp_path: Path) -> Path:
    tensors = {**lora_tensors(Q, 64, 4096, 4096), **lora_tensors(V, 64, 4096, 4096)}
    return write_adapter(tmp_path / "src", tensors, BIG)


COMMANDS = {
    "select": lambda s, o: ["select", s, o, "-a", "default"],
    "convert": lambda s, o: ["convert", s, o, "--dtype", "bfloat16"],
}


def start(
    args: list[str], tmp_path: Path, name: str, until: Path | None = None
) -> subprocess.Popen[str]:
    argv = held_writer.command(args, marker=tmp_path / name, after=PAUSE_AT, until=until)
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(*markers: Path, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 60
    while not all(m.exists() for m in markers):
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the write never reached the pause"
        time.sleep(0.02)


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def temps(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.adapterctl-"))


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterctl", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("replace", [False, True], ids=["fresh", "replace"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_mid_write(command: str, replace: bool, src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(a) for a in COMMANDS[command](src, out)]
    old = None
    if replace:
        first = run([*args[:-2], "--dtype", "float16"] if command == "convert" else args)
        assert first.returncode == 0, first.stderr
        old = digest(out)
    proc = start([*args, "--force"] if replace else args, tmp_path, "paused")
    try:
        wait_for(tmp_path / "paused", procs=[proc])
        assert temps(tmp_path), "no temp sibling mid-write"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    # the destination is the old complete version, or absent; the dead writer's temp remains
    assert (digest(out) if out.exists() else None) == old
    assert temps(tmp_path)
    again = run([*args, "--force"] if replace else args)
    assert again.returncode == 0, again.stderr
    assert temps(tmp_path) == []  # the next run removed the stale sibling
    check = run(["inspect", str(out), "--check"])
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_signals_mid_write_clean_up(command: str, sig: str, src: Path, tmp_path: Path) -> None:
    proc = start([str(a) for a in COMMANDS[command](src, tmp_path / "out")], tmp_path, "paused")
    try:
        wait_for(tmp_path / "paused", procs=[proc])
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "error: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused", "src"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_two_held_writers_one_wins(command: str, src: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    args = [str(a) for a in COMMANDS[command](src, tmp_path / "out")]
    procs = [start(args, tmp_path, f"held{i}", until=go) for i in range(2)]
    try:
        wait_for(tmp_path / "held0", tmp_path / "held1", procs=procs)
        go.touch()
        results = [(p.wait(timeout=60), *p.communicate(timeout=60)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    assert loser[2].startswith("error: "), loser
    assert "already exists" in loser[2], loser
    assert temps(tmp_path) == []
    assert run(["inspect", str(tmp_path / "out"), "--check"]).returncode == 0
