"""vLLM's own LoRA loading code, as the oracle of the `vllm` engine's `loads` verdict.

A side virtual environment per release (0.34.0, the newest; 0.11.2, the last with an extra
vocabulary) (never the project's .venv) under `$ADAPTERCTL_TEST_CACHE` (default
`~/.cache/adapterctl-test`), as `vllm-<version>`: the CPU build of torch on this machine's disk,
vLLM's wheel installed without its dependencies (it pins a CUDA torch), and only the packages the
import chain of `vllm.lora.lora_model` and `vllm.model_executor.models.llama` needs. vLLM's
compiled kernels do not load on a CPU machine (`vllm._C` is missing); none of the code run here
calls them. Build them (a 239 MB wheel from PyPI for 0.34.0: 2.5 minutes, 1.8 GB; 0.11.2: 1.5 minutes, 2.2 GB) with

    .venv/bin/python -m tests.vllm_env [--version 0.34.0] [--wheel PATH]

`check_many` runs, in one subprocess of the side environment, for each adapter what vLLM's
`WorkerLoRAManager._load_adapter` runs before the adapter reaches a GPU: `PEFTHelper.from_local_dir`
then `validate_legal(LoRAConfig(max_lora_rank=..., lora_extra_vocab_size=... up to 0.11))`, then
`LoRAModel.from_local_checkpoint(..., device="cpu")`, which parses every tensor name
(`parse_fine_tuned_lora_name`), refuses modules the model does not expect, skips PEFT's
embedding copies (0.12-) and checks an embedding LoRA's rows against the base's vocabulary
(0.12-; up to 0.11 that check is the embedding layer's, on the GPU, and is not run). The expected modules are the worker's: `LlamaForCausalLM`'s
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

VERSION = "0.34.0"  # the newest release: what `vllm` means
VERSIONS = ("0.34.0", "0.11.2")
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk
#: what the import chain needs, found by importing and reading the errors; these install with
#: their own dependencies (torch held at the CPU build)
DEPS = (
    "packaging", "regex", "pydantic", "numpy", "psutil", "pyzmq", "requests", "aiohttp",
    "pillow", "pybase64", "cachetools", "cbor2", "msgspec", "cloudpickle", "uvloop", "py-cpuinfo",
    "prometheus_client", "einops",
    "apache-tvm-ffi",  # xgrammar's
)  # fmt: skip
#: per release: its transformers range (its wheel's Requires-Dist) and what else it imports
VERSION_DEPS = {
    "0.34.0": ("transformers>=5.16.1,<5.23.0",),
    "0.11.2": ("transformers>=4.56.0,<5", "gguf", "blake3"),
}  #: releases that take a CPU-only machine for an unknown one (whose pin_memory fails): vLLM's own
#: `CpuPlatform` is selected through its platform plugin entry point (`vllm.platform_plugins`,
#: vllm/platforms/__init__.py resolve_current_platform_cls_qualname), as a CPU build would be
CPU_PLUGIN = ("0.11.2",)
#: these pin a CUDA torch: installed without their dependencies (only imported, never called)
NO_DEPS = ("llguidance", "xgrammar==0.2.8")
#: the linear layers of vllm/model_executor/models/llama.py (LlamaAttention: qkv_proj, o_proj;
#: LlamaMLP: gate_up_proj, down_proj): what get_supported_lora_modules finds on a built model
LLAMA_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def cache_root() -> Path:
    root = os.environ.get("ADAPTERCTL_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adapterctl-test"


def folder(version: str = VERSION) -> Path:
    return cache_root() / f"vllm-{version}"


def python(version: str = VERSION) -> Path:
    return folder(version) / "bin" / "python"


def ready(version: str = VERSION) -> bool:
    """The side environment is built (the stamp is written last)."""
    return (folder(version) / ".complete").is_file()


def build(version: str = VERSION, wheel: Path | None = None) -> Path:
    """Create the side environment (`wheel`: vLLM's wheel already on disk, else downloaded)."""
    out = folder(version)
    if ready(version):
        return out
    start = time.monotonic()
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(out)], check=True)
    pip = [str(python(version)), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        pin = Path(tmp) / "torch.txt"
        pin.write_text(f"{TORCH}\n")
        subprocess.run([*pip, "-c", str(pin), *DEPS, *VERSION_DEPS[version]], check=True)
        subprocess.run([*pip, "--no-deps", *NO_DEPS, str(wheel or f"vllm=={version}")], check=True)
    if version in CPU_PLUGIN:
        _select_cpu_platform(out)
    (out / ".complete").write_text(f"vllm=={version} {time.monotonic() - start:.0f} s\n")
    return out


def _select_cpu_platform(venv: Path) -> None:
    """Install a one-line platform plugin naming vLLM's own `vllm.platforms.cpu.CpuPlatform`."""
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "adapterctl_vllm_cpu.py").write_text(
        'def platform():\n    return "vllm.platforms.cpu.CpuPlatform"\n'
    )
    info = site / "adapterctl_vllm_cpu-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: adapterctl-vllm-cpu\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.platform_plugins]\ncpu = adapterctl_vllm_cpu:platform\n"
    )
    (info / "RECORD").write_text("adapterctl_vllm_cpu.py,,\n")


