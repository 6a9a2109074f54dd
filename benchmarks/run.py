"""adapterctl benchmarks: cold-start wall time and peak memory, side by side with safetensors and PEFT.

Run with `make bench` (or `.venv/bin/python benchmarks/run.py [--runs N]`). See benchmarks/README.md.

Every measured command runs in a fresh interpreter. Its peak RSS comes from GNU time (`%M`, the
child's own ru_maxrss): a Python parent would leak its own high-water mark into the child's
ru_maxrss through the vfork+exec that subprocess uses, so the parent never measures that way
when /usr/bin/time exists. The benchmark adapters are built once, in a subprocess (this process
never imports torch), and cached under benchmarks/out/adapters/. Children keep their bytecode
under benchmarks/out/pycache (see `child_env`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (  # benchmarks/ is on sys.path when run as a script
    GNU_TIME,
    LLAMA_170M,
    OUT,
    Target,
    child_env,
    run_measured,
    versions,
)

HERE = Path(__file__).resolve().parent
ADAPTERS = OUT / "adapters"
MANIFEST = ADAPTERS / "manifest.json"
PYTHON = sys.executable
ADAPTERCTL = shutil.which("adapterctl", path=str(Path(PYTHON).parent)) or "adapterctl"
MIB = 1024 * 1024

# What gets built. Changing it invalidates the cache (the manifest records it).
SPEC: dict[str, Any] = {
    "version": 1,
    "seed": 0,
    "llama": LLAMA_170M,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # folder -> (rank, adapter names saved; `default` goes to the root, the others to subfolders)
    "adapters": {
        "r64": [64, ["default"]],
        "multi-r64": [64, ["default", "other"]],
        "multi-r256": [256, ["default", "other"]],
    },
}

# --------------------------------------------------------------------------------------------
# Building the adapters (in a child process: `run.py --build-into TMP`, from build_adapters)


def _build(dest: Path) -> None:
    import copy
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore")
    torch.manual_seed(SPEC["seed"])
    t0 = time.perf_counter()
    base = LlamaForCausalLM(LlamaConfig(**SPEC["llama"])).eval()
    base_params = sum(p.numel() for p in base.parameters())
    print(
        f"built base Llama: {base_params / 1e6:.1f}M parameters ({time.perf_counter() - t0:.1f} s)"
    )
    manifest: dict[str, Any] = {"spec": SPEC, "base_parameters": base_params, "adapters": {}}
    for folder, (rank, names) in SPEC["adapters"].items():
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        config = LoraConfig(r=rank, target_modules=SPEC["target_modules"], task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
        peft_model.save_pretrained(dest / folder)
        del peft_model, model
        print(f"saved {folder} ({time.perf_counter() - t0:.1f} s)")
    for folder in SPEC["adapters"]:
        manifest["adapters"][folder] = _describe(dest / folder)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _describe(folder: Path) -> dict[str, Any]:
    """Per adapter file in a saved folder: bytes, tensors, parameters (from the header alone)."""
    out = {}
    for st in sorted(folder.rglob("adapter_model.safetensors")):
        header = _header(st)
        params = 0
        for t in header.values():
            n = 1
            for d in t["shape"]:
                n *= d
            params += n
        rel = st.parent.relative_to(folder).as_posix()
        out["default" if rel == "." else rel] = {
            "bytes": st.stat().st_size,
            "tensors": len(header),
            "parameters": params,
        }
    return out


def build_adapters(*, force: bool) -> dict[str, Any]:
    """The adapters' manifest; builds them (in a child process) unless cached and up to date."""
    if not force and MANIFEST.is_file():
        manifest: dict[str, Any] = json.loads(MANIFEST.read_text())
        present = all((ADAPTERS / f / "adapter_config.json").is_file() for f in SPEC["adapters"])
        if manifest.get("spec") == SPEC and present:
            return manifest
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapters-", dir=OUT))
    print("building the benchmark adapters (once; cached in benchmarks/out/adapters) ...")
    try:
        subprocess.run([PYTHON, __file__, "--build-into", str(tmp)], check=True)
        shutil.rmtree(ADAPTERS, ignore_errors=True)
        os.rename(tmp, ADAPTERS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = json.loads(MANIFEST.read_text())
    return result


# --------------------------------------------------------------------------------------------
# Measuring

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


@dataclass
class Case:
    key: str
    label: str
    argv: list[str]
    wall_s: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def peak(self) -> float:
        return statistics.median(self.peak_mib)


def _select(folder: str) -> list[str]:
    source, output = ADAPTERS / f"multi-{folder}", OUT / f"select-{folder}"
    rename = ["--adapter", "other", "--rename", "other=default", "--force"]
    return [ADAPTERCTL, "select", str(source), str(output), *rename]


def cases() -> list[Case]:
    single = ADAPTERS / "r64"
    weights = single / "adapter_model.safetensors"
    return [
        Case("python", "python -c pass (interpreter floor)", [PYTHON, "-c", "pass"]),
        Case(
            "raw",
            "raw listing: safe_open(np) + get_slice",
            [PYTHON, "-c", RAW_LISTING, str(weights)],
        ),
        Case(
            "peft", "PEFT: PeftConfig + load_peft_weights", [PYTHON, "-c", PEFT_LOAD, str(single)]
        ),
        Case("help", "adapterctl --help", [ADAPTERCTL, "--help"]),
        Case(
            "json", "adapterctl inspect DIR --json", [ADAPTERCTL, "inspect", str(single), "--json"]
        ),
        Case("table", "adapterctl inspect DIR (table)", [ADAPTERCTL, "inspect", str(single)]),
        Case("select_small", "adapterctl select (r=64, 40 MB)", _select("r64")),
        Case("select_big", "adapterctl select (r=256, 161 MB)", _select("r256")),
    ]


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"benchmark sanity check failed: {message}")


