"""Benchmark for `save`: PiSSA (pissa_niter_4, r=16, all 7 linear layers) decomposition + save on the
170M Llama, adapterctl against PEFT, each in fresh children (median wall time, peak RSS).

Run with `make bench-save` (or `.venv/bin/python benchmarks/save.py [--runs N]`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

from common import (
    LLAMA_170M_DIR,
    Target,
    build_llama_170m,
    child_env,
    medians,
    report_side_by_side,
    run_measured,
)

BASE = LLAMA_170M_DIR
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = {
    "r": 16,
    "lora_alpha": 16,
    "target_modules": TARGETS,
    "init_lora_weights": "pissa_niter_4",
}


def _child(engine: str, out: str) -> None:
    """Load the base, create the PiSSA adapter, save it; prints the timed part as JSON."""
    import warnings

    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(BASE))
    start = time.perf_counter()
    if engine == "peft":
        from peft import LoraConfig, get_peft_model

        wrapped = get_peft_model(model, LoraConfig(**CONFIG))
    else:
        from adapterctl import LoraConfig, get_adapter_model

        wrapped = get_adapter_model(model, LoraConfig(**CONFIG))
    decomposed = time.perf_counter()
    wrapped.save_pretrained(out)
    done = time.perf_counter()
    print(json.dumps({"decompose_s": decomposed - start, "total_s": done - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="children per engine (median)")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    build_llama_170m()
    env = child_env()
    results: dict[str, list[dict[str, float]]] = {"adapterctl": [], "peft": []}
    for i in range(args.runs):
        for engine in ("adapterctl", "peft") if i % 2 == 0 else ("peft", "adapterctl"):
            out = tempfile.mkdtemp(prefix="bench-save-")
            try:
                _, peak, stdout = run_measured(
                    [sys.executable, __file__, "--child", engine, out], env, capture=True
                )
            finally:
                shutil.rmtree(out, ignore_errors=True)
            results[engine].append({**json.loads(stdout.splitlines()[-1]), "peak_mib": peak})
        print(f"  run {i + 1}/{args.runs} done", flush=True)
    med = medians(results)
    a, p = med["adapterctl"], med["peft"]
    goals = [
        Target("decomposition + save time / PEFT", a["total_s"] / p["total_s"], "x", 1.0,
               f"{a['total_s']:.2f} s / {p['total_s']:.2f} s"),
        Target("peak RSS / PEFT", a["peak_mib"] / p["peak_mib"], "x", 1.0,
               f"{a['peak_mib']:.0f} MiB / {p['peak_mib']:.0f} MiB"),
    ]  # fmt: skip
    report_side_by_side("save", med, goals, results)


if __name__ == "__main__":
    main()
