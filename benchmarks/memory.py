"""Benchmark for bounded memory: `select` and `convert` on a 1 GiB adapter (8 modules, A (256, 65536) and
B (65536, 256) fp32: 64 MiB tensors), peak RSS against 3 x the largest single tensor + 50 MiB.
`convert --initial` doubles every tensor, so its bound uses the largest OUTPUT tensor. Not in CI.

Run with `make bench-memory` (or `.venv/bin/python -m benchmarks.memory`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.common import (
    ADAPTERCTL,
    OUT,
    Row,
    Target,
    begin,
    cached,
    per_command,
    print_targets,
    run_measured,
    write_results,
)

R, WIDE, MODULES = 256, 65536, 8
TENSOR_MIB = R * WIDE * 4 / 2**20
SPEC = {"r": R, "wide": WIDE, "modules": MODULES, "trained": [1, "pissa"], "init": [2, True]}


def _write(directory: Path, seed: int, init: str | bool) -> None:
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


def build(dest: str) -> None:
    """(In a child.) A trained/initial pair, written by the format layer."""
    for name in ("trained", "init"):
        seed, init = SPEC[name]
        _write(Path(dest) / name, seed, init)


def main() -> None:
    src, _ = cached("memory-1g", SPEC, build)
    env = begin()
    trained, init = str(src / "trained"), str(src / "init")
    convert = [ADAPTERCTL, "convert", trained, "{out}"]
    runs = {
        "select": ([ADAPTERCTL, "select", trained, "{out}", "-a", "default"], 1),
        "convert --dtype bfloat16": ([*convert, "--dtype", "bfloat16"], 1),
        "convert --dtype bfloat16 --verify": ([*convert, "--dtype", "bfloat16", "--verify"], 1),
        "convert --rank 64": ([*convert, "--initial", init, "--rank", "64"], 2),
        "convert --initial": ([*convert, "--initial", init], 2),
        "convert --initial --verify": ([*convert, "--initial", init, "--verify"], 2),
    }
    figures, goals = {}, []
    out = OUT / "memory-out"
    for name, (argv, growth) in runs.items():
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, _ = run_measured([a.format(out=out) for a in argv], env)
        shutil.rmtree(out, ignore_errors=True)
        limit = 3 * TENSOR_MIB * growth + 50
        figures[name] = {"peak_mib": peak, "bound_mib": limit, "wall_s": wall}
        goals.append(
            Target(f"{name} peak / bound", peak / limit, "x", 1.0,
                   f"{peak:.0f} MiB, bound {limit:.0f} MiB, {wall:.1f} s")
        )  # fmt: skip
        print(f"  {name} done", flush=True)
    print()
    per_command(
        figures,
        [
            Row("peak_mib", "peak", "MiB"),
            Row("bound_mib", "bound", "MiB"),
            Row("wall_s", "wall", "s"),
        ],
    )
    print_targets(goals)
    write_results("memory", goals, tensor_mib=TENSOR_MIB, figures=figures)


if __name__ == "__main__":
    main()
