"""Write the demo's example checkpoint with adapterctl's own format layer (no torch, no network).

A multi-adapter directory as PEFT lays it out for a small Llama-shaped model (hidden 64, 2 layers):
`default` at the root (q_proj/v_proj, r=8), `math/` (DoRA, a rank_pattern), `code/` (bfloat16
tensors and two alpha_pattern keys that overlap, which `inspect` warns about).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.tensors import TensorSource, write_safetensors

HIDDEN, KV, LAYERS = 64, 32, 2
OUT = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}
PREFIX = "base_model.model.model.layers"


def _bf16(a: np.ndarray) -> bytes:
    """float32 -> bfloat16 bits, round to nearest even (what torch's .to(torch.bfloat16) does)."""
    bits = a.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16).tobytes()


def write(
    directory: Path,
    config: dict,
    modules: list[str],
    ranks: dict[str, int],
    *,
    dora: bool = False,
    bf16: bool = False,
) -> None:
    rng = np.random.default_rng(len(directory.name))
    sources = []
    for layer in range(LAYERS):
        for mod in modules:
            r = ranks.get(mod, config["r"])
            base = f"{PREFIX}.{layer}.self_attn.{mod}"
            arrays = {
                "lora_A.weight": rng.standard_normal((r, HIDDEN)) * 0.1,
                "lora_B.weight": rng.standard_normal((OUT[mod], r)) * 0.01,
            }
            if dora:
                arrays["lora_magnitude_vector"] = 1 + rng.random(OUT[mod])
            for suffix, a in arrays.items():
                a32 = a.astype(np.float32)
                dtype = DTYPES["BF16" if bf16 else "F32"]
                data = _bf16(a32) if bf16 else a32.tobytes()
                sources.append(TensorSource(f"{base}.{suffix}", dtype, a32.shape, lambda d=data: d))
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "adapter_model.safetensors", "wb") as f:
        write_safetensors(f, sources)
    (directory / "adapter_config.json").write_text(LoraConfig(**config).to_json())


def main(out: Path) -> None:
    common = {"base_model_name_or_path": "demo/tiny-llama", "task_type": "CAUSAL_LM"}
    write(
        out,
        {**common, "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        ["q_proj", "v_proj"],
        {},
    )
    write(
        out / "math",
        {
            **common,
            "r": 4,
            "lora_alpha": 8,
            "use_dora": True,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "rank_pattern": {"o_proj": 8},
        },
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        {"o_proj": 8},
        dora=True,
    )
    write(
        out / "code",
        {
            **common,
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj"],
            "alpha_pattern": {"q_proj": 16, "layers.1.self_attn.q_proj": 32},
        },
        ["q_proj"],
        {},
        bf16=True,
    )
    (out / "README.md").write_text(
        "---\nlibrary_name: peft\ntags:\n- lora\n---\n# demo checkpoint\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
