"""A Hub source resolves to folders in the cache (a snapshot of symlinks into `blobs/`): those are
inputs too, so no output may replace or lie inside them, --force or not."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_adapter
from tests.hub.test_hub import cli, client_env, hub  # noqa: F401 - `hub` is a fixture

pytestmark = pytest.mark.slow


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_outputs_in_the_hub_cache_are_refused(hub: Any, tmp_path: Path) -> None:  # noqa: F811
    hub.put_folder("alice/ad", write_adapter(tmp_path / "ad"))
    env = client_env(hub, tmp_path / "hf")
    warm = cli(env, "convert", "alice/ad", tmp_path / "first", "--dtype", "bfloat16")
    assert warm.returncode == 0, warm.stderr
    repo = tmp_path / "hf" / "hub" / "models--alice--ad"
    (snapshot,) = (repo / "snapshots").iterdir()
    before = _tree(repo)
    cases = [
        # what the snapshot's symlinks point at: no adapter folder, so --force refuses it first
        (repo / "blobs", "--force will not replace"),
        (snapshot, "is the input"),
        (snapshot / "new", "lies inside the input"),
        (repo, "--force will not replace"),  # the cache folder is no adapter folder either
    ]
    for out, how in cases:
        proc = cli(env, "convert", "alice/ad", out, "--dtype", "bfloat16", "--force")
        assert proc.returncode == 1, proc.stderr
        expected = (
            f"error: {how} `{out}`" if how.startswith("--") else f"error: output `{out}` {how}"
        )
        assert proc.stderr.startswith(expected), proc.stderr
    assert _tree(repo) == before
