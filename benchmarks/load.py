"""adapterctl engine load benchmarks: adapters into a live Llama, side by side with PEFT.

Run with `make bench-load` (or `.venv/bin/python benchmarks/load.py [--rounds N]`). See
benchmarks/README.md.

Two measurements, each made in fresh child interpreters (one per engine per measurement and round,
so the engines never share a process, a cache or an allocator):

  multi   one base, 24 different adapters loaded one after another: `from_pretrained` (a00), then
          `load_adapter` for a01..a23, each call timed on its own
  single  one r=64 adapter on all seven linear layers: `from_pretrained` on the same loaded base,
          repeated (each followed by an untimed `unload()`), after one untimed warm-up

This process never imports torch: the base, the adapters and every measurement come from child
processes, and each child's peak RSS is GNU time's `%M` (see run.py on why a Python parent's
`os.wait4` would overstate it). The base and the adapters are built once and cached under
benchmarks/out/ (load-base/, load-adapters/, load-r64/, load-manifest.json).
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
from array import array
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
BASE = OUT / "load-base"
MULTI = OUT / "load-adapters"
SINGLE = OUT / "load-r64"
MANIFEST = OUT / "load-manifest.json"
RESULTS = OUT / "load-results.json"
PYTHON = sys.executable
ENGINES = ("adapterctl", "peft")
N_MULTI = 24
CHECK_ADAPTER = "a05"
CHECK_TOKENS = 16

# What gets built. Changing it invalidates the cache (the manifest records it).
SPEC: dict[str, Any] = {
    "version": 1,
    "seed": 0,
    "llama": LLAMA_170M,
    # a00..a23: rank 8 + (i % 17), on these modules
    "multi": {"count": N_MULTI, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "single": {
        "rank": 64,
        "target_modules": [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    },
    # every LoRA tensor (B included, which LoRA starts at zero) is drawn from N(0, std^2)
    "lora_std": 0.02,
}


def multi_rank(i: int) -> int:
    return 8 + (i % 17)


def multi_name(i: int) -> str:
    return f"a{i:02d}"


# --------------------------------------------------------------------------------------------
# Children: building (`--build-into TMP`) and measuring (`--child multi|single --engine E`)


def _quiet() -> None:
    import warnings

    import transformers

    warnings.simplefilter("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _build(dest: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    torch.manual_seed(SPEC["seed"])
    t0 = time.perf_counter()
    base = LlamaForCausalLM(LlamaConfig(**SPEC["llama"])).eval()
    base.save_pretrained(dest / "base")
    n_params = sum(p.numel() for p in base.parameters())
    print(f"saved base Llama: {n_params / 1e6:.1f}M parameters ({time.perf_counter() - t0:.1f} s)")

    def save(model: Any, config: Any, seed: int, where: Path) -> Any:
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, SPEC["lora_std"])
        peft_model.save_pretrained(where)
        return peft_model.unload()  # the base again, without LoRA layers

    t0 = time.perf_counter()
    multi = SPEC["multi"]
    for i in range(multi["count"]):
        config = LoraConfig(
            r=multi_rank(i), target_modules=multi["target_modules"], task_type="CAUSAL_LM"
        )
        base = save(base, config, 1000 + i, dest / "adapters" / multi_name(i))
    print(f"saved {multi['count']} adapters ({time.perf_counter() - t0:.1f} s)")
    single = SPEC["single"]
    config = LoraConfig(
        r=single["rank"], target_modules=single["target_modules"], task_type="CAUSAL_LM"
    )
    save(base, config, 2000, dest / "r64")
    print("saved the r=64 adapter")
    sizes = {
        "base_bytes": sum(f.stat().st_size for f in (dest / "base").glob("*.safetensors")),
        "multi_bytes": [
            (dest / "adapters" / multi_name(i) / "adapter_model.safetensors").stat().st_size
            for i in range(multi["count"])
        ],
        "single_bytes": (dest / "r64" / "adapter_model.safetensors").stat().st_size,
    }
    manifest = {"spec": SPEC, "base_parameters": n_params, **sizes}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _engine(name: str) -> Any:
    if name == "peft":
        from peft import PeftModel

        return PeftModel
    from adapterctl.engine.model import AdapterModel

    return AdapterModel


def _load_base() -> tuple[Any, float]:
    import torch
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    base = LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    return base, time.perf_counter() - t0


def _profiler(path: str | None) -> Any:
    if path is None:
        return None
    import cProfile

    return cProfile.Profile()


def _child_multi(engine: str, logits_path: str | None, profile_path: str | None) -> dict[str, Any]:
    """24 adapters onto one base: from_pretrained(a00), then load_adapter(a01..a23), each timed."""
    import gc

    import torch

    _quiet()
    cls = _engine(engine)
    base, base_s = _load_base()
    gc.collect()
    t0 = time.perf_counter()
    model = cls.from_pretrained(base, MULTI / multi_name(0), adapter_name=multi_name(0))
    first_s = time.perf_counter() - t0
    prof = _profiler(profile_path)
    times = []
    for i in range(1, N_MULTI):
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        model.load_adapter(MULTI / multi_name(i), adapter_name=multi_name(i))
        times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.disable()
    if prof is not None:
        prof.dump_stats(profile_path)
    loaded = sorted(model.peft_config)
    if loaded != [multi_name(i) for i in range(N_MULTI)]:
        raise RuntimeError(f"{engine}: loaded adapters are {loaded}")
    # After the timed loads, in every child (so that every child's peak RSS includes a forward):
    # a05's logits, and how far they are from a00's (the correctness check is not vacuous).
    ids = torch.arange(CHECK_TOKENS)[None]
    with torch.no_grad():
        model.set_adapter(multi_name(0))
        other = model(input_ids=ids).logits.float()
        model.set_adapter(CHECK_ADAPTER)
        logits = model(input_ids=ids).logits.float()
    if logits_path is not None:
        Path(logits_path).write_bytes(logits.contiguous().numpy().tobytes())
    return {
        "base_load_s": base_s,
        "from_pretrained_s": first_s,
        "load_s": times,
        "a05_vs_a00_max_abs": (logits - other).abs().max().item(),
    }


def _child_single(engine: str, repeats: int, profile_path: str | None) -> dict[str, Any]:
    """from_pretrained of the r=64 adapter on the same loaded base, `repeats` times (+1 warm-up)."""
    import gc

    _quiet()
    cls = _engine(engine)
    base, base_s = _load_base()
    n_modules = sum(1 for _ in base.modules())
    t0 = time.perf_counter()
    base = cls.from_pretrained(base, SINGLE).unload()  # warm-up
    warmup_s = time.perf_counter() - t0
    prof = _profiler(profile_path)
    times = []
    for _ in range(repeats):
        gc.collect()
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        model = cls.from_pretrained(base, SINGLE)
        times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.disable()
        base = model.unload()
        del model
    if prof is not None:
        prof.dump_stats(profile_path)
    left = sum(1 for _ in base.modules())
    if left != n_modules:
        raise RuntimeError(f"{engine}: unload left {left} modules, not {n_modules}")
    return {"base_load_s": base_s, "warmup_s": warmup_s, "times_s": times}


# --------------------------------------------------------------------------------------------
# The parent: building once, running the children, reporting


def build(*, force: bool) -> dict[str, Any]:
    """The manifest; builds the base and the adapters (in a child process) unless cached."""
    paths = (BASE / "config.json", SINGLE / "adapter_config.json")
    paths += tuple(MULTI / multi_name(i) / "adapter_config.json" for i in range(N_MULTI))
    if not force and MANIFEST.is_file():
        manifest: dict[str, Any] = json.loads(MANIFEST.read_text())
        if manifest.get("spec") == SPEC and all(p.is_file() for p in paths):
            return manifest
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".load-", dir=OUT))
    print("building the base and the adapters (once; cached in benchmarks/out/load-*) ...")
    try:
        MANIFEST.unlink(missing_ok=True)
        subprocess.run([PYTHON, __file__, "--build-into", str(tmp)], check=True)
        for src, dst in ((tmp / "base", BASE), (tmp / "adapters", MULTI), (tmp / "r64", SINGLE)):
            shutil.rmtree(dst, ignore_errors=True)
            os.rename(src, dst)
        os.rename(tmp / "manifest.json", MANIFEST)  # last: the cache is valid from here on
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = json.loads(MANIFEST.read_text())
    return result


def run_child(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """One measuring child; returns (its JSON report, its wall seconds, its peak RSS MiB)."""
    wall, peak, stdout = run_measured([PYTHON, __file__, *args], env, capture=True)
    report: dict[str, Any] = json.loads(stdout.splitlines()[-1])
    return report, wall, peak


def warm_page_cache() -> None:
    """Read every file once, so that no engine pays for a cold disk (done in chunks: this process
    stays small)."""
    for root in (BASE, MULTI, SINGLE):
        for f in sorted(root.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 20):
                        pass


def max_abs_diff(a: Path, b: Path) -> float:
    x, y = array("f"), array("f")
    x.frombytes(a.read_bytes())
    y.frombytes(b.read_bytes())
    if len(x) != len(y):
        raise RuntimeError(f"logits of different sizes: {len(x)} vs {len(y)}")
    return max(abs(p - q) for p, q in zip(x, y, strict=True))


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def summarize(
    multi: dict[str, list[dict[str, Any]]], single: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per engine: the multi figures (medians over rounds) and the single figures (pooled)."""
    m: dict[str, dict[str, float]] = {}
    for e, runs in multi.items():
        m[e] = {
            "from_pretrained_s": _med([r["from_pretrained_s"] for r in runs]),
            "first_s": _med([r["load_s"][0] for r in runs]),
            "last_s": _med([r["load_s"][-1] for r in runs]),
            "load_adapter_sum_s": _med([sum(r["load_s"]) for r in runs]),
            "total_s": _med([r["from_pretrained_s"] + sum(r["load_s"]) for r in runs]),
            "base_load_s": _med([r["base_load_s"] for r in runs]),
            "peak_mib": _med([r["peak_mib"] for r in runs]),
        }
        m[e]["last_over_first"] = m[e]["last_s"] / m[e]["first_s"]
    s: dict[str, dict[str, float]] = {}
    for e, runs in single.items():
        pooled = [t for r in runs for t in r["times_s"]]
        s[e] = {
            "median_s": _med(pooled),
            "min_s": min(pooled),
            "max_s": max(pooled),
            "n": len(pooled),
            "warmup_s": _med([r["warmup_s"] for r in runs]),
            "peak_mib": _med([r["peak_mib"] for r in runs]),
        }
    return m, s


