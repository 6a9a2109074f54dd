"""vLLM's own LoRA loading code, as the oracle of the `vllm` engine's `loads` verdict.

A side virtual environment (never the project's .venv) under `$ADAPTERCTL_TEST_CACHE` (default
`~/.cache/adapterctl-test`), as `vllm-<version>`: the CPU build of torch on this machine's disk,
vLLM's wheel installed without its dependencies (it pins a CUDA torch), and only the packages the
import chain of `vllm.lora.lora_model` and `vllm.model_executor.models.llama` needs. vLLM's
compiled kernels do not load on a CPU machine (`vllm._C` is missing); none of the code run here
calls them. Build it (a 239 MB wheel from PyPI, several minutes) with

    .venv/bin/python -m tests.vllm_env

`check_many` runs, in one subprocess of the side environment, for each adapter what vLLM's
`WorkerLoRAManager._load_adapter` runs before the adapter reaches a GPU: `PEFTHelper.from_local_dir`
then `validate_legal(LoRAConfig(max_lora_rank=...))`, then `LoRAModel.from_local_checkpoint(...,
device="cpu")`, which parses every tensor name (`parse_fine_tuned_lora_name`), refuses modules
the model does not expect, skips PEFT's embedding copies and checks an embedding LoRA's rows
against the base's vocabulary. The expected modules are the worker's: `LlamaForCausalLM`'s
`packed_modules_mapping` expanded, its `embedding_modules`, and its linear layers' names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VERSION = "0.34.0"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk
#: what the import chain needs, found by importing and reading the errors; these install with
#: their own dependencies (torch held at the CPU build)
DEPS = (
    "packaging", "regex", "pydantic", "numpy", "psutil", "pyzmq", "requests", "aiohttp",
    "transformers>=5.16.1,<5.23.0", "pillow", "pybase64", "cachetools", "cbor2", "msgspec",
    "cloudpickle", "uvloop", "py-cpuinfo", "prometheus_client", "einops",
    "apache-tvm-ffi",  # xgrammar's
)  # fmt: skip
#: these pin a CUDA torch: installed without their dependencies (only imported, never called)
NO_DEPS = ("llguidance", "xgrammar==0.2.8")
#: the linear layers of vllm/model_executor/models/llama.py (LlamaAttention: qkv_proj, o_proj;
#: LlamaMLP: gate_up_proj, down_proj): what get_supported_lora_modules finds on a built model
LLAMA_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def cache_root() -> Path:
    root = os.environ.get("ADAPTERCTL_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adapterctl-test"


def folder() -> Path:
    return cache_root() / f"vllm-{VERSION}"


def python() -> Path:
    return folder() / "bin" / "python"


def ready() -> bool:
    """The side environment is built (the stamp is written last)."""
    return (folder() / ".complete").is_file()


def build(wheel: Path | None = None) -> Path:
    """Create the side environment (`wheel`: vLLM's wheel already on disk, else downloaded)."""
    out = folder()
    if ready():
        return out
    start = time.monotonic()
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(out)], check=True)
    pip = [str(python()), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        pin = Path(tmp) / "torch.txt"
        pin.write_text(f"{TORCH}\n")
        subprocess.run([*pip, "-c", str(pin), *DEPS], check=True)
        subprocess.run([*pip, "--no-deps", *NO_DEPS, str(wheel or f"vllm=={VERSION}")], check=True)
    (out / ".complete").write_text(f"vllm=={VERSION} {time.monotonic() - start:.0f} s\n")
    return out


def check_many(job_path: str) -> None:
    """In the side environment: each job case {"adapter", "max_lora_rank", "vocab_size"} ->
    {"loads": bool, "error": the exception vLLM raised, "stage": where}; written to the output."""
    import json

    from vllm.config.lora import LoRAConfig  # type: ignore[import-not-found]
    from vllm.lora.lora_model import LoRAModel  # type: ignore[import-not-found]
    from vllm.lora.peft_helper import PEFTHelper  # type: ignore[import-not-found]
    from vllm.model_executor.models.llama import LlamaForCausalLM  # type: ignore[import-not-found]

    packed = LlamaForCausalLM.packed_modules_mapping
    expected = {m for n in LLAMA_LINEAR for m in packed.get(n, [n])}
    expected |= set(LlamaForCausalLM.embedding_modules)
    job = json.loads(Path(job_path).read_text())
    result: list[dict[str, Any]] = []
    for case in job["cases"]:
        stage = "PEFTHelper"
        try:
            helper = PEFTHelper.from_local_dir(case["adapter"], max_position_embeddings=None)
            stage = "validate_legal"
            helper.validate_legal(LoRAConfig(max_lora_rank=case["max_lora_rank"]))
            stage = "from_local_checkpoint"
            LoRAModel.from_local_checkpoint(
                case["adapter"], expected, helper, lora_model_id=1, device="cpu",
                model_vocab_size=case["vocab_size"],
            )  # fmt: skip
        except Exception as e:  # vLLM refuses by raising
            result.append({"loads": False, "stage": stage, "error": f"{type(e).__name__}: {e}"})
        else:
            result.append({"loads": True, "stage": "", "error": ""})
    Path(job["output"]).write_text(json.dumps(result))


def run_many(cases: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """`check_many` in a subprocess of the side environment."""
    import json

    job, out = work / "vllm-job.json", work / "vllm-result.json"
    job.write_text(json.dumps({"cases": cases, "output": str(out)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    subprocess.run(
        [str(python()), __file__, "check-many", str(job)],
        check=True, capture_output=True, env=env, cwd=work, timeout=600,
    )  # fmt: skip
    result: list[dict[str, Any]] = json.loads(out.read_text())
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["check-many"]:
        check_many(sys.argv[2])
    else:
        given = sys.argv[sys.argv.index("--wheel") + 1] if "--wheel" in sys.argv else None
        print(f"vLLM {VERSION}: {build(Path(given) if given else None)}", flush=True)
