"""Benchmark for `convert` where a user waits: an 8B-shaped adapter (Llama-3-8B shapes: hidden 4096,
key/value 1024, intermediate 14336, 32 layers; r=64 on all 7 linear layers; float32: 224 modules,
448 factors, 167.8M parameters, 671 MB), written synthetically into benchmarks/out/, then converted
side by side in one run: `--dtype bfloat16`, `--dtype bfloat16 --verify`, `--rank 16`.

Run with `make bench-convert-8b` (or `.venv/bin/python -m benchmarks.convert_8b [--runs N]`).
`--baseline DIR` also runs, interleaved, the adapterctl package found in DIR (e.g. an older commit:
`git archive COMMIT adapterctl | tar -x -C DIR`), for before/after figures from one run.
Targets: the verification's own time (with --verify minus without) <= 1x the plain conversion's,
and `--rank 16` <= 3x the plain `--dtype bfloat16` conversion.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.common import (
    ADAPTERCTL,
    OUT,
    Figures,
    Row,
    Target,
    begin,
    cached,
    interleaved,
    medians,
    per_command,
    print_targets,
    run_measured,
    write_results,
)

R, HIDDEN, KV, INTERMEDIATE, LAYERS = 64, 4096, 1024, 14336, 32
#: module -> (in, out) features, as in Llama-3-8B
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}
SPEC = {"r": R, "layers": LAYERS, "shapes": SHAPES, "seed": 0, "b_std": 0.01}
COMMANDS = {
    "dtype": ["--dtype", "bfloat16"],
    "verify": ["--dtype", "bfloat16", "--verify"],
    "rank": ["--rank", "16"],
}


def build(dest: str) -> None:
    """(In a child.) A trained-looking LoRA: A ~ N(0, 1/in), B ~ N(0, 0.01²) (B moved off zero
    by training), written by the format layer."""
    import numpy as np

    from adapterctl.format.config import LoraConfig
    from adapterctl.format.dtypes import DTYPES
    from adapterctl.format.tensors import TensorSource, write_safetensors

    rng = np.random.default_rng(SPEC["seed"])
    sources = []
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            for kind, shape, std in (
                ("lora_A", (R, fan_in), fan_in**-0.5),
                ("lora_B", (fan_out, R), SPEC["b_std"]),
            ):

                def data(shape: tuple[int, int] = shape, std: float = std) -> bytes:
                    values = rng.standard_normal(shape, dtype=np.float32)
                    values *= std
                    return values.tobytes()

                sources.append(TensorSource(f"{prefix}.{kind}.weight", DTYPES["F32"], shape, data))
    with open(Path(dest) / "adapter_model.safetensors", "wb") as f:
        write_safetensors(f, sources)
    config = LoraConfig(
        r=R,
        lora_alpha=2 * R,
        target_modules=[m.rsplit(".", 1)[1] for m in SHAPES],
        task_type="CAUSAL_LM",
    )
    (Path(dest) / "adapter_config.json").write_text(config.to_json())


def report(src: Path, med: dict[str, Figures]) -> list[Target]:
    plain, verified, reduced = (med[k]["wall_s"] for k in ("dtype", "verify", "rank"))
    size = (src / "adapter_model.safetensors").stat().st_size
    print(f"adapter: {size / 1e6:.0f} MB ({size / 2**20:.0f} MiB), 448 float32 factors")
    per_command(
        {"convert " + " ".join(COMMANDS[k]): f for k, f in med.items()},
        [Row("wall_s", "median", "s"), Row("peak_mib", "peak", "MiB")],
    )
    print(f"--verify / plain: {verified / plain:.2f}x")
    goals = [
        Target("--verify's own time / the conversion's", (verified - plain) / plain, "x", 1.0,
               f"({verified:.2f} s - {plain:.2f} s) / {plain:.2f} s"),
        Target("--rank 16 / --dtype bfloat16", reduced / plain, "x", 3.0,
               f"{reduced:.2f} s / {plain:.2f} s"),
    ]  # fmt: skip
    print_targets(goals)
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per command (median)")
    parser.add_argument("--baseline", type=Path, help="a folder holding another adapterctl package")
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "adapterctl" / "__init__.py").is_file():
        parser.error(f"{args.baseline} holds no adapterctl package")
    src, manifest = cached("adapter-8b-r64", SPEC, build)
    env = begin()
    variants = {"current": env}
    if args.baseline is not None:
        variants["baseline"] = {**env, "PYTHONPATH": str(args.baseline.resolve())}
    for e in variants.values():
        run_measured([ADAPTERCTL, "inspect", str(src), "--json"], e)  # warm caches
    out = OUT / "convert-8b-out"

    def measure(key: tuple[str, str], _: int) -> Figures:
        command, variant = key
        shutil.rmtree(out, ignore_errors=True)
        argv = [ADAPTERCTL, "convert", str(src), str(out), *COMMANDS[command]]
        wall, peak, _ = run_measured(argv, variants[variant])
        print(f"  {variant:8} {command:7} {wall:7.2f} s {peak:7.0f} MiB", flush=True)
        return {"wall_s": wall, "peak_mib": peak}

    keys = [(c, v) for c in COMMANDS for v in variants]
    runs = interleaved(args.runs, keys, measure)
    shutil.rmtree(out, ignore_errors=True)
    for variant in variants:
        mine = {c: runs[(c, variant)] for c in COMMANDS}
        print(f"\n{variant}:")
        goals = report(src, medians(mine))
        name = "convert-8b" if variant == "current" else "convert-8b-baseline"
        write_results(name, goals, runs=mine, medians=medians(mine), manifest=manifest)


if __name__ == "__main__":
    main()
