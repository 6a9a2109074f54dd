"""Benchmark for `extract`: a rank-16 LoRA extracted from a full fine-tune, `adapterctl extract`
side by side with mergekit's `mergekit-extract-lora`, in one run.

The inputs (built once, cached in benchmarks/out/extract/): two float32 copies of the 168M Llama,
saved with `save_pretrained` (safetensors). BASE is the random init (seed 0, as
`common.llama_170m`); TUNED is BASE plus, on every linear layer (q, k, v, o, gate, up, down of every
decoder layer), a rank-16 delta U @ V (seeded; entries of about `delta_std`) and Gaussian noise
(`noise_std`). The true factors are kept (`delta.safetensors`), and so is the best error any rank-16
adapter can reach (Eckart-Young: the tail of each module's singular values, in the manifest).

Measured in fresh children, interleaved (`--runs` rounds, the order alternating):

  adapterctl  `adapterctl extract BASE TUNED OUT --rank 16`
  mergekit    `mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank 16
              -e embed_tokens -e lm_head --skip-undecomposable --quiet` (CPU, its default; float32
              out, as its inputs), from its own cached environment (benchmarks/mergekit_env.py)

Each engine's first output is then read back with safetensors: its delta s * B @ A per module
(s from the config's lora_alpha / r, rank_pattern and alpha_pattern) against TUNED - BASE, as the
relative Frobenius error per module and overall; the error against the true rank-16 delta is
reported too. Goals (issue #15): wall time <= 0.5x mergekit's, peak RSS <= 0.2x, error no worse
(within 0.1 %: see LIMITS).

Until the `extract` command exists, the adapterctl side is skipped with a message and mergekit is
measured alone. Run with `make bench-extract` (or `.venv/bin/python -m benchmarks.extract
[--runs N]`); `--quick` runs a toy Llama once, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import mergekit_env
from benchmarks.common import (
    ADAPTERCTL,
    LINEAR,
    LLAMA_170M,
    OUT,
    TOY_LLAMA,
    Figures,
    Row,
    Target,
    begin,
    cached,
    interleaved,
    medians,
    print_targets,
    quiet_transformers,
    require_disk,
    run_child,
    run_measured,
    side_by_side,
    tensor_files,
    warm_page_cache,
    write_results,
)

RANK = 16
#: the full run: the 168M Llama (seed 0) and a rank-16 change plus noise on every linear layer
FULL = {
    "llama": LLAMA_170M,
    "seed": 0,
    "delta_rank": RANK,
    "delta_std": 2e-3,  # the delta's entries (the weights' are 0.02)
    "noise_std": 2e-4,
    "delta_seed": 1,
    "targets": LINEAR,
}
#: `--quick`: the same at toy sizes
QUICK = {
    **FULL,
    "llama": TOY_LLAMA,
}
ENGINES = ("adapterctl", "mergekit")
#: error: "no worse" than mergekit's (the excess of their ratio over 1), whose exact SVD reaches the
#: best rank-16 error (Eckart-Young), with 0.1 % for rounding and a randomized range finder's slack
LIMITS = {"wall": 0.5, "rss": 0.2, "error": 1e-3}

# -- the fixture -------------------------------------------------------------------------------


def build(dest: str, spec_json: str) -> dict[str, Any]:
    """(In a child.) BASE and TUNED saved with `save_pretrained`, the true factors U, V of each
    linear layer's rank-r delta in delta.safetensors (`MODULE.U`, `MODULE.V`), and the best
    rank-r error: per module the relative Frobenius norm of the tail of TUNED - BASE's singular
    values (float64, from the float32 weights as saved)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(spec_json)
    quiet_transformers()
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(LlamaConfig(**spec["llama"]))
    model.save_pretrained(Path(dest) / "base")
    r, targets = spec["delta_rank"], spec["targets"]
    # entries of U @ V have standard deviation factor_std² * sqrt(r)
    factor_std = math.sqrt(spec["delta_std"] / math.sqrt(r))
    gen = torch.Generator().manual_seed(spec["delta_seed"])
    factors: dict[str, torch.Tensor] = {}
    best: dict[str, float] = {}
    tail2 = total2 = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] not in targets:
                continue
            w = module.weight
            d_out, d_in = w.shape
            u = torch.randn(d_out, r, generator=gen) * factor_std
            v = torch.randn(r, d_in, generator=gen) * factor_std
            before = w.detach().clone()
            w += u @ v + torch.randn(d_out, d_in, generator=gen) * spec["noise_std"]
            factors[f"{name}.U"], factors[f"{name}.V"] = u, v
            s2 = torch.linalg.svdvals(w.double() - before.double()) ** 2
            tail, total = float(s2[r:].sum()), float(s2.sum())
            best[name] = math.sqrt(tail / total)
            tail2, total2 = tail2 + tail, total2 + total
    model.save_pretrained(Path(dest) / "tuned")
    save_file(factors, str(Path(dest) / "delta.safetensors"))
    sizes = [f.stat().st_size for f in (Path(dest) / "base").glob("*.safetensors")]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "modules": len(best),
        "checkpoint_bytes": sum(sizes),
        "best_error": math.sqrt(tail2 / total2),
        "best_error_per_module": best,
    }


