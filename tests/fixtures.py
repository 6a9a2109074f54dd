"""Session fixtures: real adapters written by PEFT (the oracle) on tiny random transformers models."""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


#: the tiny Llama's config (tests that build it elsewhere, e.g. in an old PEFT's venv, use it)
TINY_LLAMA: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}


def tiny_llama(**overrides: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg: dict[str, Any] = {**TINY_LLAMA, **overrides}
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2() -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=64,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


def tiny_bert() -> Any:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=64,
            max_position_embeddings=64,
            num_labels=3,
        )
    ).eval()


def _randomize_lora(model: Any) -> None:
    """Give every adapter tensor non-trivial values, as training would."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_save(
    model_fn: Callable[[], Any],
    out: Path,
    configs: dict[str, dict[str, Any]],
    **save_kwargs: Any,
) -> Path:
    """Wrap a fresh model with PEFT, add one adapter per entry of `configs`, and save them all."""

    def run() -> Path:
        from peft import LoraConfig, get_peft_model

        model = model_fn()
        names = list(configs)
        peft_model = get_peft_model(model, LoraConfig(**configs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, LoraConfig(**configs[name]))
        _randomize_lora(peft_model)
        peft_model.save_pretrained(str(out), **save_kwargs)
        return out

    result: Path = _quiet(run)
    return result


#: name -> (model builder, {adapter name: LoraConfig kwargs})
CASES: dict[str, tuple[Callable[[], Any], dict[str, dict[str, Any]]]] = {
    "llama_basic": (tiny_llama, {"default": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}),
    "llama_dora_patterns": (
        tiny_llama,
        {
            "default": {
                "r": 4,
                "lora_alpha": 8,
                "use_dora": True,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "rank_pattern": {"down_proj": 6, "layers.1.self_attn.q_proj": 2},
                "alpha_pattern": {"v_proj": 16},
                "modules_to_save": ["lm_head"],
                "task_type": "CAUSAL_LM",
            }
        },
    ),
    "llama_embed": (
        tiny_llama,
        {"default": {"r": 4, "target_modules": ["embed_tokens", "q_proj"], "use_rslora": True}},
    ),
    "llama_bias": (
        lambda: tiny_llama(attention_bias=True),
        {
            "default": {
                "r": 4,
                "target_modules": ["q_proj", "k_proj"],
                "bias": "lora_only",
                "lora_bias": True,
            }
        },
    ),
    "gpt2_conv1d": (
        tiny_gpt2,
        {"default": {"r": 4, "target_modules": ["c_attn", "c_proj"], "use_dora": True}},
    ),
    "bert_seq_cls": (
        tiny_bert,
        {"default": {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}},
    ),
    "llama_layers": (
        tiny_llama,
        {
            "default": {
                "r": 4,
                "target_modules": ["q_proj", "v_proj"],
                "layers_to_transform": [1],
                "layers_pattern": "layers",
            }
        },
    ),
    "llama_regex_exclude": (
        tiny_llama,
        {
            "default": {
                "r": 2,
                "target_modules": r".*\.(q_proj|o_proj|up_proj)",
                "exclude_modules": ["model.layers.0.self_attn.q_proj"],
            }
        },
    ),
    "llama_all_linear": (
        tiny_llama,
        {"default": {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.1}},
    ),
    "llama_embed_dora": (
        tiny_llama,
        {"default": {"r": 4, "target_modules": ["embed_tokens", "lm_head"], "use_dora": True}},
    ),
    "gpt2_bias_all": (
        tiny_gpt2,
        {
            "default": {
                "r": 4,
                "target_modules": ["c_attn"],
                "bias": "all",
                "modules_to_save": ["ln_f"],
            }
        },
    ),
    "multi": (
        tiny_llama,
        {
            "default": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "alpha": {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"], "use_dora": True},
            "beta": {"r": 8, "target_modules": "model.*(up|gate)_proj", "use_rslora": True},
        },
    ),
}


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every CASES adapter saved by PEFT, plus a bf16 one and a `.bin` one."""
    root = tmp_path_factory.mktemp("peft")
    out = {name: peft_save(fn, root / name, cfgs) for name, (fn, cfgs) in CASES.items()}

    def bf16() -> Any:
        import torch

        return tiny_llama().to(torch.bfloat16)

    def run_bf16() -> Path:
        from peft import LoraConfig, get_peft_model

        model = bf16()
        pm = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False
        )
        _randomize_lora(pm)
        pm.save_pretrained(str(root / "llama_bf16"))
        return root / "llama_bf16"

    out["llama_bf16"] = _quiet(run_bf16)
    out["llama_bin"] = peft_save(
        tiny_llama,
        root / "llama_bin",
        {"default": {"r": 4, "target_modules": ["q_proj"]}},
        safe_serialization=False,
    )
    return out