def check_many(job_path: str) -> None:
    """In the side environment: each job case {"adapter", "max_lora_rank", "extra_vocab",
    "vocab_size"} -> {"loads": bool, "error": the exception vLLM raised, "stage": where}; written
    to the output. The arguments are the worker's (`_load_adapter`) for the release installed."""
    import inspect
    import json

    from vllm.config.lora import LoRAConfig  # type: ignore[import-not-found]
    from vllm.lora.peft_helper import PEFTHelper  # type: ignore[import-not-found]
    from vllm.model_executor.models.llama import LlamaForCausalLM  # type: ignore[import-not-found]

    try:  # 0.13-
        from vllm.lora.lora_model import LoRAModel  # type: ignore[import-not-found]
    except ImportError:  # up to 0.12
        from vllm.lora.models import LoRAModel  # type: ignore[import-not-found]

    model = LlamaForCausalLM
    packed = model.packed_modules_mapping
    expected = sorted(
        {m for n in LLAMA_LINEAR for m in packed.get(n, [n])} | set(model.embedding_modules)
    )
    takes = inspect.signature(LoRAModel.from_local_checkpoint).parameters
    job = json.loads(Path(job_path).read_text())
    result: list[dict[str, Any]] = []
    for case in job["cases"]:
        stage = "PEFTHelper"
        try:
            helper = PEFTHelper.from_local_dir(case["adapter"], max_position_embeddings=None)
            stage = "validate_legal"
            extra = {"lora_extra_vocab_size": case["extra_vocab"]} if case["extra_vocab"] else {}
            config = LoRAConfig(max_lora_rank=case["max_lora_rank"], **extra)
            helper.validate_legal(config)
            stage = "from_local_checkpoint"
            if "model_vocab_size" in takes:  # 0.12-
                sizes: dict[str, Any] = {"model_vocab_size": case["vocab_size"]}
            else:
                sizes = {
                    "target_embedding_padding": case["vocab_size"] + config.lora_extra_vocab_size,
                    "embedding_modules": model.embedding_modules,
                    "embedding_padding_modules": model.embedding_padding_modules,
                }
            LoRAModel.from_local_checkpoint(
                case["adapter"], expected, helper, lora_model_id=1, device="cpu", **sizes
            )
        except Exception as e:  # vLLM refuses by raising
            result.append({"loads": False, "stage": stage, "error": f"{type(e).__name__}: {e}"})
        else:
            result.append({"loads": True, "stage": "", "error": ""})
    Path(job["output"]).write_text(json.dumps(result))


def run_many(
    cases: list[dict[str, Any]], work: Path, version: str = VERSION
) -> list[dict[str, Any]]:
    """`check_many` in a subprocess of the side environment of `version`."""
    import json

    job, out = work / f"vllm-{version}-job.json", work / f"vllm-{version}-result.json"
    job.write_text(json.dumps({"cases": cases, "output": str(out)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    subprocess.run(
        [str(python(version)), __file__, "check-many", str(job)],
        check=True, capture_output=True, env=env, cwd=work, timeout=600,
    )  # fmt: skip
    result: list[dict[str, Any]] = json.loads(out.read_text())
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["check-many"]:
        check_many(sys.argv[2])
    else:
        args = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=False))
        version, given = args.get("--version", VERSION), args.get("--wheel")
        print(f"vLLM {version}: {build(version, Path(given) if given else None)}", flush=True)
