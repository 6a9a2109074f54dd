"""Benchmark for `convert`: a trained PiSSA checkpoint (pissa_niter_4, r=16, all 7 linear layers) of the
170M Llama converted to plain LoRA from a terminal, adapterctl against PEFT's way (a script that loads
the base and the trained adapter and saves with `path_initial_model_for_weight_conversion`), in
fresh children interleaved (median wall time and peak RSS); then the two outputs' factors compared.

Run with `make bench-convert` (or `.venv/bin/python benchmarks/convert.py [--runs N]`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import (
    OUT,
    Target,
    build_llama_170m,
    child_env,
    medians,
    report_side_by_side,
    run_measured,
)

PAIR = OUT / "convert-pissa"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERCTL = str(Path(sys.executable).with_name("adapterctl"))


def _prepare(base: Path) -> None:
    """PEFT: the initial adapter (saved with init_lora_weights true, as PEFT's docs do) and the
    "trained" one (every factor moved, as training would), once per build spec."""
    spec = PAIR / "spec.json"
    wanted = json.dumps({"r": 16, "targets": TARGETS, "init": "pissa_niter_4", "seeds": [0, 1]})
    if spec.is_file() and spec.read_text() == wanted:
        return
    shutil.rmtree(PAIR, ignore_errors=True)
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="pissa_niter_4"),
    )
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(PAIR / "init"))
    model.peft_config["default"].init_lora_weights = "pissa_niter_4"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(PAIR / "trained"))
    spec.write_text(wanted)  # last: an interrupted build is rebuilt


def _peft_child(base: str, out: str) -> None:
    """PEFT's way: load the base and the trained adapter, save converted."""
    import warnings

    from peft import PeftModel
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(PAIR / "trained"))
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
    parser.add_argument("--peft-child", nargs=2, metavar=("BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_child:
        _peft_child(*args.peft_child)
        return
    base = build_llama_170m()
    _prepare(base)
    env = child_env()
    argv = {
        "adapterctl": lambda out: [ADAPTERCTL, "convert", str(PAIR / "trained"), out,
                                   "--initial", str(PAIR / "init")],
        "peft": lambda out: [sys.executable, __file__, "--peft-child", str(base), out],
    }  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {"adapterctl": [], "peft": []}
    kept: dict[str, Path] = {}
    for i in range(args.runs):
        for engine in ("adapterctl", "peft") if i % 2 == 0 else ("peft", "adapterctl"):
            out = Path(tempfile.mkdtemp(prefix="bench-convert-")) / "out"
            wall, peak, _ = run_measured(argv[engine](str(out)), env)
            results[engine].append({"wall_s": wall, "peak_mib": peak})
            if engine in kept:
                shutil.rmtree(out.parent, ignore_errors=True)
            else:
                kept[engine] = out
        print(f"  run {i + 1}/{args.runs} done", flush=True)
    compared, identical = _same_factors(kept["adapterctl"], kept["peft"])
    for out in kept.values():
        shutil.rmtree(out.parent, ignore_errors=True)
    med = medians(results)
    a, p = med["adapterctl"], med["peft"]
    size = (PAIR / "trained" / "adapter_model.safetensors").stat().st_size
    goals = [
        Target("convert wall time / PEFT's way", a["wall_s"] / p["wall_s"], "x", 0.05,
               f"{a['wall_s']:.3f} s / {p['wall_s']:.2f} s"),
        Target("peak RSS / PEFT's way", a["peak_mib"] / p["peak_mib"], "x", 0.15,
               f"{a['peak_mib']:.0f} MiB / {p['peak_mib']:.0f} MiB"),
        Target("factors differing from PEFT's", compared - identical, "", 0,
               f"{identical}/{compared} bit-identical"),
    ]  # fmt: skip
    print(f"\ntrained adapter: {size / 2**20:.1f} MiB; factors bit-identical to PEFT's: "
          f"{identical}/{compared}")  # fmt: skip
    report_side_by_side(
        "convert",
        med,
        goals,
        results,
        adapter_bytes=size,
        factors={"compared": compared, "bit_identical": identical},
    )


if __name__ == "__main__":
    main()
