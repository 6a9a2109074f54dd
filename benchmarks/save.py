"""Benchmark for `save`: PiSSA (pissa_niter_4, r=16, all 7 linear layers) decomposition + save on the
170M Llama, adapterctl against PEFT, each in fresh children (median wall time, peak RSS).

Run with `make bench-save` (or `.venv/bin/python -m benchmarks.save [--runs N]`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from typing import Any

from benchmarks.common import (
    LINEAR,
    LLAMA_170M_DIR,
    Figures,
    Row,
    Target,
    begin,
    interleaved,
    llama_170m,
    medians,
    print_targets,
    quiet_transformers,
    run_child,
    side_by_side,
    write_results,
)

ENGINES = ("adapterctl", "peft")
CONFIG = {"r": 16, "lora_alpha": 16, "target_modules": LINEAR, "init_lora_weights": "pissa_niter_4"}


def child(engine: str, out: str) -> dict[str, float]:
    """Load the base, create the PiSSA adapter, save it; returns the timed part."""
    import torch
    from transformers import LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(LLAMA_170M_DIR))
    start = time.perf_counter()
    wrapped: Any
    if engine == "peft":
        from peft import LoraConfig, get_peft_model

        wrapped = get_peft_model(model, LoraConfig(**CONFIG))
    else:
        from adapterctl import LoraConfig, get_adapter_model

        wrapped = get_adapter_model(model, LoraConfig(**CONFIG))
    decomposed = time.perf_counter()
    wrapped.save_pretrained(out)
    done = time.perf_counter()
    return {"decompose_s": decomposed - start, "total_s": done - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="children per engine (median)")
    args = parser.parse_args()
    llama_170m()
    env = begin()

    def measure(engine: str, _: int) -> Figures:
        out = tempfile.mkdtemp(prefix="bench-save-")
        try:
            report, _, peak = run_child(child, engine, out, env=env)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return {**report, "peak_mib": peak}

    runs = interleaved(args.runs, ENGINES, measure, alternate=True)
    med = medians(runs)
    a, p = med["adapterctl"], med["peft"]
    print()
    side_by_side(med, [Row("decompose_s", "decomposition", "s"),
                       Row("total_s", "decomposition + save", "s"),
                       Row("peak_mib", "peak RSS", "MiB")])  # fmt: skip
    goals = [
        Target("decomposition + save time / PEFT", a["total_s"] / p["total_s"], "x", 1.0,
               f"{a['total_s']:.2f} s / {p['total_s']:.2f} s"),
        Target("peak RSS / PEFT", a["peak_mib"] / p["peak_mib"], "x", 1.0,
               f"{a['peak_mib']:.0f} MiB / {p['peak_mib']:.0f} MiB"),
    ]  # fmt: skip
    print_targets(goals)
    write_results("save", goals, runs=runs, medians=med)


if __name__ == "__main__":
    main()