# -- the error of an extracted adapter ---------------------------------------------------------


def delta_error(adapter: str, fixture: str) -> dict[str, Any]:
    """(In a child.) The adapter's delta against TUNED - BASE and against the true delta U @ V,
    module by module (one module's tensors in memory at a time, float64): relative Frobenius
    errors per module and overall (the root of the summed squared differences over the root of
    the summed squared norms). A targeted module the adapter lacks counts with a zero delta."""
    import numpy as np
    from safetensors import safe_open

    from adapterctl.format.config import LoraConfig
    from adapterctl.format.keys import classify

    folder, root = Path(adapter), Path(fixture)
    config = LoraConfig.from_file(folder / "adapter_config.json")
    base_files, tuned_files = tensor_files(root / "base"), tensor_files(root / "tuned")
    per_module: dict[str, dict[str, float]] = {}
    sums = {"diff_tuned": 0.0, "norm_tuned": 0.0, "diff_true": 0.0, "norm_true": 0.0}
    problems: list[str] = []

    def tensor(file: Path, name: str) -> Any:
        with safe_open(str(file), framework="np") as f:
            return f.get_tensor(name).astype(np.float64)

    with safe_open(str(folder / "adapter_model.safetensors"), framework="np") as f:
        keys = list(f.keys())
        modules = {i.module for i in map(classify, keys) if i.kind == "lora_A"}
        with safe_open(str(root / "delta.safetensors"), framework="np") as d:
            true_modules = {k.removesuffix(".U") for k in d.keys() if k.endswith(".U")}  # noqa: SIM118
            for module in sorted(modules | true_modules):
                name = module + ".weight"
                target = tensor(tuned_files[name], name) - tensor(base_files[name], name)
                if module in modules:
                    a = f.get_tensor(f"base_model.model.{module}.lora_A.weight")
                    b = f.get_tensor(f"base_model.model.{module}.lora_B.weight")
                    r = config.rank_for(module)
                    if a.shape[0] != r:
                        problems.append(f"{module}: lora_A has rank {a.shape[0]}, config {r}")
                    scaling = config.scaling(config.alpha_for(module), r)
                    ours = (b.astype(np.float64) @ a.astype(np.float64)) * scaling
                else:
                    problems.append(f"{module}: missing from the adapter")
                    ours = np.zeros_like(target)
                true = (
                    d.get_tensor(f"{module}.U").astype(np.float64)
                    @ d.get_tensor(f"{module}.V").astype(np.float64)
                    if module in true_modules
                    else np.zeros_like(target)
                )
                diff_tuned = float(np.linalg.norm(ours - target)) ** 2
                norm_tuned = float(np.linalg.norm(target)) ** 2
                diff_true = float(np.linalg.norm(ours - true)) ** 2
                norm_true = float(np.linalg.norm(true)) ** 2
                per_module[module] = {
                    "error": math.sqrt(diff_tuned / norm_tuned) if norm_tuned else 0.0,
                    "error_vs_true_delta": math.sqrt(diff_true / norm_true) if norm_true else 0.0,
                }
                sums["diff_tuned"] += diff_tuned
                sums["norm_tuned"] += norm_tuned
                sums["diff_true"] += diff_true
                sums["norm_true"] += norm_true
    worst = max(per_module, key=lambda m: per_module[m]["error"])
    return {
        "error": math.sqrt(sums["diff_tuned"] / sums["norm_tuned"]),
        "error_vs_true_delta": math.sqrt(sums["diff_true"] / sums["norm_true"]),
        "worst_module": worst,
        "worst_module_error": per_module[worst]["error"],
        "modules": len(modules),
        "other_tensors": sorted(k for k in keys if not classify(k).is_lora),
        "problems": problems,
        "adapter_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "per_module": per_module,
    }


# -- the runs ------------------------------------------------------------------------------------


def adapterctl_extract_missing() -> str | None:
    """Why the adapterctl side cannot run (no `extract` command in this checkout), or None."""
    done = subprocess.run(
        [ADAPTERCTL, "extract", "--help"], capture_output=True, text=True, check=False
    )
    if done.returncode == 0:
        return None
    last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
    return f"`adapterctl extract --help` exited {done.returncode}: {last[0].strip(' │.')}"


def engine_argv(engine: str, base: Path, tuned: Path, out: Path) -> list[str]:
    if engine == "adapterctl":
        return [ADAPTERCTL, "extract", str(base), str(tuned), str(out), "--rank", str(RANK)]
    return [
        mergekit_env.executable("mergekit-extract-lora"),
        "--model", str(tuned),
        "--base-model", str(base),
        "--out-path", str(out),
        "--max-rank", str(RANK),
        "-e", "embed_tokens",
        "-e", "lm_head",
        "--skip-undecomposable",
        "--quiet",
    ]  # fmt: skip


