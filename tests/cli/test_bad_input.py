"""The bad-input corpus: every case made here by code (no opaque blobs), run through every command
that reads adapters where it applies (CASES' `commands`). Each must exit 1 with one `error:` line
(and at most one `hint:`) naming the file and the problem: never a traceback, exit 3, code
execution, or anything written. The torch-free commands (inspect, select, convert, merge) run in
subprocesses (merge too: it is torch-free for a safetensors base), load and push in-process through Typer's CliRunner."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import Q, lora_tensors, raw_safetensors, write_adapter

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
F32_4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
READERS = ("inspect", "select", "convert", "load", "push", "merge", "combine")


def _weights(data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / "adapter_model.safetensors").write_bytes(data)
        return d / "adapter_model.safetensors"

    return make


def _config(text: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / "adapter_config.json").write_text(text)
        return d / "adapter_config.json"

    return make


def _no_config(d: Path) -> Path:
    (d / "adapter_config.json").unlink()
    return d


PWNED = "pwned"  # what the code-running pickle would create, beside the adapter's folder
CANARY = "adapterctl_canary"  # a module beside it whose import would leave CANARY.py.imported


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch '{self.target}'",))


def _evil_pickle(d: Path) -> bytes:
    return pickle.dumps({"x": _Evil(d.parent / PWNED)})


def _importing_pickle(d: Path) -> bytes:
    """A pickle whose global lives in a module of its own (on the readers' sys.path), so an
    unpickler that imported it would leave a file behind; protocol 0, written by hand."""
    (d.parent / f"{CANARY}.py").write_text(
        "open(__file__ + '.imported', 'w').close()\nclass Thing:\n    pass\n"
    )
    return f"(dp0\nVx\np1\nc{CANARY}\nThing\np2\n(tRp3\ns.".encode()


def _evil_bin(d: Path) -> Path:
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(_evil_pickle(d))
    return d / "adapter_model.bin"


def _good() -> bytes:
    return raw_safetensors({"base_model.model.m.lora_A.weight": F32_4}, b"\0" * 16)


BASIC: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated file": (_weights(_good()[:-3]), "holds 13"),
    "shorter than 8 bytes": (_weights(b"\x01\x02"), "too short"),
    "header length past the end": (
        _weights(struct.pack("<Q", 10_000) + b"{}"),
        "runs past the end",
    ),
    "header too large": (_weights(struct.pack("<Q", 200_000_000) + b"{}"), "exceeds"),
    "header not JSON": (_weights(raw_safetensors(None, raw=b"{not json")), "not valid JSON"),
    "header not UTF-8": (_weights(raw_safetensors(None, raw=b'{"\xff": 1}')), "not valid UTF-8"),
    "offsets past the end": (
        _weights(
            raw_safetensors({"a": F32_4, "b": {**F32_4, "data_offsets": [16, 32]}}, b"\0" * 16)
        ),
        "describes 32 bytes of tensor data but the file holds 16",
    ),
    "offsets longer than shape x dtype": (
        _weights(raw_safetensors({"t": {**F32_4, "data_offsets": [0, 32]}}, b"\0" * 32)),
        "spans 32 bytes but float32[2, 2] needs 16",
    ),
    "overlapping offsets": (
        _weights(raw_safetensors({"a": F32_4, "b": F32_4}, b"\0" * 16)),
        "no gap or overlap",
    ),
    "gap between tensors": (
        _weights(
            raw_safetensors({"a": F32_4, "b": {**F32_4, "data_offsets": [20, 36]}}, b"\0" * 36)
        ),
        "no gap or overlap",
    ),
    "unknown dtype": (
        _weights(raw_safetensors({"t": {**F32_4, "dtype": "F128"}}, b"\0" * 16)),
        'unknown dtype "F128"',
    ),
    "repeated key": (
        _weights(
            raw_safetensors(
                None,
                b"\0" * 16,
                raw=b'{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
                b'"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
            )
        ),
        "more than once",
    ),
    "huge claimed size": (
        _weights(
            raw_safetensors(
                {
                    "t": {
                        "dtype": "F32",
                        "shape": [25_000_000_000],
                        "data_offsets": [0, 100_000_000_000],
                    }
                }
            )
        ),
        "100000000000 bytes",
    ),
    "config missing": (_no_config, "no adapter"),
    "config not JSON": (_config("{'r': 8"), "not valid JSON"),
    "config not an object": (_config("[1, 2]"), "JSON object"),
    "config r wrong type": (
        _config('{"peft_type": "LORA", "r": "8"}'),
        "`r` must be a positive integer",
    ),
    "config r zero": (_config('{"peft_type": "LORA", "r": 0}'), "`r` must be a positive integer"),
    "config alpha wrong type": (
        _config('{"peft_type": "LORA", "lora_alpha": "x"}'),
        "`lora_alpha`",
    ),
    "config peft_type missing": (_config('{"r": 8}'), "`peft_type` is missing"),
    "config peft_type lower case": (_config('{"peft_type": "lora"}'), "`peft_type`"),
    "config bad regex": (
        _config('{"peft_type": "LORA", "target_modules": "(q"}'),
        "regular expression",
    ),
    "config bad pattern": (
        _config('{"peft_type": "LORA", "rank_pattern": {"[": 4}}'),
        "`rank_pattern` key",
    ),
    "config target_modules type": (
        _config('{"peft_type": "LORA", "target_modules": 5}'),
        "`target_modules`",
    ),
    "pickle that runs code": (_evil_bin, "not a plain tensor checkpoint"),
}


def _importing_bin(d: Path) -> Path:
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(_importing_pickle(d))
    return d / "adapter_model.bin"


def _rank(r: int, pattern: dict[str, int] | None = None) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:  # the stored lora_A has 4 rows
        cfg = {"peft_type": "LORA", "r": r, "target_modules": ["q_proj"]}
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": pattern or {}}))
        return d / "adapter_config.json"

    return make


def _empty(d: Path) -> Path:
    for p in d.iterdir():
        p.unlink()
    return d


def _same(d: Path) -> Path:
    return d


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], Path]  # breaks the adapter in the folder; returns the culprit path
    problem: str | tuple[str, ...]  # in the error line (one of them)
    commands: tuple[str, ...] = READERS
    extra: tuple[str, ...] = ()  # more arguments ({tmp} is the test's folder)
    output: str = "out"  # the OUTPUT argument ({tmp}/...), for commands that write
    names: str = "culprit"  # the line names the culprit file, the "source" folder, or this text
    exit_code: int = 1  # 2 where the culprit is an option's value (a usage error)


CASES: dict[str, Case] = {name: Case(make, problem) for name, (make, problem) in BASIC.items()}
CASES |= {
    "header length zero": Case(_weights(struct.pack("<Q", 0)), "header is not valid JSON"),
    "negative dimension": Case(
        _weights(raw_safetensors({"t": {**F32_4, "shape": [-2, -2]}}, b"\0" * 16)), "shape"
    ),
    "offsets not shape x dtype": Case(
        _weights(raw_safetensors({"t": {**F32_4, "data_offsets": [0, 12]}}, b"\0" * 12)),
        "spans 12 bytes but float32[2, 2] needs 16",
    ),
    "metadata not string to string": Case(
        _weights(raw_safetensors({"__metadata__": {"a": 1}, "t": F32_4}, b"\0" * 16)),
        "metadata",
    ),
    "config non-LoRA peft_type": Case(_config('{"peft_type": "PREFIX_TUNING"}'), "`peft_type`"),
    "config r disagrees with lora_A": Case(
        _rank(8),
        ("rank 8", "expects [8, 8]"),
        ("inspect", "convert", "load", "push", "merge"),
        names="source",
    ),
    "rank_pattern disagrees with lora_A": Case(
        _rank(4, {"q_proj": 6}),
        ("rank 6", "expects [6, 8]"),
        ("inspect", "convert", "load", "push", "merge"),
        names="source",
    ),
    "pickle that imports a module": Case(_importing_bin, "not a plain tensor checkpoint"),
    "empty directory": Case(_empty, "no adapter"),
    "adapter name with ..": Case(
        _same,
        "invalid adapter name",
        ("select",),
        ("--rename", "default=.."),
        names="'..'",
        exit_code=2,
    ),
    "adapter name with a separator": Case(
        _same,
        "invalid adapter name",
        ("select",),
        ("--rename", "default=a/b"),
        names="'a/b'",
        exit_code=2,
    ),
    "adapter name an absolute path": Case(
        _same,
        "invalid adapter name",
        ("select",),
        ("--rename", "default=/etc"),
        names="'/etc'",
        exit_code=2,
    ),
    "output is a symlink": Case(
        _same,
        "is a symlink",
        ("select", "convert", "merge", "combine"),
        output="link",
        names="link",
    ),
    "mismatched PiSSA pair": Case(
        _same, "differ in `r`", ("convert",), ("--initial", "{tmp}/other-init"), names="source"
    ),
}
assert len(CASES) >= 30


def _argv(command: str, src: Path, tmp: Path, case: Case) -> list[str]:
    out = str(tmp / case.output)
    extra = [a.format(tmp=tmp) for a in case.extra]
    return {
        "inspect": ["inspect", str(src), "--check"],
        "select": ["select", str(src), out, "-a", "default"],
        "convert": ["convert", str(src), out, "--dtype", "bfloat16"],
        "load": ["load", str(tmp / "base"), str(src), "--device", "cpu"],
        "push": ["push", str(src), "alice/x", "--base-model", "org/m", "--dry-run"],
        "merge": ["merge", str(tmp / "base"), str(src), out],
        "combine": ["combine", str(src), out, "--weights", "1", "--method", "cat"],
    }[command] + extra


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures import tiny_llama

    d = tmp_path_factory.mktemp("corpus") / "base"
    tiny_llama(hidden_size=8, intermediate_size=16).save_pretrained(str(d))
    return d


@pytest.mark.parametrize(
    ("case", "command"), [(c, m) for c, case in CASES.items() for m in case.commands]
)
def test_corpus(
    case: str, command: str, tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = CASES[case]
    src = write_adapter(tmp_path / "src", lora_tensors(Q))  # q_proj of the tiny base: 8 x 8
    culprit = c.make(src)
    if case == "output is a symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    if case == "mismatched PiSSA pair":
        cfg = json.loads((src / "adapter_config.json").read_text())
        (src / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
        write_adapter(tmp_path / "other-init", lora_tensors(Q, r=2), {"r": 2})
    if command in ("load", "merge"):
        os.symlink(tiny_base, tmp_path / "base")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = _argv(command, src, tmp_path, c)
    monkeypatch.syspath_prepend(str(tmp_path))  # where the canary module lies
    if command in ("load", "push"):
        result = runner.invoke(app, argv, prog_name="adapterctl")
        code, out, err = result.exit_code, result.stdout, result.stderr
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "adapterctl", *argv], capture_output=True, text=True,
            cwd=tmp_path, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])},
        )  # fmt: skip
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code == c.exit_code, (code, out, err)
    lines = err.splitlines()
    assert lines, out
    assert lines[0].startswith("error: "), err
    assert len(lines) <= 2, err
    assert all(line.startswith("hint: ") for line in lines[1:]), err
    named = {"culprit": str(culprit), "source": str(src)}.get(c.names, c.names)
    assert named in lines[0], err
    problems = (c.problem,) if isinstance(c.problem, str) else c.problem
    assert any(p in lines[0] for p in problems), err
    assert "Traceback" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left
    assert not (tmp_path / PWNED).exists()
    assert not (tmp_path / f"{CANARY}.py.imported").exists()
    if case == "output is a symlink":
        assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize(
    ("make", "trace"),
    [(_evil_pickle, PWNED), (_importing_pickle, f"{CANARY}.py.imported")],
    ids=["code", "import"],
)
def test_the_hostile_pickles_would_fire(
    make: Callable[[Path], bytes], trace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corpus's two hostile pickles do what they claim when an ordinary unpickler reads them,
    so the corpus's "nothing happened" checks can fail."""
    (tmp_path / "src").mkdir()
    data = make(tmp_path / "src")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, CANARY, raising=False)
    pickle.loads(data)
    sys.modules.pop(CANARY, None)
    assert (tmp_path / trace).exists()


def test_output_not_writable(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    result = runner.invoke(
        app, ["select", str(src), str(tmp_path / "file" / "out"), "-a", "default"]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot write `{tmp_path / 'file' / 'out'}`")


def test_output_is_an_existing_file(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    result = runner.invoke(
        app, ["select", str(src), str(tmp_path / "file"), "-a", "default", "--force"]
    )
    assert result.exit_code == 1
    assert "is not a directory" in result.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_bin_and_safetensors_both_present_warns(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    (src / "adapter_model.bin").write_bytes(b"ignored")
    result = runner.invoke(app, ["inspect", str(src), "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["adapters"][0]["format"] == "safetensors"
    assert any("using safetensors" in p["message"] for p in doc["adapters"][0]["problems"])
