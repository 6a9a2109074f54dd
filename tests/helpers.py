"""Small adapters written with adapterctl's own format layer (no torch), for tests that need exact bytes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.rawtensor import RawTensor, to_float64
from adapterctl.format.tensors import SafetensorsReader, TensorSource, write_safetensors

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"

_NP_CODES = {"float32": "F32", "float16": "F16", "int64": "I64", "uint8": "U8", "bool": "BOOL"}


def lora_tensors(module: str = Q, r: int = 4, d_in: int = 8, d_out: int = 8) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        f"{P}{module}.lora_A.weight": rng.standard_normal((r, d_in)).astype(np.float32),
        f"{P}{module}.lora_B.weight": rng.standard_normal((d_out, r)).astype(np.float32),
    }


def write_tensors(path: Path, tensors: dict[str, Any]) -> Path:
    sources = [
        TensorSource(name, DTYPES[_NP_CODES[a.dtype.name]], tuple(a.shape), a.tobytes)
        for name, a in tensors.items()
    ]
    with open(path, "wb") as f:
        write_safetensors(f, sources)
    return path


def write_adapter(
    directory: Path,
    tensors: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    *,
    raw_config: str | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if raw_config is not None:
        (directory / "adapter_config.json").write_text(raw_config)
    else:
        cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **(config or {})}
        (directory / "adapter_config.json").write_text(LoraConfig(**cfg).to_json())
    write_tensors(
        directory / "adapter_model.safetensors", lora_tensors() if tensors is None else tensors
    )
    return directory


def raw_safetensors(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def unprivileged() -> list[str]:
    """A command prefix that runs as `nobody` (skips where that cannot import this checkout)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv to drop root")
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*drop, sys.executable, "-c", "import adapterctl"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("an unprivileged user cannot import this checkout")
    return drop


def read_raw(directory: Path) -> dict[str, RawTensor]:
    """An adapter folder's tensors, as raw tensors (no torch)."""
    with SafetensorsReader(directory / "adapter_model.safetensors") as f:
        return {k: RawTensor(t.dtype, t.shape, f.array(k)) for k, t in f.tensors.items()}


def lora_deltas(directory: Path) -> dict[str, Any]:
    """Each module's s·B·A in float64, from the files, with the per-module r and alpha its
    config gives (patterns and rslora applied)."""
    config = LoraConfig.from_file(directory / "adapter_config.json")
    tensors = read_raw(directory)
    out = {}
    for key, a in tensors.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            b = tensors[key.replace("_A", "_B")]
            module = key.removeprefix(P).rsplit(".lora_", 1)[0]
            s = config.scaling(config.alpha_for(module), config.rank_for(module))
            out[module] = s * (to_float64(b) @ to_float64(a))
    return out
