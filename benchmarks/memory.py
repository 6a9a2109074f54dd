"""Benchmark for bounded memory: `select` and `convert` on a 1 GiB adapter (8 modules, A (256, 65536) and
B (65536, 256) fp32: 64 MiB tensors), peak RSS against 3 x the largest single tensor + 50 MiB.
`convert --initial` doubles every tensor, so its bound uses the largest OUTPUT tensor. Not in CI.

Run with `make bench-memory` (or `.venv/bin/python benchmarks/memory.py`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from common import OUT, Target, child_env, run_measured, versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SRC = OUT / "memory-1g"
R, WIDE, MODULES = 256, 65536, 8
TENSOR_MIB = R * WIDE * 4 / 2**20
ADAPTERCTL = str(Path(sys.executable).with_name("adapterctl"))


def _write(directory: Path, seed: int, init: str) -> None:
    import numpy as np

    from adapterctl.format.config import LoraConfig
    from adapterctl.format.dtypes import DTYPES
    from adapterctl.format.tensors import TensorSource, write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = []
    for i in range(MODULES):
        prefix = f"base_model.model.layers.{i}.proj"
        for kind, shape in (("lora_A", (R, WIDE)), ("lora_B", (WIDE, R))):

            def data(shape: tuple[int, int] = shape) -> bytes:
                return rng.standard_normal(shape, dtype=np.float32).tobytes()

            sources.append(TensorSource(f"{prefix}.{kind}.weight", DTYPES["F32"], shape, data))
    with open(directory / "adapter_model.safetensors", "wb") as f:
        write_safetensors(f, sources)
    config = LoraConfig(r=R, lora_alpha=R, target_modules=["proj"], init_lora_weights=init)
    (directory / "adapter_config.json").write_text(config.to_json())


def main() -> None:
    if not (SRC / "init" / "adapter_config.json").is_file():
        _write(SRC / "trained", 1, "pissa")
        _write(SRC / "init", 2, True)
    env = child_env()
    runs = {
        "select": ([ADAPTERCTL, "select", str(SRC / "trained"), "{out}", "-a", "default"], 1),
        "convert --dtype bfloat16": (
            [ADAPTERCTL, "convert", str(SRC / "trained"), "{out}", "--dtype", "bfloat16"], 1
        ),
        "convert --dtype bfloat16 --verify": (
            [ADAPTERCTL, "convert", str(SRC / "trained"), "{out}", "--dtype", "bfloat16",
             "--verify"],
            1,
        ),
        "convert --rank 64": (
            [ADAPTERCTL, "convert", str(SRC / "trained"), "{out}", "--initial", str(SRC / "init"),
             "--rank", "64"],
            2,
        ),
        "convert --initial": (
            [ADAPTERCTL, "convert", str(SRC / "trained"), "{out}", "--initial", str(SRC / "init")],
            2,
        ),
        "convert --initial --verify": (
            [ADAPTERCTL, "convert", str(SRC / "trained"), "{out}", "--initial", str(SRC / "init"),
             "--verify"],
            2,
        ),
    }  # fmt: skip
    goals = []
    for name, (argv, growth) in runs.items():
        out = OUT / "memory-out"
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, _ = run_measured([a.format(out=out) for a in argv], env)
        shutil.rmtree(out, ignore_errors=True)
        limit = 3 * TENSOR_MIB * growth + 50
        goals.append(
            Target(f"{name} peak / bound", peak / limit, "x", 1.0,
                   f"{peak:.0f} MiB, bound {limit:.0f} MiB, {wall:.1f} s")
        )  # fmt: skip
        print(f"{name:32} {peak:8.0f} MiB  bound {limit:6.0f} MiB  {wall:6.1f} s", flush=True)
    for g in goals:
        print(g.line(40))
    import json

    (OUT / "memory-results.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "tensor_mib": TENSOR_MIB,
                "versions": versions(),
                "targets": [g.to_dict() for g in goals],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
