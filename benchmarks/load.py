"""adapterctl engine load benchmarks: adapters into a live Llama, side by side with PEFT.

Run with `make bench-load` (or `.venv/bin/python -m benchmarks.load [--rounds N]`). See
benchmarks/README.md.

Two measurements, each made in fresh child interpreters (one per engine per measurement and round,
so the engines never share a process, a cache or an allocator):

  multi   one base, 24 different adapters loaded one after another: `from_pretrained` (a00), then
          `load_adapter` for a01..a23, each call timed on its own
  single  one r=64 adapter on all seven linear layers: `from_pretrained` on the same loaded base,
          repeated (each followed by an untimed `unload()`), after one untimed warm-up

This process never imports torch: the base, the adapters and every measurement come from child
processes. The base (benchmarks/out/llama-170m/) and the adapters (benchmarks/out/load/) are
built once and cached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LINEAR,
    LLAMA_170M,
    LLAMA_170M_DIR,
    OUT,
    Figures,
    Row,
    Target,
    begin,
    cached,
    git_state,
    interleaved,
    llama_170m,
    print_targets,
    quiet_transformers,
    run_child,
    side_by_side,
    write_results,
)

FIXTURE = OUT / "load"
MULTI = FIXTURE / "adapters"
SINGLE = FIXTURE / "r64"
ENGINES = ("adapterctl", "peft")
N_MULTI = 24
CHECK_ADAPTER = "a05"
CHECK_TOKENS = 16

# What gets built. Changing it invalidates the cache (the manifest records it).
SPEC: dict[str, Any] = {
    "version": 2,
    "llama": LLAMA_170M,
    # a00..a23: rank 8 + (i % 17), on these modules
    "multi": {"count": N_MULTI, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "single": {"rank": 64, "target_modules": LINEAR},
    # every LoRA tensor (B included, which LoRA starts at zero) is drawn from N(0, std^2)
    "lora_std": 0.02,
}


def multi_rank(i: int) -> int:
    return 8 + (i % 17)


def multi_name(i: int) -> str:
    return f"a{i:02d}"


# -- children: the build and the two measurements --------------------------------------------


def build(dest: str) -> dict[str, Any]:
    """(In a child.) The 24 adapters and the r=64 one, each with its own seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    quiet_transformers()
    base = LlamaForCausalLM.from_pretrained(llama_170m()).eval()

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
        base = save(base, config, 1000 + i, Path(dest) / "adapters" / multi_name(i))
    print(f"saved {multi['count']} adapters ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    single = SPEC["single"]
    config = LoraConfig(
        r=single["rank"], target_modules=single["target_modules"], task_type="CAUSAL_LM"
    )
    save(base, config, 2000, Path(dest) / "r64")
    return {
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "base_bytes": sum(f.stat().st_size for f in LLAMA_170M_DIR.glob("*.safetensors")),
        "multi_bytes": [
            (Path(dest) / "adapters" / multi_name(i) / "adapter_model.safetensors").stat().st_size
            for i in range(multi["count"])
        ],
        "single_bytes": (Path(dest) / "r64" / "adapter_model.safetensors").stat().st_size,
    }


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
    base = LlamaForCausalLM.from_pretrained(LLAMA_170M_DIR, dtype=torch.float32).eval()
    return base, time.perf_counter() - t0


def _profiler(path: str) -> Any:
    if not path:
        return None
    import cProfile

    return cProfile.Profile()


def child_multi(engine: str, logits_path: str = "", profile_path: str = "") -> dict[str, Any]:
    """24 adapters onto one base: from_pretrained(a00), then load_adapter(a01..a23), each timed."""
    import gc

    import torch

    quiet_transformers()
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
    if logits_path:
        Path(logits_path).write_bytes(logits.contiguous().numpy().tobytes())
    return {
        "base_load_s": base_s,
        "from_pretrained_s": first_s,
        "load_s": times,
        "a05_vs_a00_max_abs": (logits - other).abs().max().item(),
    }


def child_single(engine: str, repeats: str, profile_path: str = "") -> dict[str, Any]:
    """from_pretrained of the r=64 adapter on the same loaded base, `repeats` times (+1 warm-up)."""
    import gc

    quiet_transformers()
    cls = _engine(engine)
    base, base_s = _load_base()
    n_modules = sum(1 for _ in base.modules())
    t0 = time.perf_counter()
    base = cls.from_pretrained(base, SINGLE).unload()  # warm-up
    warmup_s = time.perf_counter() - t0
    prof = _profiler(profile_path)
    times = []
    for _ in range(int(repeats)):
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


# -- the parent --------------------------------------------------------------------------------


def warm_page_cache() -> None:
    """Read every file once, so that no engine pays for a cold disk (done in chunks: this process
    stays small)."""
    for root in (LLAMA_170M_DIR, MULTI, SINGLE):
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


def summarize(
    multi: dict[str, list[dict[str, Any]]], single: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, Figures], dict[str, Figures]]:
    """Per engine: the multi figures (medians over rounds) and the single figures (pooled)."""
    med = statistics.median
    m: dict[str, Figures] = {}
    for e, runs in multi.items():
        m[e] = {
            "from_pretrained_s": med([r["from_pretrained_s"] for r in runs]),
            "first_s": med([r["load_s"][0] for r in runs]),
            "last_s": med([r["load_s"][-1] for r in runs]),
            "load_adapter_sum_s": med([sum(r["load_s"]) for r in runs]),
            "total_s": med([r["from_pretrained_s"] + sum(r["load_s"]) for r in runs]),
            "base_load_s": med([r["base_load_s"] for r in runs]),
            "peak_mib": med([r["peak_mib"] for r in runs]),
        }
        m[e]["last_over_first"] = m[e]["last_s"] / m[e]["first_s"]
    s: dict[str, Figures] = {}
    for e, runs in single.items():
        pooled = [t for r in runs for t in r["times_s"]]
        s[e] = {
            "median_s": med(pooled),
            "min_s": min(pooled),
            "max_s": max(pooled),
            "n": len(pooled),
            "warmup_s": med([r["warmup_s"] for r in runs]),
            "peak_mib": med([r["peak_mib"] for r in runs]),
        }
    return m, s


