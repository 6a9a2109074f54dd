"""Benchmark for `inspect` on an adapter with very many tensors (issue 11 section 2): 100k tensors
(50k LoRA modules, a ~10 MB header), with rank and alpha patterns, read by `inspect --json`, the
table, and `--check`, side by side with a raw listing of the same header (safetensors' safe_open,
every key's shape and dtype). Goal: each inspect run under 3 s and 100 MB peak RSS.

Run with `make bench-inspect-many` (or `.venv/bin/python -m benchmarks.inspect_many [--tensors N]
[--runs N] [--baseline DIR]`). The adapter is synthetic (no torch), cached in
benchmarks/out/inspect-many/. `--baseline DIR` also runs, interleaved, the adapterctl package found
in DIR (an older commit: `git archive COMMIT adapterctl | tar -x -C DIR`), for before/after
figures from one run.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

from benchmarks.common import (
    ADAPTERCTL,
    PYTHON,
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

PREFIX = "base_model.model."


def module_names(n_modules: int) -> list[str]:
    """Module paths of a mixture-of-experts model: 64 experts of 3 projections per layer."""
    names = []
    for i in range(n_modules):
        layer, rest = divmod(i, 192)
        expert, proj = divmod(rest, 3)
        names.append(f"model.layers.{layer}.mlp.experts.{expert}.{('w1', 'w2', 'w3')[proj]}")
    return names


def build(dest: str, n_tensors: str) -> None:
    """(In a child.) An adapter of `n_tensors` tiny F32 tensors (A [1, 2], B [2, 1]) and a config
    with patterns."""
    directory = Path(dest)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in module_names(int(n_tensors) // 2):
        for kind, shape in (("lora_A", [1, 2]), ("lora_B", [2, 1])):
            header[f"{PREFIX}{name}.{kind}.weight"] = {
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [offset, offset + 8],
            }
            offset += 8
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(directory / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 2,
        "target_modules": ["w1", "w2", "w3"],
        "rank_pattern": {"w1": 1, r"layers\.0\..*w2": 1},
        "alpha_pattern": {"w3": 4, "experts.1.w1": 8},
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))


INSPECTS = {"inspect --json": ["--json"], "inspect (table)": [], "inspect --check": ["--check"]}

RAW_LISTING = (
    "import sys\n"
    "from safetensors import safe_open\n"
    "with safe_open(sys.argv[1], framework='np') as f:\n"
    "    n = sum(len(f.get_slice(k).get_shape()) + len(f.get_slice(k).get_dtype()) for k in f.keys())\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a folder holding another adapterctl package")
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "adapterctl" / "__init__.py").is_file():
        parser.error(f"{args.baseline} holds no adapterctl package")
    adapter, _ = cached("inspect-many", {"tensors": args.tensors}, build, str(args.tensors))
    env = begin()
    weights = str(adapter / "adapter_model.safetensors")
    commands = {"raw listing (safetensors)": ([PYTHON, "-c", RAW_LISTING, weights], env)}
    commands |= {n: ([ADAPTERCTL, "inspect", str(adapter), *x], env) for n, x in INSPECTS.items()}
    if args.baseline is not None:
        before = {**env, "PYTHONPATH": str(args.baseline.resolve())}
        for name, extra in INSPECTS.items():
            commands[f"baseline {name}"] = ([ADAPTERCTL, "inspect", str(adapter), *extra], before)
    for argv, e in commands.values():  # once unmeasured: warm caches, and it must succeed
        run_measured(argv, e)

    def measure(name: str, _: int) -> Figures:
        wall, peak, _ = run_measured(*commands[name])
        return {"wall_s": wall, "peak_mib": peak}

    runs = interleaved(args.runs, list(commands), measure)
    med = medians(runs)
    print(f"\n{args.tensors} tensors")
    per_command(med, [Row("wall_s", "wall", "s"), Row("peak_mib", "peak", "MiB")])
    inspects = [name for name in commands if name.startswith("inspect")]
    goals = [
        Target(f"{n} wall", med[n]["wall_s"], "s", 3.0, f"{args.tensors} tensors") for n in inspects
    ] + [Target(f"{n} peak RSS", med[n]["peak_mib"], "MiB", 100.0, "") for n in inspects]
    print_targets(goals)
    write_results("inspect-many", goals, tensors=args.tensors, runs=runs, medians=med)


if __name__ == "__main__":
    main()
