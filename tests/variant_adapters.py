"""LoRA variant adapters written by PEFT (the oracle), and the smallest config that switches each
variant field on. Shared by tests/lib/test_variants.py and tests/cli/test_variants.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import peft_save, tiny_llama

#: variant field -> the smallest value that switches it on (PEFT's own test of "on")
ON_VALUES: dict[str, Any] = {
    "megatron_config": {"tensor_model_parallel_size": 2},
    "trainable_token_indices": [1, 2],
    "velora_config": {},
    "alora_invocation_tokens": [5, 6],
    "use_qalora": True,
    "monteclora_config": {},
    "layer_replication": [[0, 2], [1, 2]],
    "target_parameters": ["self_attn.q_proj.weight"],
    "use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2},
    "arrow_config": {},
    "kasa_config": {},
    "ensure_weight_tying": True,
}


def _peft_kwargs(name: str) -> dict[str, Any]:
    """PEFT LoraConfig kwargs of each case (sub-configs as PEFT's own classes)."""
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

    q = ["q_proj"]
    return {
        "kasa": {"target_modules": ["q_proj", "v_proj"], "kasa_config": KasaConfig()},
        "bdlora": {
            "target_modules": ["q_proj", "o_proj"],
            "use_bdlora": BdLoraConfig(
                target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2
            ),
        },
        "velora": {"target_modules": q, "velora_config": VeloraConfig()},
        "monteclora": {"target_modules": q, "monteclora_config": MontecloraConfig()},
        "alora": {"target_modules": q, "alora_invocation_tokens": [5, 6], "task_type": "CAUSAL_LM"},
        "mica": {"target_modules": q, "init_lora_weights": "mica"},
        "qalora": {"target_modules": q, "use_qalora": True},
        "layer_replication": {"target_modules": q, "layer_replication": [[0, 2], [1, 2]]},
        "trainable_tokens": {"target_modules": q, "trainable_token_indices": [1, 2]},
        "target_parameters": {
            "target_modules": [],
            "target_parameters": ["self_attn.q_proj.weight"],
        },
        "ensure_weight_tying": {"target_modules": q, "ensure_weight_tying": True},
    }[name]


#: case -> the variant as the refusal names it
PEFT_CASES: dict[str, str] = {
    "kasa": "KaSA (`kasa_config`)",
    "bdlora": "BD-LoRA (`use_bdlora`)",
    "velora": "VeLoRA (`velora_config`)",
    "monteclora": "MonteCLoRA (`monteclora_config`)",
    "alora": "aLoRA (`alora_invocation_tokens`)",
    "mica": 'MiCA (`init_lora_weights: "mica"`)',
    "qalora": "QALoRA (`use_qalora`)",
    "layer_replication": "layer replication (`layer_replication`)",
    "trainable_tokens": "trainable tokens (`trainable_token_indices`)",
    "target_parameters": "LoRA on parameters (`target_parameters`)",
    "ensure_weight_tying": "weight-tied adapters (`ensure_weight_tying`)",
}


def refusal(variant: str) -> str:
    return f"this adapter uses {variant}, which adapterctl does not compute"


@pytest.fixture(scope="session")
def peft_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every PEFT_CASES adapter, made by PEFT's get_peft_model + save_pretrained (r=4)."""
    root = tmp_path_factory.mktemp("variants")
    return {
        name: peft_save(tiny_llama, root / name, {"default": {"r": 4, **_peft_kwargs(name)}})
        for name in PEFT_CASES
    }


def lfs_pointer(size: int = 123456) -> bytes:
    return (
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        f"size {size}\n"
    ).encode()