def check_outputs(all_cases: list[Case], manifest: dict[str, Any], env: dict[str, str]) -> None:
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
    for folder in ("r64", "r256"):
        src = ADAPTERS / f"multi-{folder}" / "other" / "adapter_model.safetensors"
        dst = OUT / f"select-{folder}" / "adapter_model.safetensors"
        _expect(dst.read_bytes() == src.read_bytes(), f"select wrote `{dst}` unlike `{src}`")


def measure(all_cases: list[Case], runs: int, env: dict[str, str]) -> None:
    """Interleaved: run i of every case, then run i + 1, so drift hits all cases alike."""
    for i in range(runs):
        for case in all_cases:
            wall, peak, _ = run_measured(case.argv, env)
            case.wall_s.append(wall)
            case.peak_mib.append(peak)
        print(f"  run {i + 1}/{runs} done", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Reporting


def targets(c: dict[str, Case]) -> list[Target]:
    json_, table, raw, peft = c["json"], c["table"], c["raw"], c["peft"]
    small, big = c["select_small"], c["select_big"]
    return [
        Target("--help wall time", c["help"].wall, "s", 0.25, "absolute"),
        Target(
            "inspect --json / raw listing",
            json_.wall / raw.wall,
            "x",
            2.0,
            f"{json_.wall:.3f} s / {raw.wall:.3f} s",
        ),
        Target(
            "inspect table / raw listing",
            table.wall / raw.wall,
            "x",
            3.0,
            f"{table.wall:.3f} s / {raw.wall:.3f} s",
        ),
        Target(
            "inspect --json / PEFT",
            json_.wall / peft.wall,
            "x",
            0.05,
            f"{json_.wall:.3f} s / {peft.wall:.3f} s",
        ),
        Target(
            "inspect table / PEFT",
            table.wall / peft.wall,
            "x",
            0.05,
            f"{table.wall:.3f} s / {peft.wall:.3f} s",
        ),
        Target("inspect --json peak RSS", json_.peak, "MiB", 40.0, "absolute"),
        Target("inspect table peak RSS", table.peak, "MiB", 40.0, "absolute"),
        Target(
            "select peak RSS growth, r=256 vs r=64",
            big.peak - small.peak,
            "MiB",
            4.0,
            f"{big.peak:.1f} MiB vs {small.peak:.1f} MiB",
        ),
    ]


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3g}x"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{round(value, 1) + 0.0:.1f} {unit}"  # + 0.0: no "-0.0"


def print_report(all_cases: list[Case], goals: list[Target], manifest: dict[str, Any]) -> None:
    for folder, files in manifest["adapters"].items():
        for name, info in files.items():
            print(
                f"adapter {folder}/{name}: {info['tensors']} tensors, "
                f"{info['parameters'] / 1e6:.2f}M parameters, {info['bytes'] / 1e6:.1f} MB"
            )
    print()
    w = max(len(c.label) for c in all_cases)
    print(f"{'command'.ljust(w)}  {'median s':>9}  {'min s':>7}  {'max s':>7}  {'peak MiB':>8}")
    for c in all_cases:
        print(
            f"{c.label.ljust(w)}  {c.wall:9.3f}  {min(c.wall_s):7.3f}  {max(c.wall_s):7.3f}  "
            f"{c.peak:8.1f}"
        )
    print()
    w = max(len(t.name) for t in goals)
    print(f"{'target'.ljust(w)}  {'value':>10}  {'limit':>11}  {'status':<7}  detail")
    for t in goals:
        value, limit = _fmt(t.value, t.unit), "<= " + _fmt(t.limit, t.unit)
        status = "met" if t.met else "NOT MET"
        print(f"{t.name.ljust(w)}  {value:>10}  {limit:>11}  {status:<7}  {t.detail}")


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
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_into:
        _build(args.build_into)
        return
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    manifest = build_adapters(force=args.rebuild)
    if args.build_only:
        return
    if GNU_TIME is None:
        print(
            "warning: /usr/bin/time not found; peak RSS includes this process's own",
            file=sys.stderr,
        )
    all_cases = cases()
    load_before = os.getloadavg()
    print(
        f"checking each command once, then {args.runs} interleaved cold runs ...", file=sys.stderr
    )
    env = child_env(not args.no_bytecode_cache)
    check_outputs(all_cases, manifest, env)
    measure(all_cases, args.runs, env)
    goals = targets({c.key: c for c in all_cases})
    print_report(all_cases, goals, manifest)
    results = {
        "schema_version": 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": args.runs,
        "rss_method": "GNU time %M" if GNU_TIME else "os.wait4 ru_maxrss",
        "bytecode_cache": env.get("PYTHONPYCACHEPREFIX"),
        "pythondontwritebytecode": env.get("PYTHONDONTWRITEBYTECODE"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "versions": versions(),
        "adapters": manifest["adapters"],
        "base_parameters": manifest["base_parameters"],
        "cases": {
            c.key: {
                "label": c.label,
                "argv": [Path(a).name if a in (PYTHON, ADAPTERCTL) else a for a in c.argv],
                "median_wall_s": round(c.wall, 4),
                "median_peak_mib": round(c.peak, 2),
                "wall_s": [round(x, 4) for x in c.wall_s],
                "peak_mib": [round(x, 2) for x in c.peak_mib],
            }
            for c in all_cases
        },
        "targets": [t.to_dict() for t in goals],
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {(OUT / 'results.json').relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
