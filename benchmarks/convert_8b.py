"""Benchmark for `convert` where a user waits: an 8B-shaped adapter (Llama-3-8B shapes: hidden 4096,
key/value 1024, intermediate 14336, 32 layers; r=64 on all 7 linear layers; float32: 224 modules,
448 factors, 167.8M parameters, 671 MB), written synthetically into benchmarks/out/, then converted
side by side in one run: `--dtype bfloat16`, `--dtype bfloat16 --verify`, `--rank 16`.

Run with `make bench-convert-8b` (or `.venv/bin/python benchmarks/convert_8b.py [--runs N]`).
`--baseline DIR` also runs, interleaved, the adapterctl package found in DIR (e.g. an older commit:
`git archive COMMIT adapterctl | tar -x -C DIR`), for before/after figures from one run.
Targets: the verification's own time (with --verify minus without) <= 1x the plain conversion's,
and `--rank 16` <= 3x the plain `--dtype bfloat16` conversion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from common import OUT, Target, child_env, run_measured, versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SRC = OUT / "adapter-8b-r64"
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
ADAPTERCTL = str(Path(sys.executable).with_name("adapterctl"))


def _write(directory: Path) -> None:
    """A trained-looking LoRA: A ~ N(0, 1/in), B ~ N(0, 0.01²) (B moved off zero by training)."""
    import numpy as np

    from adapterctl.format.config import LoraConfig
    from adapterctl.format.dtypes import DTYPES
    from adapterctl.format.tensors import TensorSource, write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sources = []
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            for kind, shape, std in (
                ("lora_A", (R, fan_in), fan_in**-0.5),
                ("lora_B", (fan_out, R), 0.01),
            ):

                def data(shape: tuple[int, int] = shape, std: float = std) -> bytes:
                    values = rng.standard_normal(shape, dtype=np.float32)
                    values *= std
                    return values.tobytes()

                sources.append(TensorSource(f"{prefix}.{kind}.weight", DTYPES["F32"], shape, data))
    tmp = directory / ".adapter_model.safetensors.tmp"
    with open(tmp, "wb") as f:
        write_safetensors(f, sources)
    config = LoraConfig(
        r=R,
        lora_alpha=2 * R,
        target_modules=[m.rsplit(".", 1)[1] for m in SHAPES],
        task_type="CAUSAL_LM",
    )
    (directory / "adapter_config.json").write_text(config.to_json())
    tmp.rename(directory / "adapter_model.safetensors")  # last: an interrupted build is redone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per command (median)")
    parser.add_argument("--baseline", type=Path, help="a folder holding another adapterctl package")
    args = parser.parse_args()
    if not (SRC / "adapter_model.safetensors").is_file():
        print(f"writing {SRC} ...", flush=True)
        _write(SRC)
    variants = {"current": child_env()}
    if args.baseline is not None:
        if not (args.baseline / "adapterctl" / "__init__.py").is_file():
            parser.error(f"{args.baseline} holds no adapterctl package")
        variants["baseline"] = {**child_env(), "PYTHONPATH": str(args.baseline.resolve())}
    found = _measure(variants, args.runs)
    for variant, runs in found.items():
        print(f"\n{variant}:")
        _report(runs, "convert-8b" if variant == "current" else "convert-8b-baseline")


COMMANDS = {
    "dtype": ["--dtype", "bfloat16"],
    "verify": ["--dtype", "bfloat16", "--verify"],
    "rank": ["--rank", "16"],
}


def _measure(
    variants: dict[str, dict[str, str]], runs: int
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Each command of each variant once per round, interleaved, so that load drift hits all."""
    out = OUT / "convert-8b-out"
    found: dict[str, dict[str, list[dict[str, float]]]] = {
        v: {k: [] for k in COMMANDS} for v in variants
    }
    for env in variants.values():
        run_measured([ADAPTERCTL, "inspect", str(SRC), "--json"], env)  # warm caches
    for i in range(runs):
        for key, extra in COMMANDS.items():
            for variant, env in variants.items():
                shutil.rmtree(out, ignore_errors=True)
                argv = [ADAPTERCTL, "convert", str(SRC), str(out), *extra]
                wall, peak, _ = run_measured(argv, env)
                found[variant][key].append({"wall_s": wall, "peak_mib": peak})
                print(f"  run {i + 1}/{runs} {variant:8} {key:7} {wall:7.2f} s {peak:7.0f} MiB",
                      flush=True)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return found


def _report(runs: dict[str, list[dict[str, float]]], name: str) -> None:
    weights = SRC / "adapter_model.safetensors"
    commands = COMMANDS
    med = {k: {q: statistics.median(r[q] for r in rs) for q in rs[0]} for k, rs in runs.items()}
    plain, verified, reduced = (med[k]["wall_s"] for k in ("dtype", "verify", "rank"))
    goals = [
        Target(
            "--verify's own time / the conversion's",
            (verified - plain) / plain,
            "x",
            1.0,
            f"({verified:.2f} s - {plain:.2f} s) / {plain:.2f} s",
        ),
        Target("--rank 16 / --dtype bfloat16", reduced / plain, "x", 3.0,
               f"{reduced:.2f} s / {plain:.2f} s"),
    ]  # fmt: skip
    size = weights.stat().st_size
    print(f"\nadapter: {size / 1e6:.0f} MB ({size / 2**20:.0f} MiB), 448 float32 factors")
    print(f"{'command':36}{'median s':>10}{'peak MiB':>10}")
    for key, extra in commands.items():
        print(f"{'convert ' + ' '.join(extra):36}{med[key]['wall_s']:10.2f}"
              f"{med[key]['peak_mib']:10.0f}")  # fmt: skip
    print(f"{'--verify / plain':36}{verified / plain:10.2f}x")
    print()
    for g in goals:
        print(g.line(40, 2))
    path = OUT / f"{name}-results.json"
    payload = {
        "schema_version": 1,
        "adapter_bytes": size,
        "runs": runs,
        "medians": med,
        "versions": versions(),
        "targets": [g.to_dict() for g in goals],
    }
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
