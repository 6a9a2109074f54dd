"""`adapterctl merge` from the command line: the report, --json, several adapters in order,
--verify, refusals (one error line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import P, Q, V, lora_tensors, write_adapter
from tests.hub.test_hub import hub  # noqa: F401 - a fixture

runner = CliRunner()
pytestmark = pytest.mark.slow


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, ["merge", *[str(a) for a in args]], prog_name="adapterctl")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import warnings

    from tests.fixtures import tiny_llama

    d = tmp_path_factory.mktemp("merge-cli") / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llama(hidden_size=8, intermediate_size=16).save_pretrained(str(d))
    return d


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    # q_proj (8 x 8) and v_proj (4 x 8: 2 key-value heads of 2) of the tiny base
    tensors = {**lora_tensors(Q), **lora_tensors(V, r=2, d_in=8, d_out=4)}
    return write_adapter(
        tmp_path / "src",
        tensors,
        {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}},
    )


def _read(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_human_report(base: Path, adapter: Path, tmp_path: Path) -> None:
    result = invoke(base, adapter, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"✓ {tmp_path / 'out'} (1 shard, ")
    assert any(line.split() == ["modules", "2", "linear"] for line in lines), result.stdout
    assert any(line.split()[:3] == ["tensors", "2", "merged,"] for line in lines), result.stdout
    assert result.stderr == ""


def test_json_report_and_values(base: Path, adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(base, adapter, out, "--json", "--verify", "--max-shard-size", "2KB")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["modules"] == {"linear": 2}
    assert doc["tensors_merged"] == 2
    assert doc["adapters"] == ["default"]
    assert doc["verification"]["passed"] is True
    assert len(doc["shards"]) > 1
    assert (
        doc["bytes"]
        == json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    )
    assert doc["peak_memory"] > 0
    assert doc["seconds"] >= 0
    # q_proj: W + (alpha / r) B A with the adapter's values
    merged: dict[str, np.ndarray] = {}
    for shard in doc["shards"]:
        merged.update(_read(out / shard))
    base_w = _read(base / "model.safetensors")[f"{Q}.weight"]
    factors = _read(adapter / "adapter_model.safetensors")
    a, b = factors[f"{P}{Q}.lora_A.weight"], factors[f"{P}{Q}.lora_B.weight"]
    np.testing.assert_allclose(merged[f"{Q}.weight"], base_w + (8 / 4) * b @ a, rtol=1e-6)


def test_several_adapters_in_the_order_given(base: Path, tmp_path: Path) -> None:
    root = tmp_path / "multi"
    write_adapter(root / "one", lora_tensors(Q))
    write_adapter(root / "two", lora_tensors(Q, r=2), {"r": 2, "lora_alpha": 4})
    out = tmp_path / "out"
    result = invoke(base, root, out, "--adapter", "two", "--adapter", "one", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["adapters"] == ["two", "one"]
    assert doc["modules"] == {"linear": 2}
    assert doc["tensors_merged"] == 1
    w = _read(base / "model.safetensors")[f"{Q}.weight"]
    one = _read(root / "one" / "adapter_model.safetensors")
    two = _read(root / "two" / "adapter_model.safetensors")
    for f, s in ((two, 2.0), (one, 2.0)):
        w = w + s * f[f"{P}{Q}.lora_B.weight"] @ f[f"{P}{Q}.lora_A.weight"]
    np.testing.assert_allclose(_read(out / "model.safetensors")[f"{Q}.weight"], w, rtol=1e-6)


def test_several_adapters_need_a_choice(base: Path, tmp_path: Path) -> None:
    root = tmp_path / "multi"
    write_adapter(root / "one", lora_tensors(Q))
    write_adapter(root / "two", lora_tensors(Q))
    result = invoke(base, root, tmp_path / "out")
    assert result.exit_code == 1
    assert "holds 2 adapters (one, two)" in result.stderr
    assert "--adapter" in result.stderr
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_is_one_error_line(base: Path, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src", lora_tensors(Q, d_in=16))
    result = invoke(base, src, tmp_path / "out", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stderr.splitlines()[0])
    assert Q in doc["error"]["message"]
    assert "[4, 16]" in doc["error"]["message"]
    assert "[8, 8]" in doc["error"]["message"]
    assert not (tmp_path / "out").exists()


def test_bad_options_are_usage_errors(base: Path, adapter: Path, tmp_path: Path) -> None:
    for option in (["--dtype", "int8"], ["--max-shard-size", "5XB"], ["--max-shard-size", "0"]):
        result = invoke(base, adapter, tmp_path / "out", *option)
        assert result.exit_code == 2, (option, result.stderr)
        assert result.stderr.startswith("error: "), result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(base: Path, adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(base, adapter, out).exit_code == 0
    again = invoke(base, adapter, out)
    assert again.exit_code == 1
    assert "already exists" in again.stderr
    forced = invoke(base, adapter, out, "--force", "--dtype", "bfloat16")
    assert forced.exit_code == 0, forced.stderr
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_hub_base_and_hub_adapter(hub: Any, base: Path, adapter: Path, tmp_path: Path) -> None:  # noqa: F811
    """BASE and ADAPTER as Hub ids (through the test Hub server) give the local merge's bytes."""
    from tests.hub.test_hub import cli, client_env

    hub.put_folder("org/tiny", base)
    hub.put_folder("alice/lora", adapter)
    env = client_env(hub, tmp_path / "hf")
    remote = cli(env, "merge", "org/tiny", "alice/lora", tmp_path / "remote", "--json")
    assert remote.returncode == 0, remote.stderr
    doc = json.loads(remote.stdout)
    assert (doc["base"], doc["adapter"]) == ("org/tiny", "alice/lora")
    local = cli(env, "merge", base, adapter, tmp_path / "local")
    assert local.returncode == 0, local.stderr
    name = "model.safetensors"
    assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    revision = cli(
        env, "merge", "org/tiny", "alice/lora", tmp_path / "r", "--base-revision", "nope"
    )
    assert revision.returncode == 1
    assert "nope" in revision.stderr
    assert not (tmp_path / "r").exists()