MULTI_ROWS = [
    Row("from_pretrained_s", "from_pretrained (a00)", "ms"),
    Row("first_s", "first load_adapter (a01)", "ms"),
    Row("last_s", "last load_adapter (a23)", "ms"),
    Row("last_over_first", "last / first", "x"),
    Row("load_adapter_sum_s", "sum of 23 load_adapter", "s"),
    Row("total_s", "total of 24 loads", "s"),
    Row("peak_mib", "peak RSS (child)", "MiB"),
    Row("base_load_s", "base from_pretrained (untimed)", "s"),
]
SINGLE_ROWS = [
    Row("median_s", "median", "ms"),
    Row("min_s", "min", "ms"),
    Row("max_s", "max", "ms"),
    Row("warmup_s", "warm-up (untimed)", "ms"),
    Row("peak_mib", "peak RSS (child)", "MiB"),
]


def targets(m: dict[str, Figures], s: dict[str, Figures], diff: float) -> list[Target]:
    a, p = m["adapterctl"], m["peft"]
    sa, sp = s["adapterctl"], s["peft"]
    return [
        Target("multi: total of 24 loads, adapterctl / PEFT", a["total_s"] / p["total_s"], "x",
               0.5, f"{a['total_s']:.3f} s / {p['total_s']:.3f} s"),
        Target("multi: adapterctl last load_adapter / first", a["last_over_first"], "x", 1.3,
               f"a23 {a['last_s'] * 1e3:.1f} ms / a01 {a['first_s'] * 1e3:.1f} ms"),
        Target("single r=64: from_pretrained median, adapterctl / PEFT",
               sa["median_s"] / sp["median_s"], "x", 0.5,
               f"{sa['median_s'] * 1e3:.1f} ms / {sp['median_s'] * 1e3:.1f} ms"),
        Target(f"{CHECK_ADAPTER} logits, max |adapterctl - PEFT|", diff, "", 1e-4,
               f"input_ids=arange({CHECK_TOKENS}), set_adapter({CHECK_ADAPTER!r})"),
    ]  # fmt: skip