def targets(m: dict[str, Any], s: dict[str, Any], diff: float) -> list[Target]:
    a, p = m["adapterctl"], m["peft"]
    sa, sp = s["adapterctl"], s["peft"]
    return [
        Target(
            "multi: total of 24 loads, adapterctl / PEFT",
            a["total_s"] / p["total_s"],
            "x",
            0.5,
            f"{a['total_s']:.3f} s / {p['total_s']:.3f} s",
        ),
        Target(
            "multi: adapterctl last load_adapter / first",
            a["last_over_first"],
            "x",
            1.3,
            f"a23 {a['last_s'] * 1e3:.1f} ms / a01 {a['first_s'] * 1e3:.1f} ms",
        ),
        Target(
            "single r=64: from_pretrained median, adapterctl / PEFT",
            sa["median_s"] / sp["median_s"],
            "x",
            0.5,
            f"{sa['median_s'] * 1e3:.1f} ms / {sp['median_s'] * 1e3:.1f} ms",
        ),
        Target(
            f"{CHECK_ADAPTER} logits, max |adapterctl - PEFT|",
            diff,
            "abs",
            1e-4,
            f"input_ids=arange({CHECK_TOKENS}), set_adapter({CHECK_ADAPTER!r})",
        ),
    ]


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3g}x"
    return f"{value:.2e}"


