"""Benchmark for `combine`: 8 r=16 LoRAs on every linear layer of the 168M Llama, combined with
`cat` and with `svd --rank 32`, `adapterctl combine` side by side with PEFT, interleaved in fresh
children (`--runs` rounds, the order alternating):

  adapterctl  `adapterctl combine A0 ... A7 OUT --weights ... --method M [--rank 32]`
  PEFT        load the base, `PeftModel.from_pretrained` + 7 `load_adapter`,
              `add_weighted_adapter(..., combination_type=M, svd_rank=32)`, `save_pretrained` of
              the new adapter alone

Checked once: adapterctl's combined deltas against PEFT's (equal ranks and alphas, no rslora:
where PEFT is right), the largest relative difference per method.

Run with `make bench-combine` (or `.venv/bin/python -m benchmarks.combine [--runs N]`); `--quick`
runs a toy Llama once, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

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
    child_argv,
    interleaved,
    medians,
    print_targets,
    quiet_transformers,
    run_measured,
    side_by_side,
    write_results,
)

N = 8
FULL = {"llama": LLAMA_170M, "seed": 0, "adapters": N, "r": 16, "lora_alpha": 32, "lora_std": 0.02}
QUICK = {
    **FULL,
    "llama": TOY_LLAMA,
}
WEIGHTS = [round(1.0 / (i + 1), 4) for i in range(N)]
METHODS = {"cat": [], "svd": ["--rank", "32"]}
LIMITS = {"wall": 0.1, "rss": 0.1, "difference": 1e-5}


def names(count: int) -> list[str]:
    return ["default", *(f"a{i}" for i in range(1, count))]


def build(dest: str, spec_json: str) -> dict[str, Any]:
    """(In a child.) The base (float32) and `adapters` PEFT LoRAs on its linear layers, saved by
    PEFT in one folder (`default` at the root, the others in subfolders), factors N(0, std²)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(spec_json)
    quiet_transformers()
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(LlamaConfig(**spec["llama"]))
    model.save_pretrained(Path(dest) / "base")
    config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=LINEAR)
    adapters = names(spec["adapters"])
    peft_model = get_peft_model(model, config, adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.add_adapter(name, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, spec["lora_std"])
    peft_model.save_pretrained(Path(dest) / "adapters", selected_adapters=adapters)
    return {"adapters": adapters}


def peft_child(base: str, adapters: str, out: str, method: str, count: str) -> None:
    """PEFT's combination: the base and every adapter loaded, add_weighted_adapter, the new
    adapter saved."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    listed = names(int(count))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapters, adapter_name=listed[0])
    for name in listed[1:]:
        peft_model.load_adapter(str(Path(adapters) / name), adapter_name=name)
    rank = {"svd_rank": 32} if method == "svd" else {}
    peft_model.add_weighted_adapter(
        listed, WEIGHTS[: len(listed)], "combined", combination_type=method, **rank
    )
    peft_model.save_pretrained(out, selected_adapters=["combined"])


def difference(ours: Path, theirs: Path) -> dict[str, Any]:
    """The largest relative (Frobenius) difference between the two adapters' module deltas."""
    import numpy as np

    from adapterctl.format.config import LoraConfig
    from adapterctl.format.rawtensor import to_float64
    from adapterctl.format.tensors import SafetensorsReader

    def deltas(folder: Path) -> dict[str, Any]:
        config = LoraConfig.from_file(folder / "adapter_config.json")
        out = {}
        with SafetensorsReader(folder / "adapter_model.safetensors") as f:
            from adapterctl.format.rawtensor import FileStore

            store = FileStore(f)
            for key in store.specs():
                if key.endswith("lora_A.weight"):
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    a = to_float64(store.get(key))
                    b = to_float64(store.get(key.replace("lora_A", "lora_B")))
                    s = config.scaling(config.alpha_for(module), config.rank_for(module))
                    out[module] = s * (b @ a)
        return out

    theirs_folder = theirs / "combined" if (theirs / "combined").is_dir() else theirs
    a, p = deltas(ours), deltas(theirs_folder)
    worst, where = 0.0, ""
    for m in sorted(a.keys() & p.keys()):
        rel = float(np.linalg.norm(a[m] - p[m]) / max(np.linalg.norm(p[m]), 1e-30))
        if rel > worst:
            worst, where = rel, m
    return {"modules": len(a.keys() & p.keys()), "one_side": len(a.keys() ^ p.keys()),
            "max_relative_difference": worst, "worst_module": where}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="interleaved rounds (median; default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="a toy Llama, one round: a smoke run")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached fixture first")
    args = parser.parse_args()
    spec = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    suffix = "-quick" if args.quick else ""
    folder, manifest = cached(
        "combine" + suffix, spec, build, json.dumps(spec), rebuild=args.rebuild
    )
    base, adapters = folder / "base", folder / "adapters"
    sources = [str(adapters / name) for name in manifest["adapters"]]
    weights = ",".join(str(w) for w in WEIGHTS[: len(sources)])
    env = begin()
    run_measured([ADAPTERCTL, "--help"], env)  # compile the bytecode cache once
    work = OUT / "combine-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    keys = [(engine, method) for method in METHODS for engine in ("adapterctl", "peft")]
    kept: dict[tuple[str, str], Path] = {}

    def argv(engine: str, method: str, out: Path) -> list[str]:
        if engine == "adapterctl":
            return [ADAPTERCTL, "combine", *sources, str(out), "--weights", weights,
                    "--method", method, *METHODS[method]]  # fmt: skip
        return child_argv(peft_child, str(base), str(adapters), str(out), method, str(len(sources)))

    def measure(key: tuple[str, str], rnd: int) -> Figures:
        out = work / f"{key[0]}-{key[1]}-{rnd}"
        wall, peak, _ = run_measured(argv(*key, out), env)
        if key not in kept:
            kept[key] = out
        else:
            shutil.rmtree(out, ignore_errors=True)
        print(f"  {key[0]:10} {key[1]:4} {wall:7.2f} s {peak:7.0f} MiB", file=sys.stderr)
        return {"wall_s": wall, "peak_mib": peak}

    try:
        by_key = interleaved(runs, keys, measure, alternate=True)
        checked = {m: difference(kept[("adapterctl", m)], kept[("peft", m)]) for m in METHODS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = medians(by_key)
    goals = []
    for method in METHODS:
        a, p = med[("adapterctl", method)], med[("peft", method)]
        print(f"\n{method} ({len(sources)} adapters, r=16, all linear layers)")
        side_by_side(
            {"adapterctl": a, "PEFT": p},
            [Row("wall_s", "wall time", "s"), Row("peak_mib", "peak RSS", "MiB")],
        )
        c = checked[method]
        goals += [
            Target(f"{method}: wall time / PEFT", a["wall_s"] / p["wall_s"], "x", LIMITS["wall"],
                   f"{a['wall_s']:.2f} s / {p['wall_s']:.2f} s"),
            Target(f"{method}: peak RSS / PEFT", a["peak_mib"] / p["peak_mib"], "x",
                   LIMITS["rss"], f"{a['peak_mib']:.0f} MiB / {p['peak_mib']:.0f} MiB"),
            Target(f"{method}: max relative delta difference to PEFT",
                   c["max_relative_difference"], "", LIMITS["difference"], c["worst_module"]),
        ]  # fmt: skip
    print_targets(goals)
    write_results(
        "combine" + suffix,
        goals,
        runs={f"{e}-{m}": r for (e, m), r in by_key.items()},
        medians={f"{e}-{m}": f for (e, m), f in med.items()},
        against_peft=checked,
    )


if __name__ == "__main__":
    main()
