"""adapterctl benchmarks: cold-start wall time and peak memory, side by side with safetensors and PEFT.

Run with `make bench` (or `.venv/bin/python -m benchmarks.run [--runs N]`). See benchmarks/README.md.

Every measured command runs in a fresh interpreter, `--runs` interleaved rounds after one checked,
unmeasured run of each (page and bytecode caches warm). The adapters are built once, in a child
process, and cached under benchmarks/out/adapters/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ADAPTERCTL,
    LINEAR,
    LLAMA_170M,
    OUT,
    PYTHON,
    Figures,
    Row,
    Target,
    begin,
    cached,
    interleaved,
    llama_170m,
    per_command,
    print_targets,
    quiet_transformers,
    run_measured,
    write_results,
)

# What gets built. Changing it invalidates the cache (the manifest records it).
SPEC: dict[str, Any] = {
    "version": 2,
    "seed": 0,
    "llama": LLAMA_170M,
    "target_modules": LINEAR,
    # folder -> (rank, adapter names saved; `default` goes to the root, the others to subfolders)
    "adapters": {
        "r64": [64, ["default"]],
        "multi-r64": [64, ["default", "other"]],
        "multi-r256": [256, ["default", "other"]],
    },
}


def build_adapters(dest: str) -> dict[str, Any]:
    """(In a child.) PEFT's `save_pretrained` of each adapter in SPEC on the 170M Llama."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    quiet_transformers()
    base = LlamaForCausalLM.from_pretrained(llama_170m()).eval()
    torch.manual_seed(SPEC["seed"])
    for folder, (rank, names) in SPEC["adapters"].items():
        config = LoraConfig(r=rank, target_modules=SPEC["target_modules"], task_type="CAUSAL_LM")
        peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
        peft_model.save_pretrained(Path(dest) / folder)
        print(f"saved {folder}", file=sys.stderr)
    return {
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "adapters": {folder: _describe(Path(dest) / folder) for folder in SPEC["adapters"]},
    }


def _describe(folder: Path) -> dict[str, Any]:
    """Per adapter file in a saved folder: bytes, tensors, parameters (from the header alone)."""
    out = {}
    for st in sorted(folder.rglob("adapter_model.safetensors")):
        with open(st, "rb") as f:
            header: dict[str, Any] = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        params = sum(_numel(t["shape"]) for t in header.values())
        rel = st.parent.relative_to(folder).as_posix()
        out["default" if rel == "." else rel] = {
            "bytes": st.stat().st_size,
            "tensors": len(header),
            "parameters": params,
        }
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


RAW_LISTING = """\
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="np") as f:
    for k in f.keys():
        s = f.get_slice(k)
        print(k, s.get_shape(), s.get_dtype())
"""

PEFT_LOAD = """\
import sys
from peft import PeftConfig
from peft.utils import load_peft_weights
config = PeftConfig.from_pretrained(sys.argv[1])
weights = load_peft_weights(sys.argv[1], device="cpu")
print(config.peft_type.value, len(weights))
"""


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    argv: list[str]


def _select(adapters: Path, rank: str) -> list[str]:
    source, output = adapters / f"multi-{rank}", OUT / f"select-{rank}"
    rename = ["--adapter", "other", "--rename", "other=default", "--force"]
    return [ADAPTERCTL, "select", str(source), str(output), *rename]


def cases(adapters: Path) -> list[Case]:
    single = adapters / "r64"
    weights = single / "adapter_model.safetensors"
    return [
        Case("python", "python -c pass (interpreter floor)", [PYTHON, "-c", "pass"]),
        Case("raw", "raw listing: safe_open(np) + get_slice", [PYTHON, "-c", RAW_LISTING, str(weights)]),
        Case("peft", "PEFT: PeftConfig + load_peft_weights", [PYTHON, "-c", PEFT_LOAD, str(single)]),
        Case("help", "adapterctl --help", [ADAPTERCTL, "--help"]),
        Case("json", "adapterctl inspect DIR --json", [ADAPTERCTL, "inspect", str(single), "--json"]),
        Case("table", "adapterctl inspect DIR (table)", [ADAPTERCTL, "inspect", str(single)]),
        Case("select_small", "adapterctl select (r=64, 40 MB)", _select(adapters, "r64")),
        Case("select_big", "adapterctl select (r=256, 161 MB)", _select(adapters, "r256")),
    ]  # fmt: skip


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"benchmark sanity check failed: {message}")


