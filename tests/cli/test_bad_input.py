"""Bad input: exit 1, one error line naming the file and the problem, nothing written, no traceback."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import raw_safetensors, write_adapter

runner = CliRunner()
F32_4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


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


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch pwned",))


def _evil_bin(d: Path) -> Path:
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    return d / "adapter_model.bin"


def _good() -> bytes:
    return raw_safetensors({"base_model.model.m.lora_A.weight": F32_4}, b"\0" * 16)


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
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
        _weights(raw_safetensors({"t": {**F32_4, "data_offsets": [0, 32]}}, b"\0" * 16)),
        "needs 16",
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


@pytest.mark.parametrize("command", ["inspect", "select"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, case: str
) -> None:
    monkeypatch.chdir(tmp_path)
    make, problem = CASES[case]
    src = write_adapter(tmp_path / "src")
    culprit = make(src)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = (
        ["inspect", str(src)]
        if command == "inspect"
        else ["select", str(src), str(tmp_path / "out"), "-a", "default"]
    )
    result = runner.invoke(app, args, prog_name="adapterctl")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ")
    assert len(lines) <= 2
    assert all(line.startswith("hint: ") for line in lines[1:])
    assert str(culprit) in lines[0]
    assert problem in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left
    assert not (tmp_path / "pwned").exists()


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
