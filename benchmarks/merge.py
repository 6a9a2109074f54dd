"""Benchmark for `merge`: a LoRA merged into its base, `adapterctl merge` side by side with PEFT and
with the floor, in one run; then the same merge on a synthetic checkpoint of several GB.

The 168M Llama saved as float32 shards of about 100 MB and an r=64 LoRA on its seven linear layers
(saved with PEFT), merged in fresh children, interleaved (`--runs` rounds, the order alternating):

  adapterctl  `adapterctl merge BASE ADAPTER OUT`
  PEFT        load the base, `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`
  floor       `cp -r BASE OUT`, plus every module's delta B@A computed with numpy (the bytes and the
              FLOPs no merge can avoid), each measured in its own child; the floor's wall time is
              their sum and its peak RSS the larger of the two

Scale: a synthetic Llama-shaped checkpoint of at least `--scale-gb` GB (the same layer shapes, more
layers; written shard by shard, never held in memory) with the same adapter per layer, merged by
adapterctl next to the floor (`--scale-runs` rounds): its peak RSS against the 168M merge's, and its
wall time per GB, against the 168M merge's relative to the floor's (more layers per GB mean more
delta FLOPs per byte, for every merge alike).

Run with `make bench-merge` (or `.venv/bin/python -m benchmarks.merge [--runs N] [--scale-gb G]`);
`--quick` runs small sizes once, as a smoke test. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Iterator
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
    require_disk,
    run_measured,
    side_by_side,
    tensor_files,
    warm_page_cache,
    write_results,
)

R = 64
#: the full run: the 168M Llama (seed 0, as `common.llama_170m`) in ~100 MB float32 shards
FULL = {
    "llama": LLAMA_170M,
    "seed": 0,
    "shard_bytes": 100 * 10**6,
    "r": R,
    "lora_alpha": 2 * R,
    "lora_std": 0.02,
    "lora_seed": 1,
    "targets": LINEAR,
}
#: `--quick`: the same layout at toy sizes
QUICK = {
    **FULL,
    "llama": TOY_LLAMA,
    "shard_bytes": 2 * 10**6,
    "r": 16,
    "lora_alpha": 32,
}
ENGINES = ("adapterctl", "peft", "cp", "deltas")
SCALE_ENGINES = ("adapterctl", "cp", "deltas")  # PEFT would need the whole model in memory
LIMITS = {"wall_peft": 0.25, "wall_floor": 2.0, "rss_peft": 0.1, "rss_scale": 0.10, "linear": 1.2}
F32 = 4  # bytes per float32

# -- the 168M fixture --------------------------------------------------------------------------


def build(dest: str, spec_json: str) -> dict[str, Any]:
    """(In a child.) The base, saved by transformers in shards, and a PEFT LoRA on its linear
    layers with every factor (B included) drawn from N(0, lora_std²)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(spec_json)
    quiet_transformers()
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(LlamaConfig(**spec["llama"]))
    base, adapter = Path(dest) / "base", Path(dest) / "adapter"
    model.save_pretrained(base, max_shard_size=spec["shard_bytes"])
    parameters = sum(p.numel() for p in model.parameters())
    torch.manual_seed(spec["lora_seed"])
    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        target_modules=spec["targets"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, spec["lora_std"])
    peft_model.save_pretrained(adapter)
    return {"parameters": parameters, **_sizes(base, adapter)}


def _sizes(base: Path, adapter: Path) -> dict[str, Any]:
    shards = sorted(base.glob("*.safetensors"))
    return {
        "base_bytes": sum(f.stat().st_size for f in shards),
        "shards": len(shards),
        "largest_shard_bytes": max(f.stat().st_size for f in shards),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
    }


# -- the synthetic checkpoint for the scale run ------------------------------------------------