def measure_rounds(
    engines: tuple[str, ...], base: Path, tuned: Path, work: Path, runs: int, env: dict[str, str]
) -> tuple[dict[str, list[Figures]], dict[str, Path]]:
    """`runs` interleaved rounds of `engines` (the order alternating); each engine's first output
    is kept (returned; the caller deletes `work`), the others deleted after their run."""
    kept: dict[str, Path] = {}

    def measure(engine: str, rnd: int) -> Figures:
        out = work / f"{engine}-{rnd}"
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, _ = run_measured(engine_argv(engine, base, tuned, out), env)
        if engine not in kept:
            kept[engine] = out
        else:
            shutil.rmtree(out, ignore_errors=True)
        print(f"  {engine:10} {wall:7.2f} s {peak:7.0f} MiB", file=sys.stderr, flush=True)
        return {"wall_s": wall, "peak_mib": peak}

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return interleaved(runs, engines, measure, alternate=True), kept


def report(
    med: dict[str, Figures],
    errors: dict[str, dict[str, Any]],
    manifest: dict[str, Any],
    skipped: str | None,
) -> list[Target]:
    print(
        f"\nBASE, TUNED: {manifest['checkpoint_bytes'] / 1e6:.0f} MB float32 each; "
        f"{manifest['modules']} linear modules changed (rank {RANK} + noise); "
        f"best rank-{RANK} error {manifest['best_error']:.6f}\n"
    )
    figures = {
        e: {
            **med[e],
            "error": errors[e]["error"],
            "error_vs_true_delta": errors[e]["error_vs_true_delta"],
            "adapter_mib": errors[e]["adapter_bytes"] / 2**20,
        }
        for e in med
    }
    side_by_side(
        figures,
        [
            Row("wall_s", "wall time", "s"),
            Row("peak_mib", "peak RSS", "MiB"),
            Row("error", "error vs TUNED - BASE", ""),
            Row("error_vs_true_delta", "error vs true delta", ""),
            Row("adapter_mib", "adapter size", "MiB"),
        ],
    )
    for engine, e in errors.items():
        others = e["other_tensors"]
        extra = f"; other tensors: {', '.join(others[:3])}" if others else ""
        problems = f"; PROBLEMS: {'; '.join(e['problems'][:3])}" if e["problems"] else ""
        print(
            f"{engine}: {e['modules']} modules; worst {e['worst_module']} "
            f"({e['worst_module_error']:.6f}){extra}{problems}"
        )
    if skipped is not None:
        print(f"\nadapterctl skipped: {skipped}; no ratios")
        return []
    a, m = figures["adapterctl"], figures["mergekit"]
    goals = [
        Target("wall time / mergekit", a["wall_s"] / m["wall_s"], "x", LIMITS["wall"],
               f"{a['wall_s']:.2f} s / {m['wall_s']:.2f} s"),
        Target("peak RSS / mergekit", a["peak_mib"] / m["peak_mib"], "x", LIMITS["rss"],
               f"{a['peak_mib']:.0f} MiB / {m['peak_mib']:.0f} MiB"),
        Target("error / mergekit's - 1", a["error"] / m["error"] - 1, "", LIMITS["error"],
               f"{a['error']:.8f} / {m['error']:.8f}"),
        Target("modules missing or misconfigured (adapterctl)",
               len(errors["adapterctl"]["problems"]), "", 0,
               "; ".join(errors["adapterctl"]["problems"][:2])),
    ]  # fmt: skip
    print_targets(goals)
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="interleaved rounds (median; default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="a toy Llama, one round: a smoke run")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached fixture first")
    args = parser.parse_args()
    spec = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    suffix = "-quick" if args.quick else ""

    mergekit_env.build()
    folder, manifest = cached(
        "extract" + suffix, spec, build, json.dumps(spec), rebuild=args.rebuild
    )
    base, tuned = folder / "base", folder / "tuned"
    skipped = adapterctl_extract_missing()
    if skipped is not None:
        print(f"adapterctl side skipped: {skipped}; measuring mergekit alone", file=sys.stderr)
    engines = ENGINES if skipped is None else ("mergekit",)
    require_disk(OUT, 2 * manifest["checkpoint_bytes"], "the extracted adapters need")
    env = begin()
    warm_page_cache(base, tuned)
    if skipped is None:
        run_measured([ADAPTERCTL, "--help"], env)  # compile the bytecode cache once
    work = OUT / ("extract-out" + suffix)
    try:
        by_engine, kept = measure_rounds(engines, base, tuned, work, runs, env)
        errors = {e: run_child(delta_error, str(kept[e]), str(folder), env=env)[0] for e in kept}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = medians(by_engine)
    goals = report(med, errors, manifest, skipped)
    write_results(
        "extract" + suffix,
        goals,
        runs=by_engine,
        medians=med,
        errors=errors,
        adapterctl_skipped=skipped,
        mergekit={"pins": [mergekit_env.TORCH, mergekit_env.MERGEKIT],
                  "argv": engine_argv("mergekit", base, tuned, Path("OUT"))[1:]},
        manifest={k: v for k, v in manifest.items() if k != "best_error_per_module"},
        best_error_per_module=manifest["best_error_per_module"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