def residual_pair(
    out: Path,
    init: str = "pissa",
    model_fn: Callable[[], Any] = tiny_llama,
    corda: str | None = None,
    **config: Any,
) -> tuple[Any, Path, Path, Path | None]:
    """PEFT: a PiSSA/OLoRA/CorDA adapter on `model_fn()`, its initial save, a "trained" save and
    PEFT's own conversion (None where PEFT refuses to convert). Returns the trained model too."""

    def run() -> tuple[Any, Path, Path, Path | None]:
        import torch
        from peft import LoraConfig, get_peft_model

        base = model_fn()
        if corda is not None:
            from peft.tuners.lora.config import CordaConfig
            from peft.tuners.lora.corda import preprocess_corda

            cfg = LoraConfig(
                init_lora_weights="corda", corda_config=CordaConfig(corda_method=corda), **config
            )
            g = torch.Generator().manual_seed(7)
            calibration = [torch.randint(0, 64, (1, 16), generator=g) for _ in range(6)]

            def run_model() -> None:
                for x in calibration:
                    base(input_ids=x)

            preprocess_corda(base, cfg, run_model=run_model)
        else:
            cfg = LoraConfig(init_lora_weights=init, **config)
        pm = get_peft_model(base, cfg)
        method = cfg.init_lora_weights
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(str(out / "init"))
        pm.peft_config["default"].init_lora_weights = method
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(out / "trained"))
        converted: Path | None = out / "peft"
        try:
            pm.save_pretrained(
                str(out / "peft"), path_initial_model_for_weight_conversion=str(out / "init")
            )
        except ValueError:  # rslora with patterns: PEFT refuses, adapterctl converts
            converted = None
        return pm.eval(), out / "init", out / "trained", converted

    result: tuple[Any, Path, Path, Path | None] = _quiet(run)
    return result


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a transformers directory (a BASE for load and save)."""
    out = tmp_path_factory.mktemp("llama-base") / "llama"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llama().save_pretrained(str(out))
    return out


# --- merge parity (tests/lib/test_merge_parity.py, tests/cli/test_merge_*.py) -------------------


def _perturb_trained(model: Any, seed: int) -> None:
    """Make the adapter "trained": random LoRA factors, DoRA magnitudes moved off the base's
    row norms, and every other trainable tensor (trained biases, modules_to_save copies)
    moved off the base's values, so a merge that ignored any of them would show."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * noise)
            elif "lora_" in name:
                p.copy_(0.1 * noise)
            elif p.requires_grad:
                p.add_(0.05 * noise)


def merge_inputs(vocab: int = 64) -> Any:
    import torch

    return torch.arange(16).reshape(2, 8) * 7 % vocab


def merge_oracle(
    model_fn: Callable[[], Any],
    root: Path,
    configs: dict[str, dict[str, Any]],
    *,
    dtype: str = "float32",
    shard: str | None = None,
    merge_dtype: str | None = None,
    autocast: bool = True,
    write_base: Callable[[Any, Path], None] | None = None,
    order: list[str] | None = None,
) -> tuple[Path, Path, dict[str, Any], Any]:
    """PEFT's side of a merge: `model_fn()` in `dtype` saved as BASE (`max_shard_size=shard`, or
    by `write_base(model, dir)`), one "trained" adapter per `configs` entry saved as ADAPTER
    (the first must be "default"; the others go in subfolders, as PEFT saves them), then
    `PeftModel.from_pretrained(BASE loaded in merge_dtype or dtype, ADAPTER)` + the other
    adapters, `merge_and_unload(adapter_names=order or all of them)`. Returns BASE, ADAPTER,
    the merged state dict and the merged model's logits (computed in float32)."""

    def run() -> tuple[Path, Path, dict[str, Any], Any]:
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model

        torch_dtype = getattr(torch, dtype)
        model = model_fn().to(torch_dtype)
        base, adapter = root / "base", root / "adapter"
        if write_base is not None:
            base.mkdir(parents=True)
            write_base(model, base)
        elif shard is None:
            model.save_pretrained(str(base))
        else:
            model.save_pretrained(str(base), max_shard_size=shard)
        names = list(configs)
        pm = get_peft_model(
            model,
            LoraConfig(**configs[names[0]]),
            adapter_name=names[0],
            autocast_adapter_dtype=autocast,
        )
        for name in names[1:]:
            pm.add_adapter(name, LoraConfig(**configs[name]))
        _perturb_trained(pm, seed=3)
        pm.save_pretrained(str(adapter))

        cls = type(model_fn())
        loaded = cls.from_pretrained(str(base), dtype=getattr(torch, merge_dtype or dtype))
        peft_model = PeftModel.from_pretrained(loaded, str(adapter), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(adapter / name), adapter_name=name)
        merged = peft_model.merge_and_unload(adapter_names=order or names).eval()
        state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        with torch.no_grad():
            logits = merged.float()(merge_inputs()).logits
        return base, adapter, state, logits

    result: tuple[Path, Path, dict[str, Any], Any] = _quiet(run)
    return result


# --- checkpoints read independently of adapterctl (safetensors by hand, .bin with torch) ------


@dataclass(frozen=True)
class Stored:
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    file: str


def read_file(path: Path) -> tuple[dict[str, Stored], dict[str, str]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    metadata = header.pop("__metadata__", {})
    start = 8 + n
    tensors = {
        name: Stored(
            info["dtype"],
            tuple(info["shape"]),
            raw[start + info["data_offsets"][0] : start + info["data_offsets"][1]],
            path.name,
        )
        for name, info in header.items()
    }
    return tensors, metadata


def read_bin(directory: Path) -> dict[str, Stored]:
    import torch

    index = directory / "pytorch_model.bin.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["pytorch_model.bin"]
    )
    codes = {v: k for k, v in _TORCH_DTYPES.items()}
    out = {}
    for name in files:
        for key, t in torch.load(directory / name, weights_only=True).items():
            data = t.contiguous().view(torch.uint8).numpy().tobytes()
            out[key] = Stored(
                codes[str(t.dtype).removeprefix("torch.")], tuple(t.shape), data, name
            )
    return out


def read_checkpoint(directory: Path) -> dict[str, Stored]:
    """Every tensor of a transformers checkpoint directory, in file order."""
    if any(directory.glob("*.bin")):
        return read_bin(directory)
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out: dict[str, Stored] = {}
    for name in files:
        out |= read_file(directory / name)[0]
    return out


_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64"}


def as_tensor(stored: Stored) -> Any:
    import torch

    dtype = getattr(torch, _TORCH_DTYPES[stored.dtype])
    return torch.frombuffer(bytearray(stored.data), dtype=dtype).reshape(stored.shape).clone()