def test_sigkill_mid_merge_leaves_no_output(base: Path, adapter: Path, tmp_path: Path) -> None:
    """Killed after its first tensor: no OUTPUT, and the next run removes the dead run's temp."""
    import signal
    import subprocess
    import sys
    import time

    from tests import held_writer

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    args = ["merge", str(base), str(adapter), str(out), "--max-shard-size", "2KB"]
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        held_writer.command(args, marker=marker, after=1), cwd=root,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def temps() -> list[str]:
        return [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.adapterctl-tmp-")]

    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never reached the pause"
            time.sleep(0.02)
        assert temps()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert not out.exists()
    assert temps()
    again = subprocess.run(
        [sys.executable, "-m", "adapterctl", *args], cwd=root, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert temps() == []
    assert (out / "model.safetensors.index.json").is_file()


def test_lora_on_parameters_is_refused(base: Path, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src", lora_tensors(Q), {"target_parameters": ["mlp.experts"]})
    result = invoke(base, src, tmp_path / "out")
    assert result.exit_code == 1
    assert "LoRA on parameters" in result.stderr
    assert not (tmp_path / "out").exists()


def test_verify_failure_exits_1_and_writes_nothing(
    base: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterctl.format.rawtensor import RawTensor, to_float32
    from adapterctl.ops.merge import stream

    real = stream.Merger.apply

    def planted(self: Any, key: str, raw: Any, ops: Any) -> Any:
        out = real(self, key, raw, ops)
        values = to_float32(out).copy()
        values[0, 0] *= 1.01  # a planted error
        return RawTensor(out.dtype, out.shape, values)

    monkeypatch.setattr(stream.Merger, "apply", planted)
    result = invoke(base, adapter, tmp_path / "out", "--verify", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["verification"]["passed"] is False
    error = json.loads(result.stderr.splitlines()[-1])["error"]
    assert "verification failed" in error["message"]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_disk_full_is_one_error_and_no_output(tmp_path: Path) -> None:
    """ENOSPC (a small tmpfs where root may mount one, else a file-size limit) mid-merge: one
    error line naming OUTPUT, nothing left on the full disk."""
    import warnings

    from tests.cli.test_data_loss import limited_disk, one_error, run
    from tests.fixtures import tiny_llama

    big = tmp_path / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=512).save_pretrained(str(big))
    adapter = write_adapter(tmp_path / "src", lora_tensors(Q, 4, 64, 64))
    full = tmp_path / "full"
    full.mkdir()
    with limited_disk(full, 64 << 10) as (preexec, reason):
        proc = run(["merge", big, adapter, full / "out"], preexec=preexec)
        one_error(proc, f"cannot write `{full / 'out'}`", reason)
        assert list(full.iterdir()) == []
