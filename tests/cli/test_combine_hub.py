"""`adapterctl combine` with Hub SOURCEs, through the real huggingface_hub client against
tests/hubserver.py: a private source needs `--token` (which must reach the server), and the
result is byte for byte the combine of the same files on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli.test_merge_hub import cli, env_for
from tests.helpers import V, lora_tensors, write_adapter
from tests.hubserver import FakeHub

TOKEN = "tok-alice-secret"


@pytest.fixture
def hub() -> Any:
    with FakeHub({TOKEN: "alice"}) as server:
        yield server


def test_hub_sources_and_token(hub: FakeHub, tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", None, {"base_model_name_or_path": "org/base"})
    rng = np.random.default_rng(3)
    tensors = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in lora_tensors(V).items()
    }
    b = write_adapter(
        tmp_path / "b",
        tensors,
        {"target_modules": ["v_proj"], "base_model_name_or_path": "org/base"},
    )
    hub.put_folder("org/public-a", a)
    hub.create("alice/private-b", private=True)
    hub.put("alice/private-b", {p.name: p.read_bytes() for p in b.iterdir()}, private=True)
    env = env_for(hub, tmp_path / "hf")
    args = ["--weights", "0.5,2", "--method", "cat", "--json"]
    out = tmp_path / "out"

    denied = cli(env, "combine", "org/public-a", "alice/private-b", out, *args)
    assert denied.returncode == 1, denied.stderr
    error = json.loads(denied.stderr.splitlines()[-1])["error"]
    assert "alice/private-b" in error["message"]
    assert not out.exists()

    wrong = cli(env, "combine", "org/public-a", "alice/private-b", out, *args, "--token", "nope")
    assert wrong.returncode == 1, wrong.stderr  # the server saw the token, and refused it
    assert "authentication failed" in json.loads(wrong.stderr.splitlines()[-1])["error"]["message"]
    assert not out.exists()

    done = cli(env, "combine", "org/public-a", "alice/private-b", out, *args, "--token", TOKEN)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["sources"] == ["org/public-a", "alice/private-b"]
    assert [m["ranks_in"] for m in doc["modules"]] == [[4], [4]]
    hub_paths = {e.path for e in hub.log if e.status == 200}
    assert any("alice/private-b" in p and p.endswith(".safetensors") for p in hub_paths)

    local = cli(env, "combine", a, b, tmp_path / "local", *args)
    assert local.returncode == 0, local.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert "- `org/public-a` with weight 0.5\n- `alice/private-b` with weight 2.0\n" in card
    assert "base_model: org/base\n" in card

    mixed = cli(env, "combine", a, "alice/private-b", tmp_path / "mixed", *args, "--token", TOKEN)
    assert mixed.returncode == 0, mixed.stderr
    assert (tmp_path / "mixed" / "adapter_model.safetensors").read_bytes() == (
        out / "adapter_model.safetensors"
    ).read_bytes()