def layer_tensors(llama: dict[str, int], layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """One Llama decoder layer's tensors (name, shape), in the model's state-dict order."""
    h, inter = llama["hidden_size"], llama["intermediate_size"]
    kv = h // llama["num_attention_heads"] * llama["num_key_value_heads"]
    p = f"model.layers.{layer}."
    return [
        (p + "self_attn.q_proj.weight", (h, h)),
        (p + "self_attn.k_proj.weight", (kv, h)),
        (p + "self_attn.v_proj.weight", (kv, h)),
        (p + "self_attn.o_proj.weight", (h, h)),
        (p + "mlp.gate_proj.weight", (inter, h)),
        (p + "mlp.up_proj.weight", (inter, h)),
        (p + "mlp.down_proj.weight", (h, inter)),
        (p + "input_layernorm.weight", (h,)),
        (p + "post_attention_layernorm.weight", (h,)),
    ]


def model_tensors(llama: dict[str, int]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of an untied Llama checkpoint (name, shape), in the model's state-dict order."""
    h, vocab = llama["hidden_size"], llama["vocab_size"]
    yield "model.embed_tokens.weight", (vocab, h)
    for layer in range(llama["num_hidden_layers"]):
        yield from layer_tensors(llama, layer)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (vocab, h)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def scale_llama(llama: dict[str, int], gb: float) -> dict[str, int]:
    """`llama` with as many layers as make its float32 checkpoint at least `gb` GB."""
    fixed = sum(_numel(s) for _, s in model_tensors({**llama, "num_hidden_layers": 0})) * F32
    per_layer = sum(_numel(s) for _, s in layer_tensors(llama, 0)) * F32
    return {**llama, "num_hidden_layers": max(1, math.ceil((gb * 1e9 - fixed) / per_layer))}


def build_scale(dest: str, spec_json: str) -> dict[str, Any]:
    """(In a child.) A Llama-shaped float32 checkpoint written shard by shard by the format
    layer (one tensor in memory at a time), values N(0, 0.02²) cut from a pool of random numbers,
    with config.json and a model.safetensors.index.json as transformers writes them; and a LoRA of
    the same shape per layer as the 168M one's."""
    import numpy as np
    from transformers import LlamaConfig

    from adapterctl.format.config import LoraConfig
    from adapterctl.format.dtypes import DTYPES
    from adapterctl.format.tensors import TensorSource, write_safetensors

    spec = json.loads(spec_json)
    llama, limit = spec["llama"], spec["shard_bytes"]
    rng = np.random.default_rng(spec["seed"])
    pool = rng.standard_normal(1 << 24, dtype=np.float32) * np.float32(0.02)

    def source(name: str, shape: tuple[int, ...]) -> TensorSource:
        def data() -> bytes:
            n, start = _numel(shape), int(rng.integers(pool.size))
            if start + n <= pool.size:
                return pool[start : start + n].tobytes()
            reps = (start + n + pool.size - 1) // pool.size
            return np.tile(pool, reps)[start : start + n].tobytes()

        return TensorSource(name, DTYPES["F32"], tuple(shape), data)

    # shards of at most `limit` bytes (one tensor larger than that gets a shard of its own)
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for name, shape in model_tensors(llama):
        s = source(name, shape)
        if shards[-1] and size + s.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    base = Path(dest) / "base"
    base.mkdir()
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with open(base / file, "wb") as f:
            write_safetensors(f, shard)
        weight_map.update((s.name, file) for s in shard)
    total = sum(s.nbytes for shard in shards for s in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    LlamaConfig(**llama, architectures=["LlamaForCausalLM"], dtype="float32").save_pretrained(base)

    adapter = Path(dest) / "adapter"
    adapter.mkdir()
    factors = []
    for name, shape in model_tensors(llama):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in spec["targets"]:
            fan_out, fan_in = shape
            prefix = f"base_model.model.{module}"
            factors.append(source(f"{prefix}.lora_A.weight", (spec["r"], fan_in)))
            factors.append(source(f"{prefix}.lora_B.weight", (fan_out, spec["r"])))
    with open(adapter / "adapter_model.safetensors", "wb") as f:
        write_safetensors(f, factors)
    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        target_modules=spec["targets"],
        task_type="CAUSAL_LM",
    )
    (adapter / "adapter_config.json").write_text(config.to_json())
    return {"layers": llama["num_hidden_layers"], **_sizes(base, adapter)}


# -- measured children -------------------------------------------------------------------------


def peft_child(base: str, adapter: str, out: str) -> None:
    """PEFT's merge: load the base and the adapter, merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


def floor_deltas(adapter: str) -> dict[str, int]:
    """The floor's arithmetic: every module's delta (B @ A) * alpha / r in float32 with numpy,
    the factors read one module at a time; nothing written."""
    from safetensors import safe_open

    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    modules = 0
    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key.endswith(".lora_A.weight"):
                b = f.get_tensor(key.replace(".lora_A.", ".lora_B."))
                delta = (b @ f.get_tensor(key)) * scaling
                del delta
                modules += 1
    return {"modules": modules}


# -- checks --------------------------------------------------------------------------------------


def compare(ours: Path, peft: Path, base: Path) -> dict[str, Any]:
    """adapterctl's merged checkpoint against PEFT's, tensor by tensor (one pair in memory at a
    time): names on one side only, the largest relative difference max|a - p| / max|p|, and how
    many tensors the merge left untouched are byte-identical to the base's."""
    import numpy as np
    from safetensors import safe_open

    a_files, p_files, b_files = tensor_files(ours), tensor_files(peft), tensor_files(base)
    worst, worst_name, untouched, identical = 0.0, "", 0, 0
    for name in sorted(a_files.keys() & p_files.keys()):
        with safe_open(str(a_files[name]), "np") as fa, safe_open(str(p_files[name]), "np") as fp:
            a, p = fa.get_tensor(name), fp.get_tensor(name)
        scale = float(np.abs(p).max())
        rel = float(np.abs(a.astype(np.float64) - p).max()) / scale if scale else 0.0
        if rel > worst or not worst_name:
            worst, worst_name = rel, name
        if name.removesuffix(".weight").rsplit(".", 1)[-1] not in LINEAR and name in b_files:
            untouched += 1
            with safe_open(str(b_files[name]), "np") as fb:
                identical += a.tobytes() == fb.get_tensor(name).tobytes()
    return {
        "tensors": len(a_files.keys() & p_files.keys()),
        "only_adapterctl": sorted(a_files.keys() - p_files.keys()),
        "only_peft": sorted(p_files.keys() - a_files.keys()),
        "max_relative_difference": worst,
        "worst_tensor": worst_name if worst else "",
        "untouched": untouched,
        "untouched_identical": identical,
    }


# -- the runs ------------------------------------------------------------------------------------


def measure_rounds(
    engines: tuple[str, ...],
    base: Path,
    adapter: Path,
    work: Path,
    runs: int,
    env: dict[str, str],
    keep: tuple[str, ...] = (),
) -> tuple[dict[str, list[Figures]], dict[str, Path]]:
    """`runs` interleaved rounds of `engines` (the order alternating), every output under `work`
    deleted after its run, except the first of each engine in `keep` (returned; the caller
    deletes `work`). The figures get a "floor" row: the cp and deltas children of each round,
    their wall times added, the larger peak RSS."""
    argv = {
        "adapterctl": lambda out: [ADAPTERCTL, "merge", str(base), str(adapter), str(out)],
        "peft": lambda out: child_argv(peft_child, str(base), str(adapter), str(out)),
        "cp": lambda out: ["cp", "-r", str(base), str(out)],
        "deltas": lambda _: child_argv(floor_deltas, str(adapter)),
    }
    kept: dict[str, Path] = {}

    def measure(engine: str, rnd: int) -> Figures:
        out = work / f"{engine}-{rnd}"
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, _ = run_measured(argv[engine](out), env)
        if engine in keep and engine not in kept:
            kept[engine] = out
        else:
            shutil.rmtree(out, ignore_errors=True)
        print(f"  {engine:10} {wall:7.2f} s {peak:7.0f} MiB", file=sys.stderr, flush=True)
        return {"wall_s": wall, "peak_mib": peak}

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    by_engine = interleaved(runs, engines, measure, alternate=True)
    by_engine["floor"] = [
        {"wall_s": c["wall_s"] + d["wall_s"], "peak_mib": max(c["peak_mib"], d["peak_mib"])}
        for c, d in zip(by_engine["cp"], by_engine["deltas"], strict=True)
    ]
    return by_engine, kept


def report(
    med: dict[str, Figures],
    checked: dict[str, Any],
    small: dict[str, Any],
    scale: tuple[dict[str, Figures], dict[str, Any]] | None,
    small_label: str,
) -> list[Target]:
    a, p, floor = med["adapterctl"], med["peft"], med["floor"]
    print(
        f"\nbase: {small['base_bytes'] / 1e6:.0f} MB in {small['shards']} float32 shards "
        f"(largest {small['largest_shard_bytes'] / 1e6:.0f} MB); "
        f"adapter: {small['adapter_bytes'] / 1e6:.1f} MB\n"
    )
    rows = [Row("wall_s", "wall time", "s"), Row("peak_mib", "peak RSS", "MiB")]
    side_by_side(
        {"adapterctl": a, "PEFT": p, "floor": floor, "cp -r": med["cp"], "deltas": med["deltas"]},
        rows,
    )
    only = checked["only_adapterctl"] + checked["only_peft"]
    print(
        f"\nagainst PEFT's merged model: {checked['tensors']} tensors, "
        f"{len(only)} on one side only; largest relative difference "
        f"{checked['max_relative_difference']:.2e} ({checked['worst_tensor'] or '-'}); "
        f"untouched tensors byte-identical to the base's: "
        f"{checked['untouched_identical']}/{checked['untouched']}"
    )
    goals = [
        Target("wall time / PEFT", a["wall_s"] / p["wall_s"], "x", LIMITS["wall_peft"],
               f"{a['wall_s']:.2f} s / {p['wall_s']:.2f} s"),
        Target("wall time / floor (cp -r + numpy deltas)", a["wall_s"] / floor["wall_s"], "x",
               LIMITS["wall_floor"], f"{a['wall_s']:.2f} s / {floor['wall_s']:.2f} s"),
        Target("peak RSS / PEFT", a["peak_mib"] / p["peak_mib"], "x", LIMITS["rss_peft"],
               f"{a['peak_mib']:.0f} MiB / {p['peak_mib']:.0f} MiB"),
        Target("tensors on one side only (vs PEFT)", len(only), "", 0, ", ".join(only[:3])),
        Target("max relative difference to PEFT", checked["max_relative_difference"], "", 1e-6,
               checked["worst_tensor"]),
        Target("untouched tensors not byte-identical to the base's",
               checked["untouched"] - checked["untouched_identical"], "", 0,
               f"{checked['untouched_identical']}/{checked['untouched']} identical"),
    ]  # fmt: skip
    if scale is not None:
        big, info = scale
        sa, sf = big["adapterctl"], big["floor"]
        gb, small_gb = info["base_bytes"] / 1e9, small["base_bytes"] / 1e9
        print(
            f"\nscale: {gb:.2f} GB ({info['layers']} layers, {info['shards']} shards), "
            f"adapter {info['adapter_bytes'] / 1e6:.0f} MB\n"
        )
        per_gb = {
            f"scale, {gb:.2f} GB": {
                **{k: big[k]["wall_s"] / gb for k in ("adapterctl", "floor", "cp", "deltas")},
                "peak_mib": sa["peak_mib"],
            },
            f"{small_label}, {small_gb:.2f} GB": {
                **{k: med[k]["wall_s"] / small_gb for k in ("adapterctl", "floor", "cp", "deltas")},
                "peak_mib": a["peak_mib"],
            },
        }
        side_by_side(
            per_gb,
            [
                Row("adapterctl", "adapterctl s/GB", ""),
                Row("floor", "floor s/GB", ""),
                Row("cp", "cp -r s/GB", ""),
                Row("deltas", "deltas s/GB", ""),
                Row("peak_mib", "adapterctl peak RSS", "MiB"),
            ],
        )
        small_ratio, scale_ratio = a["wall_s"] / floor["wall_s"], sa["wall_s"] / sf["wall_s"]
        goals += [
            Target(f"scale: |peak RSS - {small_label}'s| / {small_label}'s",
                   abs(sa["peak_mib"] - a["peak_mib"]) / a["peak_mib"], "x", LIMITS["rss_scale"],
                   f"|{sa['peak_mib']:.0f} - {a['peak_mib']:.0f}| / {a['peak_mib']:.0f} MiB"),
            Target("scale: wall time / floor", scale_ratio, "x", LIMITS["wall_floor"],
                   f"{sa['wall_s']:.2f} s / {sf['wall_s']:.2f} s"),
            Target(f"scale: (wall / floor) / {small_label}'s (wall / floor)",
                   scale_ratio / small_ratio, "x", LIMITS["linear"],
                   f"{scale_ratio:.2f} / {small_ratio:.2f}"),
        ]  # fmt: skip
    print_targets(goals)
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="interleaved rounds (median; default 3, quick 1)")
    parser.add_argument(
        "--scale-gb",
        type=float,
        help="size of the synthetic checkpoint, GB (default 3, quick 0.05; 0 skips the scale run)",
    )
    parser.add_argument(
        "--scale-runs", type=int, default=1, help="interleaved rounds at scale (median)"
    )
    parser.add_argument(
        "--scale-dir",
        type=Path,
        default=OUT,
        help="where the synthetic checkpoint is cached and merged (default benchmarks/out)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached fixtures first")
    args = parser.parse_args()
    spec = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    scale_gb = args.scale_gb if args.scale_gb is not None else (0.05 if args.quick else 3.0)
    suffix = "-quick" if args.quick else ""

    folder, manifest = cached("merge" + suffix, spec, build, json.dumps(spec), rebuild=args.rebuild)
    base, adapter = folder / "base", folder / "adapter"
    require_disk(OUT, 3 * manifest["base_bytes"], "the side-by-side outputs need")
    scale_fixture = None
    if scale_gb > 0:
        scale_spec = {**spec, "llama": scale_llama(spec["llama"], scale_gb), "seed": 2}
        scale_bytes = sum(_numel(s) for _, s in model_tensors(scale_spec["llama"])) * F32
        name = f"merge-scale{suffix}"
        built = (args.scale_dir / name / "manifest.json").is_file()
        require_disk(
            args.scale_dir,
            scale_bytes * (1 if built else 2),
            f"the {scale_gb:g} GB scale run needs",
        )
        scale_fixture = cached(
            name,
            scale_spec,
            build_scale,
            json.dumps(scale_spec),
            rebuild=args.rebuild,
            root=args.scale_dir,
        )
    env = begin()
    warm_page_cache(base, adapter)
    run_measured([ADAPTERCTL, "--help"], env)  # compile the bytecode cache once
    work = OUT / "merge-out"
    try:
        by_engine, kept = measure_rounds(
            ENGINES, base, adapter, work, runs, env, keep=("adapterctl", "peft")
        )
        checked = compare(kept["adapterctl"], kept["peft"], base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = medians(by_engine)
    scale = None
    scale_runs: dict[str, list[Figures]] = {}
    if scale_fixture is not None:
        scale_folder, scale_manifest = scale_fixture
        scale_base, scale_adapter = scale_folder / "base", scale_folder / "adapter"
        warm_page_cache(scale_base, scale_adapter)
        work = args.scale_dir / "merge-scale-out"
        print(f"scale: {scale_manifest['base_bytes'] / 1e9:.2f} GB", file=sys.stderr)
        try:
            scale_runs, _ = measure_rounds(
                SCALE_ENGINES, scale_base, scale_adapter, work, args.scale_runs, env
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        scale = medians(scale_runs), scale_manifest
    goals = report(med, checked, manifest, scale, "quick base" if args.quick else "168M")
    write_results(
        "merge" + suffix,
        goals,
        runs=by_engine,
        medians=med,
        manifest=manifest,
        against_peft=checked,
        scale=(
            {"runs": scale_runs, "medians": scale[0], "manifest": scale[1]}
            if scale is not None
            else None
        ),
    )


if __name__ == "__main__":
    main()
