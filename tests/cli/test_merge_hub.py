"""`adapterctl merge` with a Hub BASE and a Hub ADAPTER, through the real huggingface_hub client
against tests/hubserver.py: the result is PEFT's merge of the same files, byte for byte the local
merge's, at the revisions asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import as_tensor, merge_oracle, read_checkpoint, tiny_llama
from tests.hubserver import FakeHub

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-alice-secret"
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True}


@pytest.fixture
def hub() -> Any:
    with FakeHub({TOKEN: "alice"}) as server:
        yield server


def env_for(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterctl", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip


def doubled_llama() -> Any:
    """The tiny Llama with other weights (every parameter doubled)."""
    import torch

    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    return model


def test_hub_base_and_hub_adapter(hub: FakeHub, tmp_path: Path) -> None:
    base, adapter, expected, _ = merge_oracle(
        tiny_llama, tmp_path / "case", {"default": CONFIG}, shard="20KB"
    )
    # the base at its first commit; main then moves on to other weights
    first = hub.put_folder("org/tiny-llama", base)
    other, _, _, _ = merge_oracle(
        doubled_llama, tmp_path / "other", {"default": CONFIG}, shard="20KB"
    )
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in base.iterdir())
    hub.put_folder("org/tiny-llama", other)  # replaces every file of the first commit
    # a private adapter in a subfolder of a branch
    files = {f"run/{p.name}": p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    repo = hub.create("alice/private-adapter", private=True)
    hub.put("alice/private-adapter", files, private=True)
    repo.branches["trained"] = repo.branches["main"]
    hub.put("alice/private-adapter", {"run/adapter_config.json": b"{}"}, private=True)

    env = env_for(hub, tmp_path / "hf")
    out = tmp_path / "merged"
    args = ["merge", "org/tiny-llama", "alice/private-adapter", out]
    hub_opts = ["--base-revision", first, "--revision", "trained", "--subfolder", "run"]
    denied = cli(env, *args, *hub_opts)  # no token: the private adapter is not found
    assert denied.returncode == 1, denied.stderr
    assert denied.stderr.startswith("error: "), denied.stderr
    assert not out.exists()

    done = cli(env, *args, *hub_opts, "--token", TOKEN, "--json")
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)

    local = cli(env, "merge", base, adapter, tmp_path / "local")
    assert local.returncode == 0, local.stderr
    assert (out / "config.json").read_bytes() == (tmp_path / "local" / "config.json").read_bytes()
    got, want = read_checkpoint(out), read_checkpoint(tmp_path / "local")
    assert got == want  # every tensor's dtype, shape and bytes; shard split included
    for name, stored in got.items():
        ref = expected[name]
        err = float((as_tensor(stored).double() - ref.double()).abs().max())
        assert err <= 1e-6 * (float(ref.abs().max()) or 1.0), name
