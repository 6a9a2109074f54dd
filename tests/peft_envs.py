"""Older PEFT releases, each in its own cached virtual environment, for the `--peft-version` tests.

Each environment is a plain venv (no system site-packages: this one holds peft 0.21.2) with
torch 2.13.0 and the PEFT release with a transformers release of its time. They live outside the
repository, under `$ADAPTERCTL_TEST_CACHE` (default `~/.cache/adapterctl-test`), as `peft-X.Y`.
Build them (package registries only; about 2-4 minutes each) with

    .venv/bin/python -m tests.peft_envs [X.Y ...]

Where torch 2.13.0 is not on the machine's disk, point pip at the CPU build first (e.g.
`PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`): a bare `torch` from PyPI is the much
larger CUDA build. The slow tests skip, naming this command, when an environment is missing. In an environment,
`python tests/peft_envs.py logits JOB.json` (standard library at module level, so it runs there
without adapterctl) loads a tiny Llama's weights and an adapter with that PEFT and writes logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

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


def logits(job_path: str) -> None:
    """In an old-PEFT environment: the job's tiny Llama (its config kwargs, its weights from a
    safetensors file), alone and with each of the job's adapters loaded by
    `PeftModel.from_pretrained`; writes the logits for the job's input ids as JSON lists to the
    job's output: {"base": ..., "adapters": {name: {"logits": ..., "warnings": [...]}}}. An
    adapter whose load raises gets {"error": "TypeName: message"} instead."""
    import json
    import warnings

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    job = json.loads(Path(job_path).read_text())
    ids = torch.tensor(job["input_ids"])

    def base() -> Any:
        model = LlamaForCausalLM(LlamaConfig(**job["config"], attn_implementation="eager"))
        model.load_state_dict(load_file(job["weights"]), strict=True)
        return model.eval()

    result: dict[str, Any] = {"adapters": {}}
    with torch.no_grad():
        result["base"] = base()(ids).logits.tolist()
        for name, path in job["adapters"].items():
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model = PeftModel.from_pretrained(base(), path).eval()
                out = {"logits": model(ids).logits.tolist()}
                out["warnings"] = [str(w.message) for w in caught]
            except Exception as e:  # the test asks whether this release refuses the config
                out = {"error": f"{type(e).__name__}: {e}"}
            result["adapters"][name] = out
    Path(job["output"]).write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["logits"]:
        logits(sys.argv[2])
    else:
        for v in sys.argv[1:] or list(ENVS):
            print(f"peft {v}: {build(v)}", flush=True)