def print_report(m: dict[str, Any], s: dict[str, Any], goals: list[Target], rounds: int) -> None:
    a, p = m["adapterctl"], m["peft"]
    rows = [
        ("from_pretrained (a00)", "from_pretrained_s", 1e3, "ms"),
        ("first load_adapter (a01)", "first_s", 1e3, "ms"),
        ("last load_adapter (a23)", "last_s", 1e3, "ms"),
        ("last / first", "last_over_first", 1, "x"),
        ("sum of 23 load_adapter", "load_adapter_sum_s", 1, "s"),
        ("total of 24 loads", "total_s", 1, "s"),
        ("peak RSS (child)", "peak_mib", 1, "MiB"),
        ("base from_pretrained (untimed)", "base_load_s", 1, "s"),
    ]
    print(f"\nmulti: 24 adapters (r 8..24; q, v, down) onto one base, median of {rounds} children")
    print(f"{'':32}{'adapterctl':>12}{'PEFT':>12}{'ratio':>9}")
    for label, key, scale, unit in rows:
        ratio = a[key] / p[key]
        print(
            f"{(label + ' [' + unit + ']'):32}{a[key] * scale:12.3f}{p[key] * scale:12.3f}"
            f"{ratio:8.3f}x"
        )
    sa, sp = s["adapterctl"], s["peft"]
    print(f"\nsingle: r=64 adapter on all 7 linear layers, from_pretrained x {sa['n']} (pooled)")
    print(f"{'':32}{'adapterctl':>12}{'PEFT':>12}{'ratio':>9}")
    for label, key, scale, unit in (
        ("median", "median_s", 1e3, "ms"),
        ("min", "min_s", 1e3, "ms"),
        ("max", "max_s", 1e3, "ms"),
        ("warm-up (untimed)", "warmup_s", 1e3, "ms"),
        ("peak RSS (child)", "peak_mib", 1, "MiB"),
    ):
        ratio = sa[key] / sp[key]
        print(
            f"{(label + ' [' + unit + ']'):32}{sa[key] * scale:12.3f}{sp[key] * scale:12.3f}"
            f"{ratio:8.3f}x"
        )
    print()
    w = max(len(t.name) for t in goals)
    print(f"{'target'.ljust(w)}  {'value':>9}  {'limit':>12}  {'status':<7}  detail")
    for t in goals:
        value, limit = _fmt(t.value, t.unit), "<= " + _fmt(t.limit, t.unit)
        status = "met" if t.met else "NOT MET"
        print(f"{t.name.ljust(w)}  {value:>9}  {limit:>12}  {status:<7}  {t.detail}")


