"""The CLI's fast paths never import the heavy stack.

Each test runs the CLI in a fresh interpreter and reads back, through an atexit hook, which modules
it had imported by the time it exited. No timings: only what gets imported.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.tensors import TensorSource, write_safetensors

ROOT = Path(__file__).resolve().parents[2]
# pydantic: Typer 0.29 would import it to convert every argument (0.18 s); see cli/plainparams.py
HEAVY = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "numpy", "pydantic")
MARKER = "MODULES:"

_CHILD = f"""\
import atexit, sys
atexit.register(
    lambda: sys.stderr.write({MARKER!r} + ",".join(sorted(sys.modules)) + "\\n")
)
sys.argv = ["adapterctl", *sys.argv[1:]]
from adapterctl.cli.main import main
main()
"""


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `adapterctl *args` in a fresh interpreter; return the process and its sys.modules."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
        check=False,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, f"no module list from the child; stderr:\n{proc.stderr}"
    modules = set(lines[0].removeprefix(MARKER).split(","))
    return proc, modules


def heavy_in(modules: set[str]) -> list[str]:
    """The heavy packages (top level or any submodule) among `modules`."""
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def assert_light(proc: subprocess.CompletedProcess[str], modules: set[str]) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert not heavy_in(modules), f"heavy modules imported: {heavy_in(modules)}"


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A tiny single-adapter PEFT directory, written with the project's own format layer."""
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        LoraConfig(r=4, target_modules=["q_proj"]).to_json(), encoding="utf-8"
    )
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"

    def f32(n: int, step: float) -> bytes:
        return struct.pack(f"<{n}f", *(step * i for i in range(n)))

    sources = [
        TensorSource(f"{prefix}.lora_A.weight", DTYPES["F32"], (4, 8), lambda: f32(32, 0.01)),
        TensorSource(f"{prefix}.lora_B.weight", DTYPES["F32"], (8, 4), lambda: f32(32, 0.02)),
    ]
    with open(d / "adapter_model.safetensors", "wb") as f:
        write_safetensors(f, sources)
    return d


def test_import_adapterctl_is_light() -> None:
    code = "import sys, adapterctl; print(','.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    modules = set(proc.stdout.strip().split(","))
    assert "adapterctl" in modules
    assert not heavy_in(modules), f"`import adapterctl` imports {heavy_in(modules)}"


