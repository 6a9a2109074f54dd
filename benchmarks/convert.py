"""Benchmark for `convert`: a trained PiSSA checkpoint (pissa_niter_4, r=16, all 7 linear layers) of the
170M Llama converted to plain LoRA from a terminal, adapterctl against PEFT's way (a script that loads
the base and the trained adapter and saves with `path_initial_model_for_weight_conversion`), in
fresh children interleaved (median wall time and peak RSS); then the two outputs' factors compared.

Run with `make bench-convert` (or `.venv/bin/python -m benchmarks.convert [--runs N]`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import (
    ADAPTERCTL,
    LINEAR,
    LLAMA_170M,
    LLAMA_170M_DIR,
    OUT,
    Figures,
    Row,
    Target,
    begin,
    cached,
    child_argv,
    interleaved,
    llama_170m,
    medians,
    print_targets,
    quiet_transformers,
    run_measured,
    side_by_side,
    write_results,
)

PAIR = OUT / "convert-pissa"
ENGINES = ("adapterctl", "peft")
SPEC = {"r": 16, "targets": LINEAR, "init": "pissa_niter_4", "seeds": [0, 1], "llama": LLAMA_170M}


def build(dest: str) -> None:
    """(In a child.) PEFT: the initial adapter (saved with init_lora_weights true, as PEFT's docs
    do) and the "trained" one (every factor moved, as training would)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(llama_170m())),
        LoraConfig(r=16, lora_alpha=16, target_modules=LINEAR, init_lora_weights="pissa_niter_4"),
    )
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(Path(dest) / "init"))
    model.peft_config["default"].init_lora_weights = "pissa_niter_4"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(Path(dest) / "trained"))


def peft_child(out: str) -> None:
    """PEFT's way: load the base and the trained adapter, save converted."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(str(LLAMA_170M_DIR))
    model = PeftModel.from_pretrained(model, str(PAIR / "trained"))
    model.save_pretrained(out, path_initial_model_for_weight_conversion=str(PAIR / "init"))


def _same_factors(ours: Path, theirs: Path) -> tuple[int, int]:
    """(factors compared, factors bit-identical) over every tensor PEFT wrote."""
    from safetensors.numpy import load_file

    a, b = (
        load_file(ours / "adapter_model.safetensors"),
        load_file(theirs / "adapter_model.safetensors"),
    )
    same = sum(k in a and a[k].tobytes() == v.tobytes() for k, v in b.items())
    return len(b), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="children per engine (median)")
    args = parser.parse_args()
    llama_170m()
    cached(PAIR.name, SPEC, build)
    env = begin()
    argv = {
        "adapterctl": lambda out: [ADAPTERCTL, "convert", str(PAIR / "trained"), out,
                                   "--initial", str(PAIR / "init")],
        "peft": lambda out: child_argv(peft_child, out),
    }  # fmt: skip
    kept: dict[str, Path] = {}

    def measure(engine: str, _: int) -> Figures:
        out = Path(tempfile.mkdtemp(prefix="bench-convert-")) / "out"
        wall, peak, _ = run_measured(argv[engine](str(out)), env)
        if engine in kept:
            shutil.rmtree(out.parent, ignore_errors=True)
        else:
            kept[engine] = out
        return {"wall_s": wall, "peak_mib": peak}

    try:
        runs = interleaved(args.runs, ENGINES, measure, alternate=True)
        compared, identical = _same_factors(kept["adapterctl"], kept["peft"])
    finally:
        for out in kept.values():
            shutil.rmtree(out.parent, ignore_errors=True)
    med = medians(runs)
    a, p = med["adapterctl"], med["peft"]
    size = (PAIR / "trained" / "adapter_model.safetensors").stat().st_size
    print(f"\ntrained adapter: {size / 2**20:.1f} MiB; factors bit-identical to PEFT's: "
          f"{identical}/{compared}\n")  # fmt: skip
    side_by_side(med, [Row("wall_s", "wall time", "s"), Row("peak_mib", "peak RSS", "MiB")])
    goals = [
        Target("convert wall time / PEFT's way", a["wall_s"] / p["wall_s"], "x", 0.05,
               f"{a['wall_s']:.3f} s / {p['wall_s']:.2f} s"),
        Target("peak RSS / PEFT's way", a["peak_mib"] / p["peak_mib"], "x", 0.15,
               f"{a['peak_mib']:.0f} MiB / {p['peak_mib']:.0f} MiB"),
        Target("factors differing from PEFT's", compared - identical, "", 0,
               f"{identical}/{compared} bit-identical"),
    ]  # fmt: skip
    print_targets(goals)
    write_results(
        "convert",
        goals,
        runs=runs,
        medians=med,
        adapter_bytes=size,
        factors={"compared": compared, "bit_identical": identical},
    )


if __name__ == "__main__":
    main()