def profile(env: dict[str, str], repeats: int) -> dict[str, str]:
    """adapterctl's timed sections under cProfile: top 15 cumulative adapterctl functions."""
    import io
    import pstats

    texts = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-prof-") as d:
        for kind, extra in (("multi", []), ("single", ["--repeats", str(repeats)])):
            path = Path(d) / f"{kind}.prof"
            run_child(
                ["--child", kind, "--engine", "adapterctl", "--profile-out", str(path), *extra],
                env,
            )
            stream = io.StringIO()
            stats = pstats.Stats(str(path), stream=stream)
            stats.sort_stats("cumulative").print_stats(r"[/\\]adapterctl[/\\]", 15)
            texts[kind] = stream.getvalue()
            what = "load_adapter a01..a23" if kind == "multi" else f"from_pretrained x {repeats}"
            print(f"\n--- cProfile, adapterctl {kind} ({what}), top 15 cumulative ---")
            print(texts[kind].strip())
    return texts


def _git() -> dict[str, Any]:
    """The commit measured (adapterctl is an editable checkout), and whether the tree was dirty."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "adapterctl")
    return {
        "commit": git("rev-parse", "HEAD"),
        "adapterctl_dirty": bool(status) if status is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="children per engine and measurement")
    parser.add_argument("--repeats", type=int, default=9, help="timed from_pretrained per child")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached base/adapters")
    parser.add_argument(
        "--build-only", action="store_true", help="build the base/adapters and exit"
    )
    parser.add_argument(
        "--profile", action="store_true", help="then profile adapterctl's timed sections (cProfile)"
    )
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("multi", "single"), help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_into:
        _build(args.build_into)
        return
    if args.child == "multi":
        print(json.dumps(_child_multi(args.engine, args.logits_out, args.profile_out)))
        return
    if args.child == "single":
        print(json.dumps(_child_single(args.engine, args.repeats, args.profile_out)))
        return
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")
    manifest = build(force=args.rebuild)
    if args.build_only:
        return
    if GNU_TIME is None:
        print(
            "warning: /usr/bin/time not found; peak RSS includes this process's own",
            file=sys.stderr,
        )
    env = child_env()
    git_before = _git()
    warm_page_cache()
    load_before = os.getloadavg()
    multi: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    single: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-logits-") as d:
        logits = {e: Path(d) / f"{e}.f32" for e in ENGINES}
        for rnd in range(args.rounds):
            order = ENGINES if rnd % 2 == 0 else ENGINES[::-1]  # alternate who goes first
            for e in order:
                argv = ["--child", "multi", "--engine", e]
                if rnd == 0:
                    argv += ["--logits-out", str(logits[e])]
                report, wall, peak = run_child(argv, env)
                if rnd == 0:
                    extra[f"{e}_a05_vs_a00_max_abs"] = report["a05_vs_a00_max_abs"]
                multi[e].append({**report, "wall_s": wall, "peak_mib": peak})
            for e in order:
                argv = ["--child", "single", "--engine", e, "--repeats", str(args.repeats)]
                report, wall, peak = run_child(argv, env)
                single[e].append({**report, "wall_s": wall, "peak_mib": peak})
            print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        diff = max_abs_diff(logits["adapterctl"], logits["peft"])
    print(
        f"correctness: {CHECK_ADAPTER} logits, max |adapterctl - PEFT| = {diff:.3e} "
        f"(a05 vs a00 differ by up to {extra['adapterctl_a05_vs_a00_max_abs']:.3e} in adapterctl, "
        f"{extra['peft_a05_vs_a00_max_abs']:.3e} in PEFT)"
    )
    commit = (git_before["commit"] or "?")[:12]
    print(
        f"adapterctl at {commit}{' (uncommitted changes)' if git_before['adapterctl_dirty'] else ''}"
    )
    m, s = summarize(multi, single)
    goals = targets(m, s, diff)
    print_report(m, s, goals, args.rounds)
    profiles = profile(env, args.repeats) if args.profile else None
    results = {
        "schema_version": 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "rss_method": "GNU time %M" if GNU_TIME else "os.wait4 ru_maxrss",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "versions": versions(),
        "git": git_before,
        "manifest": manifest,
        "correctness": {"max_abs_diff": diff, **extra},
        "multi": {"summary": m, "runs": multi},
        "single": {"summary": s, "runs": single},
        "targets": [t.to_dict() for t in goals],
        "profiles": profiles,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
