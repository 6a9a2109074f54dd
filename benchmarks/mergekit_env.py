"""mergekit in its own cached virtual environment, for the `extract` benchmark only.

A plain venv (no system site-packages) under benchmarks/out/mergekit-env: torch 2.13.0 first (the
CPU build on this machine's disk; a bare `torch` requirement pulls the CUDA build), then the
pinned mergekit release. Built on first use (package registries only; a few minutes), reused
after: the stamp `.complete` is written last, so an interrupted build is redone whole. Nothing in
the tests or CI installs it. Build it alone with

    .venv/bin/python -m benchmarks.mergekit_env
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

from benchmarks.common import OUT

TORCH = "torch==2.13.0"
MERGEKIT = "mergekit==0.1.5"
FOLDER = OUT / "mergekit-env"
STAMP = FOLDER / ".complete"


def ready() -> bool:
    """The environment exists with the pinned releases (the stamp is written last)."""
    return STAMP.is_file() and STAMP.read_text().split() == [TORCH, MERGEKIT]


def build() -> Path:
    """The environment's folder, built first where missing or pinned otherwise."""
    if ready():
        return FOLDER
    print(f"building {FOLDER} (once: {TORCH}, {MERGEKIT}) ...", file=sys.stderr, flush=True)
    shutil.rmtree(FOLDER, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(FOLDER)
    pip = [str(FOLDER / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)  # first, so that no CUDA build is pulled
    subprocess.run([*pip, MERGEKIT], check=True)
    STAMP.write_text(f"{TORCH}\n{MERGEKIT}\n")
    return FOLDER


def executable(name: str) -> str:
    """A console script of the environment (e.g. `mergekit-extract-lora`), built first."""
    return str(build() / "bin" / name)


if __name__ == "__main__":
    print(build())
