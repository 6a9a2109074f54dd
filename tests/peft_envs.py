"""Older PEFT releases, each in its own cached virtual environment, for the `--peft-version` tests.

Each environment is a plain venv (no system site-packages: this one holds peft 0.21.2) with
torch 2.13.0 and the PEFT release with a transformers release of its time. They live outside the
repository, under `$ADAPTERCTL_TEST_CACHE` (default `~/.cache/adapterctl-test`), as `peft-X.Y`.
Build them (package registries only; about 2-4 minutes each) with

    .venv/bin/python -m tests.peft_envs [X.Y ...]

The slow tests skip, naming this command, when an environment is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

#: PEFT release -> its pins: transformers of the same months as the release
ENVS: dict[str, tuple[str, ...]] = {
    "0.10": ("peft==0.10.0", "transformers==4.39.3", "numpy<2"),
    "0.14": ("peft==0.14.0", "transformers==4.47.1"),
    "0.17": ("peft==0.17.0", "transformers==4.53.3"),
}
TORCH = "torch==2.13.0"


def cache_root() -> Path:
    root = os.environ.get("ADAPTERCTL_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adapterctl-test"


def env_python(version: str) -> Path:
    return cache_root() / f"peft-{version}" / "bin" / "python"


def ready(version: str) -> bool:
    """The environment exists and finished building (the stamp is written last)."""
    return (cache_root() / f"peft-{version}" / ".complete").is_file()


def build(version: str) -> Path:
    folder = cache_root() / f"peft-{version}"
    if ready(version):
        return folder
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(folder)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)  # first, so no CUDA build is pulled
    subprocess.run([*pip, *ENVS[version]], check=True)
    (folder / ".complete").write_text(" ".join((TORCH, *ENVS[version])) + "\n")
    return folder


if __name__ == "__main__":
    for v in sys.argv[1:] or list(ENVS):
        print(f"peft {v}: {build(v)}", flush=True)
