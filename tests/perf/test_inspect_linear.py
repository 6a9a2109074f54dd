"""`inspect` of very many tensors stays linear (issue 11 section 2): counted, never timed.

Each tensor is classified once per report (not again for the table), `--check` reads
neighbouring small tensors together (a constant number of reads for hundreds of tiny tensors),
and the JSON document, written in pieces, is byte for byte the one `json.dumps` gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli import jsonstream, output
from adapterctl.cli.main import app
from adapterctl.format.tensors import SafetensorsReader
from adapterctl.ops import checks
from adapterctl.ops.inspect import inspect_adapter
from tests.helpers import P, write_adapter

runner = CliRunner()


def _many(directory: Path, n_modules: int) -> Path:
    tensors: dict[str, Any] = {}
    for i in range(n_modules):
        module = f"model.layers.{i // 3}.mlp.{('gate', 'up', 'down')[i % 3]}_proj"
        tensors[f"{P}{module}.lora_A.weight"] = np.full((1, 2), i, np.float32)
        tensors[f"{P}{module}.lora_B.weight"] = np.full((2, 1), -i, np.float32)
    config = {"r": 1, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
    return write_adapter(directory, tensors, config)


@pytest.mark.parametrize("args", [[], ["--json"], ["--check"], ["--tensors"]])
def test_each_key_is_classified_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """The report's analysis and its table share one classification per tensor."""
    src = _many(tmp_path / "a", 300)  # 600 tensors: the one-row-per-module table
    calls = 0
    real = checks.classify

    def counting(*a: Any, **k: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*a, **k)

    monkeypatch.setattr(checks, "classify", counting)
    result = runner.invoke(app, ["inspect", str(src), *args], prog_name="adapterctl")
    assert result.exit_code == 0, result.output
    assert calls == 600


def test_check_reads_neighbouring_tensors_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads made by the NaN/Inf scan: the same few for 300 and 600 tiny tensors (not one per
    tensor), and every float tensor still has its own counts."""
    reads = []
    for n in (150, 300):
        src = _many(tmp_path / str(n), n)
        count = 0
        real = SafetensorsReader.read_span

        def counting(self: SafetensorsReader, *a: Any, _real: Any = real) -> bytes:
            nonlocal count
            count += 1
            return _real(self, *a)  # type: ignore[no-any-return]

        monkeypatch.setattr(SafetensorsReader, "read_span", counting)
        report = inspect_adapter(src, scan=True).adapters[0]
        monkeypatch.undo()
        assert len(report.tensors) == 2 * n
        assert all(t.nonfinite is not None and t.nonfinite.total == 0 for t in report.tensors)
        reads.append(count)
    assert reads[0] == reads[1] == 1


def test_check_finds_the_one_tensor_with_a_nan_among_many(tmp_path: Path) -> None:
    src = _many(tmp_path / "a", 200)
    path = src / "adapter_model.safetensors"
    with SafetensorsReader(path) as reader:
        t = reader.tensors[f"{P}model.layers.20.mlp.up_proj.lora_B.weight"]
        where = reader.header.data_start + t.start + 4  # its second value
    blob = bytearray(path.read_bytes())
    blob[where : where + 4] = np.array([np.nan], np.float32).tobytes()
    path.write_bytes(bytes(blob))
    report = inspect_adapter(src, scan=True).adapters[0]
    found = {x.name: x.nonfinite.nan for x in report.tensors if x.nonfinite and x.nonfinite.total}
    assert found == {t.name: 1}


_DOCS: list[Any] = [
    {},
    [],
    {"a": [], "b": {}, "c": None},
    {
        "schema_version": 1,
        "adapters": [
            {
                "tensors": [{"name": "x\u202e\n", "shape": [1, 2]}] * 9,
                "modules": [],
                "config": {"r": 1, "t": [1, [2, {"z": []}]], "f": float("nan")},
            },
            {},
        ],
        "s": "é",
    },
    {"k": (1, 2, 3), 1: 2},
    [[[[[1]]]]],
    {"a": {"b": {"c": {"d": [1, 2, {"e": 3}]}}}},
    {"long": [[1, {"a": [2, 3]}]] * 150, "ints": list(range(70))},
]


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("ascii_only", [False, True])
@pytest.mark.parametrize("doc", _DOCS)
def test_json_in_pieces_is_the_whole_document(
    monkeypatch: pytest.MonkeyPatch, doc: Any, indent: int | None, ascii_only: bool
) -> None:
    monkeypatch.setattr(jsonstream, "CHUNK", 4)  # many chunk boundaries

    def encode(value: Any) -> str:
        return output.json_text(value, indent, ascii_only=ascii_only)

    assert "".join(jsonstream.json_pieces(doc, indent, encode)) == encode(doc)


@pytest.mark.parametrize("indent", [None, 2])
def test_json_generators_are_arrays(monkeypatch: pytest.MonkeyPatch, indent: int | None) -> None:
    monkeypatch.setattr(jsonstream, "CHUNK", 3)
    items = [{"name": f"t{i}", "shape": [i, 1]} for i in range(10)]
    doc = {"adapters": [{"tensors": (x for x in items), "none": (x for x in [])}]}
    want = {"adapters": [{"tensors": items, "none": []}]}
    got = "".join(jsonstream.json_pieces(doc, indent, lambda v: json.dumps(v, indent=indent)))
    assert got == json.dumps(want, indent=indent)


def test_inspect_json_is_the_report(tmp_path: Path) -> None:
    """What `inspect --json` writes (lazily made tensors) is the report's whole dict."""
    src = _many(tmp_path / "a", 300)
    result = runner.invoke(app, ["inspect", str(src), "--json"], prog_name="adapterctl")
    assert result.exit_code == 0, result.output
    assert result.stdout == output.json_text(inspect_adapter(src).to_dict()) + "\n"


@pytest.mark.parametrize("code", ["F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"])
def test_the_numpy_free_precheck_misses_no_nan_or_inf(code: str) -> None:
    """may_hold_nonfinite (what lets `--check` skip numpy) is False only where there is none."""
    from adapterctl.format.nonfinite import count_nonfinite, may_hold_nonfinite

    width = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}.get(code, 1)
    rng = np.random.default_rng(1)
    blob = rng.integers(0, 256, 4096 * width, dtype=np.uint8).tobytes()
    flagged = 0
    for i in range(0, len(blob), width):
        value = blob[i : i + width]
        special = count_nonfinite(value, code).total
        assert may_hold_nonfinite(value, code) or not special
        flagged += special
    assert flagged  # the random bits hold some NaN or Inf: the check above is not vacuous
    finite = np.arange(1000, dtype=np.float64).astype({"F16": np.float16, "F32": np.float32,
        "F64": np.float64}.get(code, np.float32)).tobytes()  # fmt: skip
    if code in ("F16", "F32", "F64"):
        assert not may_hold_nonfinite(finite, code)