def check_outputs(
    all_cases: list[Case], adapters: Path, manifest: dict[str, Any], env: dict[str, str]
) -> None:
    """One warm-up run of each command (fills the page and bytecode caches), checked."""
    expected = manifest["adapters"]["r64"]["default"]["tensors"]
    for case in all_cases:
        _, _, stdout = run_measured(case.argv, env, capture=True)
        if case.key == "json":
            listed = len(json.loads(stdout)["adapters"][0]["tensors"])
            _expect(listed == expected, f"inspect --json listed {listed} tensors, not {expected}")
        elif case.key == "raw":
            _expect(len(stdout.splitlines()) == expected, f"raw listing printed:\n{stdout}")
        elif case.key == "peft":
            _expect(stdout.split() == ["LORA", str(expected)], f"PEFT printed {stdout!r}")
    for rank in ("r64", "r256"):
        src = adapters / f"multi-{rank}" / "other" / "adapter_model.safetensors"
        dst = OUT / f"select-{rank}" / "adapter_model.safetensors"
        _expect(dst.read_bytes() == src.read_bytes(), f"select wrote `{dst}` unlike `{src}`")


def summarize(runs: list[Figures]) -> Figures:
    wall = [r["wall_s"] for r in runs]
    return {
        "wall_s": statistics.median(wall),
        "min_s": min(wall),
        "max_s": max(wall),
        "peak_mib": statistics.median(r["peak_mib"] for r in runs),
    }


def targets(c: dict[str, Figures]) -> list[Target]:
    def ratio(name: str, a: str, b: str, limit: float) -> Target:
        x, y = c[a]["wall_s"], c[b]["wall_s"]
        return Target(name, x / y, "x", limit, f"{x:.3f} s / {y:.3f} s")

    small, big = c["select_small"]["peak_mib"], c["select_big"]["peak_mib"]
    return [
        Target("--help wall time", c["help"]["wall_s"], "s", 0.25, "absolute"),
        ratio("inspect --json / raw listing", "json", "raw", 2.0),
        ratio("inspect table / raw listing", "table", "raw", 3.0),
        ratio("inspect --json / PEFT", "json", "peft", 0.05),
        ratio("inspect table / PEFT", "table", "peft", 0.05),
        Target("inspect --json peak RSS", c["json"]["peak_mib"], "MiB", 40.0, "absolute"),
        Target("inspect table peak RSS", c["table"]["peak_mib"], "MiB", 40.0, "absolute"),
        Target("select peak RSS growth, r=256 vs r=64", big - small, "MiB", 4.0,
               f"{big:.1f} MiB vs {small:.1f} MiB"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (median)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached adapters")
    parser.add_argument("--build-only", action="store_true", help="build the adapters and exit")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run the commands with the environment as it is (no PYTHONPYCACHEPREFIX)",
    )
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    llama_170m()
    adapters, manifest = cached("adapters", SPEC, build_adapters, rebuild=args.rebuild)
    if args.build_only:
        return
    env = begin(bytecode_cache=not args.no_bytecode_cache)
    all_cases = cases(adapters)
    by_key = {c.key: c for c in all_cases}
    print(
        f"checking each command once, then {args.runs} interleaved cold runs ...", file=sys.stderr
    )
    check_outputs(all_cases, adapters, manifest, env)

    def measure(key: str, _: int) -> Figures:
        wall, peak, _ = run_measured(by_key[key].argv, env)
        return {"wall_s": wall, "peak_mib": peak}

    runs = interleaved(args.runs, list(by_key), measure)
    figures = {c.key: summarize(runs[c.key]) for c in all_cases}
    for folder, files in manifest["adapters"].items():
        for name, info in files.items():
            print(
                f"adapter {folder}/{name}: {info['tensors']} tensors, "
                f"{info['parameters'] / 1e6:.2f}M parameters, {info['bytes'] / 1e6:.1f} MB"
            )
    print()
    per_command(
        {c.label: figures[c.key] for c in all_cases},
        [Row("wall_s", "median", "s"), Row("min_s", "min", "s"), Row("max_s", "max", "s"),
         Row("peak_mib", "peak", "MiB")],
    )  # fmt: skip
    goals = targets(figures)
    print_targets(goals)
    write_results(
        "run",
        goals,
        runs=args.runs,
        bytecode_cache=env.get("PYTHONPYCACHEPREFIX"),
        pythondontwritebytecode=env.get("PYTHONDONTWRITEBYTECODE"),
        adapters=manifest["adapters"],
        base_parameters=manifest["base_parameters"],
        cases={
            c.key: {
                "label": c.label,
                "argv": [Path(a).name if a in (PYTHON, ADAPTERCTL) else a for a in c.argv],
                **{k: round(v, 4) for k, v in figures[c.key].items()},
                "runs": runs[c.key],
            }
            for c in all_cases
        },
    )


if __name__ == "__main__":
    main()