def test_python_m_adapterctl_version() -> None:
    import adapterctl

    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["adapterctl", adapterctl.__version__]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--help"], id="help"),
        pytest.param(["--version"], id="version"),
        pytest.param(["inspect", "--help"], id="inspect-help"),
        pytest.param(["select", "--help"], id="select-help"),
        pytest.param(["merge", "--help"], id="merge-help"),
        pytest.param(["combine", "--help"], id="combine-help"),
        pytest.param(["extract", "--help"], id="extract-help"),
    ],
)
def test_help_and_version_are_light(args: list[str]) -> None:
    proc, modules = run_cli(*args)
    assert_light(proc, modules)
    assert proc.stdout.strip()


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        pytest.param("adapterctl ", "1", {"inspect", "select"}, id="commands"),
        pytest.param("adapterctl inspect --", "2", {"--json", "--check"}, id="inspect-options"),
        pytest.param("adapterctl select --", "2", {"--adapter", "--rename"}, id="select-options"),
    ],
)
def test_tab_completion_is_light(words: str, cword: str, expected: set[str]) -> None:
    proc, modules = run_cli(
        env={"_ADAPTERCTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword}
    )
    assert_light(proc, modules)
    assert expected <= set(proc.stdout.split()), proc.stdout


def test_inspect_json_is_light(adapter_dir: Path) -> None:
    proc, modules = run_cli("inspect", str(adapter_dir), "--json")
    assert_light(proc, modules)
    report = json.loads(proc.stdout)
    assert [a["name"] for a in report["adapters"]] == ["default"]
    assert "rich" not in modules, "--json output should not need rich"


def test_inspect_table_is_light(adapter_dir: Path) -> None:
    proc, modules = run_cli("inspect", str(adapter_dir))
    assert_light(proc, modules)  # rich is allowed here: it draws the table
    assert "lora_A" in proc.stdout


def test_select_is_light(adapter_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, modules = run_cli("select", str(adapter_dir), str(out), "--adapter", "default")
    assert_light(proc, modules)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").read_bytes() == (
        adapter_dir / "adapter_model.safetensors"
    ).read_bytes()


@pytest.fixture(scope="module")
def pissa(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PEFT PiSSA pair (made here, in the test process) and the original base."""
    from tests.fixtures import residual_pair, tiny_llama

    root = tmp_path_factory.mktemp("pissa")
    _, init, trained, _ = residual_pair(root, "pissa", r=4, target_modules=["q_proj", "v_proj"])
    tiny_llama().save_pretrained(str(root / "base"))
    return {"init": init, "trained": trained, "base": root / "base"}


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["{trained}", "--initial", "{init}", "--json"], id="initial"),
        pytest.param(["{trained}", "--base", "{base}", "--verify"], id="base"),
        pytest.param(["{trained}", "--initial", "{init}", "--rank", "2"], id="rank"),
        pytest.param(["{trained}", "--dtype", "bfloat16", "--json"], id="dtype"),
        pytest.param(["{trained}", "--initial", "{init}", "--portable", "--verify"], id="portable"),
    ],
)
def test_convert_is_light(args: list[str], pissa: dict[str, Path], tmp_path: Path) -> None:
    """convert computes with numpy where it computes, and never imports torch or the rest; the
    exact conversion (concatenate, negate) works on the bytes and needs not even numpy."""
    filled = [a.format(**{k: str(v) for k, v in pissa.items()}) for a in args]
    proc, modules = run_cli("convert", filled[0], str(tmp_path / "out"), *filled[1:])
    assert proc.returncode == 0, proc.stderr
    exact = args[1:] == ["--initial", "{init}", "--json"]
    heavy = [m for m in heavy_in(modules) if exact or m.split(".")[0] != "numpy"]
    assert not heavy, f"heavy modules imported: {heavy}"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_merge_is_light(pissa: dict[str, Path], tmp_path: Path) -> None:
    """merge streams a safetensors base with numpy: no torch, transformers or the rest."""
    from tests.fixtures import peft_save, tiny_llama

    adapter = peft_save(
        tiny_llama, tmp_path / "lora", {"default": {"r": 4, "target_modules": ["q_proj"]}}
    )
    out = tmp_path / "out"
    proc, modules = run_cli(
        "merge", str(pissa["base"]), str(adapter), str(out), "--json", "--verify"
    )
    assert proc.returncode == 0, proc.stderr
    heavy = [m for m in heavy_in(modules) if m.split(".")[0] != "numpy"]
    assert not heavy, f"heavy modules imported: {heavy}"
    assert json.loads(proc.stdout)["modules"] == {"linear": 2}
    assert (out / "model.safetensors").is_file()


def test_combine_is_light(adapter_dir: Path, tmp_path: Path) -> None:
    """combine computes with numpy and writes its card without huggingface_hub: no torch,
    transformers or the rest."""
    import shutil

    other = shutil.copytree(adapter_dir, tmp_path / "other")  # the same bytes, another adapter
    out = tmp_path / "out"
    args = ("--weights", "1,-0.5", "--method", "svd", "--rank", "2", "--verify", "--json")
    proc, modules = run_cli("combine", str(adapter_dir), str(other), str(out), *args)
    assert proc.returncode == 0, proc.stderr
    heavy = [m for m in heavy_in(modules) if m.split(".")[0] != "numpy"]
    assert not heavy, f"heavy modules imported: {heavy}"
    assert json.loads(proc.stdout)["verification"]["passed"] is True
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: peft\n")


def _checkpoint(directory: Path, change: float) -> Path:
    """A one-layer Llama-shaped safetensors checkpoint (config.json and model.safetensors),
    written with the project's format layer; `change` is added to q_proj's first row."""
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )

    def weight(step: float, first_row: float) -> bytes:
        values = [step * ((7 * i) % 13 - 6) for i in range(64)]
        values[:8] = [v + first_row for v in values[:8]]
        return struct.pack("<64f", *values)

    layer = "model.layers.0.self_attn"
    sources = [
        TensorSource(f"{layer}.q_proj.weight", DTYPES["F32"], (8, 8), lambda: weight(0.1, change)),
        TensorSource(f"{layer}.v_proj.weight", DTYPES["F32"], (8, 8), lambda: weight(0.2, 0.0)),
    ]
    with open(directory / "model.safetensors", "wb") as f:
        write_safetensors(f, sources)
    return directory


def test_extract_is_light(tmp_path: Path) -> None:
    """extract of safetensors checkpoints streams with numpy and writes its card without
    huggingface_hub: no torch, transformers or the rest."""
    base, tuned = _checkpoint(tmp_path / "base", 0.0), _checkpoint(tmp_path / "tuned", 0.5)
    out = tmp_path / "out"
    proc, modules = run_cli("extract", str(base), str(tuned), str(out), "--rank", "1", "--verify")
    assert proc.returncode == 0, proc.stderr
    heavy = [m for m in heavy_in(modules) if m.split(".")[0] != "numpy"]
    assert not heavy, f"heavy modules imported: {heavy}"
    assert "model.layers.0.self_attn.q_proj" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: peft\n")
