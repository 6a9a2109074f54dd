"""Benchmark for `inspect` on an adapter with very many tensors (issue 11 section 2): 100k tensors
(50k LoRA modules, a ~10 MB header), with rank and alpha patterns, read by `inspect --json`, the
table, and `--check`, side by side with a raw listing of the same header (safetensors' safe_open,
every key's shape and dtype). Goal: each inspect run under 3 s and 100 MB peak RSS.

Run with `.venv/bin/python benchmarks/inspect_many.py [--tensors N] [--runs N] [--baseline DIR]`.
The adapter is written by this script (synthetic, no torch) into benchmarks/out/inspect-many/.
`--baseline DIR` also runs, interleaved, the adapterctl package found in DIR (an older commit:
`git archive COMMIT adapterctl | tar -x -C DIR`), for before/after figures from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
from pathlib import Path

from common import OUT, Target, child_env, run_measured, versions

ADAPTERCTL = str(Path(sys.executable).with_name("adapterctl"))
PREFIX = "base_model.model."


def module_names(n_modules: int) -> list[str]:
    """Module paths of a mixture-of-experts model: 64 experts of 3 projections per layer."""
    names = []
    for i in range(n_modules):
        layer, rest = divmod(i, 192)
        expert, proj = divmod(rest, 3)
        names.append(f"model.layers.{layer}.mlp.experts.{expert}.{('w1', 'w2', 'w3')[proj]}")
    return names


def build(directory: Path, n_tensors: int) -> Path:
    """An adapter of `n_tensors` tiny F32 tensors (A [1, 2], B [2, 1]) and a config with patterns."""
    spec = directory / "spec.json"
    if spec.is_file() and json.loads(spec.read_text()) == {"tensors": n_tensors}:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in module_names(n_tensors // 2):
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
    spec.write_text(json.dumps({"tensors": n_tensors}))
    return directory


INSPECTS = {"inspect --json": ["--json"], "inspect (table)": [], "inspect --check": ["--check"]}

RAW_LISTING = (
    "import sys\n"
    "from safetensors import safe_open\n"
    "with safe_open(sys.argv[1], framework='np') as f:\n"
    "    n = sum(len(f.get_slice(k).get_shape()) + len(f.get_slice(k).get_dtype()) for k in f.keys())\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a folder holding another adapterctl package")
    args = parser.parse_args()
    adapter = build(OUT / "inspect-many", args.tensors)
    env = child_env()
    envs = dict.fromkeys(("raw listing (safetensors)", *INSPECTS), env)
    commands = {
        "raw listing (safetensors)": [
            sys.executable,
            "-c",
            RAW_LISTING,
            str(adapter / "adapter_model.safetensors"),
        ],
        **{name: [ADAPTERCTL, "inspect", str(adapter), *extra] for name, extra in INSPECTS.items()},
    }
    if args.baseline is not None:
        if not (args.baseline / "adapterctl" / "__init__.py").is_file():
            parser.error(f"{args.baseline} holds no adapterctl package")
        before = {**env, "PYTHONPATH": str(args.baseline.resolve())}
        for name, extra in INSPECTS.items():
            commands[f"baseline {name}"] = [ADAPTERCTL, "inspect", str(adapter), *extra]
            envs[f"baseline {name}"] = before
    for name, argv in commands.items():  # once unmeasured: warm caches, and it must succeed
        run_measured(argv, envs[name])
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            wall, rss, _ = run_measured(argv, envs[name])
            runs[name].append((wall, rss))
    print(f"\n{args.tensors} tensors\n{'':28}{'wall s':>10}{'peak MiB':>10}")
    results = {}
    for name, values in runs.items():
        wall = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        results[name] = {"wall_s": wall, "peak_rss_mib": rss}
        print(f"{name:28}{wall:10.2f}{rss:10.1f}")
    goals = [
        Target(f"{name} wall", results[name]["wall_s"], " s", 3.0, f"{args.tensors} tensors")
        for name in commands
        if name.startswith("inspect")
    ] + [
        Target(f"{name} peak RSS", results[name]["peak_rss_mib"], " MiB", 100.0, "")
        for name in commands
        if name.startswith("inspect")
    ]
    print()
    for g in goals:
        print(g.line(36, 2))
    path = OUT / "inspect-many-results.json"
    payload = {"schema_version": 1, "tensors": args.tensors, "medians": results}
    payload |= {"versions": versions(), "targets": [g.to_dict() for g in goals]}
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
