"""The README's first command runs the demo (`make demo` = demo/run.sh after set-up): it must keep
working at every commit, so the suite runs it as a user would, in a shell, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_pissa_story_end_to_end() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        ["bash", "demo/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert out.rstrip().endswith("(see the Quick start in README.md)")
    for step in ("save", "convert", "inspect", "load"):  # the PiSSA story's commands all ran
        assert f"$ adapterctl {step} " in out, step
    assert "--init pissa" in out
    assert "'passed': True" in out  # --base rebuilt the initial adapter and verified
    assert "Traceback" not in out + proc.stderr
    # the example adapters stay in demo-out/ (ignored by git) for the README's Quick start
    left = ROOT / "demo-out"
    for name in ("checkpoint", "checkpoint/math", "my-adapter", "pissa-init", "pissa-trained"):
        assert (left / name / "adapter_config.json").is_file(), name
    assert (left / "base" / "config.json").is_file()
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "demo-out/"], cwd=ROOT, check=False
    ).returncode
    assert ignored == 0, "demo-out/ must be ignored by git"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quick start") : readme.index("## Commands")]
    assert "cd demo-out" in quick