def profile(env: dict[str, str], repeats: int) -> dict[str, str]:
    """adapterctl's timed sections under cProfile: top 15 cumulative adapterctl functions."""
    import io
    import pstats

    texts = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-prof-") as d:
        for kind in ("multi", "single"):
            path = str(Path(d) / f"{kind}.prof")
            if kind == "multi":
                run_child(child_multi, "adapterctl", "", path, env=env)
            else:
                run_child(child_single, "adapterctl", str(repeats), path, env=env)
            stream = io.StringIO()
            stats = pstats.Stats(path, stream=stream)
            stats.sort_stats("cumulative").print_stats(r"[/\\]adapterctl[/\\]", 15)
            texts[kind] = stream.getvalue()
            what = "load_adapter a01..a23" if kind == "multi" else f"from_pretrained x {repeats}"
            print(f"\n--- cProfile, adapterctl {kind} ({what}), top 15 cumulative ---")
            print(texts[kind].strip())
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="children per engine and measurement")
    parser.add_argument("--repeats", type=int, default=9, help="timed from_pretrained per child")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached adapters")
    parser.add_argument("--build-only", action="store_true", help="build the fixtures and exit")
    parser.add_argument(
        "--profile", action="store_true", help="then profile adapterctl's timed sections (cProfile)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")
    llama_170m()
    _, manifest = cached("load", SPEC, build, rebuild=args.rebuild)
    if args.build_only:
        return
    env = begin()
    git = git_state()
    warm_page_cache()
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-logits-") as d:
        logits = {e: Path(d) / f"{e}.f32" for e in ENGINES}

        def measure(key: tuple[str, str], rnd: int) -> dict[str, Any]:
            kind, engine = key
            if kind == "multi":
                out = str(logits[engine]) if rnd == 0 else ""
                report, wall, peak = run_child(child_multi, engine, out, env=env)
                if rnd == 0:
                    extra[f"{engine}_a05_vs_a00_max_abs"] = report["a05_vs_a00_max_abs"]
            else:
                report, wall, peak = run_child(child_single, engine, str(args.repeats), env=env)
            return {**report, "wall_s": wall, "peak_mib": peak}

        keys = [(kind, e) for kind in ("multi", "single") for e in ENGINES]
        runs = interleaved(args.rounds, keys, measure, alternate=True)
        diff = max_abs_diff(logits["adapterctl"], logits["peft"])
    multi = {e: runs[("multi", e)] for e in ENGINES}
    single = {e: runs[("single", e)] for e in ENGINES}
    print(
        f"correctness: {CHECK_ADAPTER} logits, max |adapterctl - PEFT| = {diff:.3e} "
        f"(a05 vs a00 differ by up to {extra['adapterctl_a05_vs_a00_max_abs']:.3e} in adapterctl, "
        f"{extra['peft_a05_vs_a00_max_abs']:.3e} in PEFT)"
    )
    dirty = " (uncommitted changes)" if git["adapterctl_dirty"] else ""
    print(f"adapterctl at {(git['commit'] or '?')[:12]}{dirty}")
    m, s = summarize(multi, single)
    print(
        f"\nmulti: 24 adapters (r 8..24; q, v, down) onto one base, median of {args.rounds} children"
    )
    side_by_side(m, MULTI_ROWS)
    n = int(s["adapterctl"]["n"])
    print(f"\nsingle: r=64 adapter on all 7 linear layers, from_pretrained x {n} (pooled)")
    side_by_side(s, SINGLE_ROWS)
    goals = targets(m, s, diff)
    print_targets(goals)
    profiles = profile(env, args.repeats) if args.profile else None
    write_results(
        "load",
        goals,
        rounds=args.rounds,
        repeats=args.repeats,
        manifest=manifest,
        correctness={"max_abs_diff": diff, **extra},
        multi={"summary": m, "runs": multi},
        single={"summary": s, "runs": single},
        profiles=profiles,
    )


if __name__ == "__main__":
    main()
