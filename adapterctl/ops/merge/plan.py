"""What each base tensor becomes: the adapters read (configs checked, keys classified, shapes
matched against the base's headers) into a list of operations per base tensor, before anything is
read or written. No tensor data is read here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from adapterctl.errors import (
    AdapterctlError,
    AdapterFormatError,
    IncompatibleModelError,
    UnsupportedVariantError,
)
from adapterctl.format.checkpoint import BaseCheckpoint
from adapterctl.format.config import LoraConfig, residual_init
from adapterctl.format.dtypes import Dtype
from adapterctl.format.files import read_small
from adapterctl.format.keys import classify
from adapterctl.format.layout import AdapterFiles
from adapterctl.format.rawtensor import TensorStore
from adapterctl.format.variants import refuse_variants
from adapterctl.ops.merge.rule import Kind

#: model types whose projections are transformers' Conv1D (weights stored (in, out))
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_HINT = "merge it with PEFT (`PeftModel.from_pretrained(...).merge_and_unload()`)"


@dataclass(frozen=True)
class Lora:
    """One adapter's LoRA (or DoRA) factors merged into one base weight."""

    adapter: int  # index into the plan's stores
    name: str  # the adapter's name
    module: str
    kind: Kind
    a: str  # stored keys
    b: str
    magnitude: str | None
    scaling: float
    rank: int

    @property
    def variant(self) -> str:
        return f"dora_{self.kind}" if self.magnitude is not None else self.kind


@dataclass(frozen=True)
class LoraBias:
    """One adapter of a layer whose base has a bias: with lora_bias=True (`key`), s·(lora_B's
    bias) is added to it; a DoRA adapter (`dora`) takes the ones merged before out and back in."""

    adapter: int
    module: str
    key: str | None
    scaling: float
    dora: bool = False


@dataclass(frozen=True)
class Replace:
    """A full tensor the adapter stores (trained bias, modules_to_save copy, saved embedding):
    it replaces the base's tensor."""

    adapter: int
    key: str
    why: str  # "bias", "modules_to_save", "embedding"


Op = Lora | LoraBias | Replace


@dataclass
class Plan:
    """Every base tensor's operations, in the order they apply (PEFT's: the adapter's full tensors
    are loaded first, then the adapters merged one after another)."""

    ops: dict[str, list[Op]] = field(default_factory=dict)
    added: dict[str, tuple[int, str, Dtype, tuple[int, ...]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def prune(self) -> None:
        """Drop the bias steps of layers where no adapter has a lora_B bias (nothing to add)."""
        for key in [k for k, ops in self.ops.items() if all(
            isinstance(o, LoraBias) and o.key is None for o in ops
        )]:  # fmt: skip
            del self.ops[key]
        for key, ops in self.ops.items():
            if any(isinstance(o, LoraBias) and o.key is not None for o in ops):
                continue
            self.ops[key] = [o for o in ops if not isinstance(o, LoraBias)]

    def add(self, base_key: str, op: Op, variant: str | None) -> None:
        ops = self.ops.setdefault(base_key, [])
        if isinstance(op, Replace):  # loaded before any adapter is merged, whichever brings it
            at = next((i for i, o in enumerate(ops) if not isinstance(o, Replace)), len(ops))
            ops.insert(at, op)
        else:
            ops.append(op)
        if variant is not None:
            self.counts[variant] = self.counts.get(variant, 0) + 1


def model_type(base: BaseCheckpoint) -> str | None:
    try:
        config: Any = json.loads(read_small(base.path / "config.json", "model config"))
    except (AdapterctlError, ValueError, RecursionError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def refuse_quantized(base: BaseCheckpoint) -> None:
    """A quantized base (bitsandbytes, GPTQ, AWQ, ...) cannot be merged tensor by tensor."""
    try:
        config: Any = json.loads(read_small(base.path / "config.json", "model config"))
    except (AdapterctlError, ValueError, RecursionError):
        return
    if isinstance(config, dict) and config.get("quantization_config"):
        raise IncompatibleModelError(
            f"base `{base.path}` is quantized (its config.json has a quantization_config)",
            hint="merge into the unquantized base model (float32, bfloat16 or float16)",
        )


def check_config(config: LoraConfig, label: str) -> None:
    refuse_variants(config, label, _HINT)
    if residual_init(config.init_lora_weights):
        raise UnsupportedVariantError(
            f"`{label}`: a {config.init_lora_weights} adapter changes the base when it is loaded",
            hint="convert it to plain LoRA first: `adapterctl convert ADAPTER OUT --base BASE`",
        )


def _kind(
    module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], base_shape: tuple[int, ...],
    embedding: bool, conv1d_model: bool, fan_in_fan_out: bool,
) -> Kind | None:  # fmt: skip
    """How the base stores `module`'s weight, from the shapes (None: the factors do not fit)."""
    if len(a_shape) != 2 or len(b_shape) != 2 or len(base_shape) != 2 or a_shape[0] != b_shape[1]:
        return None
    n_in, n_out = a_shape[1], b_shape[0]
    if embedding:
        return "embedding" if base_shape == (n_in, n_out) else None
    linear, conv1d = base_shape == (n_out, n_in), base_shape == (n_in, n_out)
    if linear and conv1d:  # square: the model's layer type decides, as in PEFT
        return "conv1d" if conv1d_model or fan_in_fan_out else "linear"
    return "linear" if linear else "conv1d" if conv1d else None


def _shape(store: TensorStore, key: str) -> tuple[int, ...]:
    return tuple(store.specs()[key][1])


def plan_adapter(
    plan: Plan,
    index: int,
    files: AdapterFiles,
    config: LoraConfig,
    store: TensorStore,
    base: BaseCheckpoint,
    headers: dict[str, tuple[Dtype, tuple[int, ...]]],
) -> None:
    """Add adapter `index`'s operations to `plan`."""
    label = os.fspath(files.weights_path)
    mts = config.modules_to_save or []
    conv1d_model = model_type(base) in CONV1D_MODEL_TYPES
    modules: dict[str, dict[str, str]] = {}
    for key in store.specs():
        if ".original_module." in key or ".modules_to_save." in key:
            continue  # bias="all" also saves a modules_to_save wrapper's internal copies
        info = classify(key, mts)
        if info.is_lora and info.prefixed and not info.depth:
            modules.setdefault(info.module, {})[info.kind] = key
            continue
        if info.prefixed and info.kind in ("bias", "modules_to_save", "embedding"):
            found = base.find(info.module, info.param)
            if found is None and info.kind == "modules_to_save":
                dtype, shape = store.specs()[key]
                plan.added[info.base_key] = (index, key, dtype, tuple(shape))
                plan.counts["modules_to_save"] = plan.counts.get("modules_to_save", 0) + 1
                continue
            if found is None:
                raise IncompatibleModelError(
                    f"`{label}` holds `{key}`, but base `{base.path}` has no `{info.base_key}`",
                    hint="pass the base model the adapter was trained on",
                )
            want = headers[found][1]
            if _shape(store, key) != want:
                raise IncompatibleModelError(
                    f"`{info.base_key}`: the adapter's {info.kind} tensor has shape "
                    f"{list(_shape(store, key))}, the base's `{found}` {list(want)}",
                    hint="pass the base model the adapter was trained on",
                )
            variant = {"bias": "trained_bias", "embedding": "saved_embedding"}.get(
                info.kind, info.kind
            )
            plan.add(found, Replace(index, key, info.kind), variant)
            continue
        raise AdapterFormatError(
            f"`{label}`: cannot merge `{key}` (a {info.kind} tensor)",
            hint="merge it with PEFT; adapterctl merges LoRA factors, biases and modules_to_save",
        )
    for module, kinds in modules.items():
        _plan_module(plan, index, files, config, store, base, headers, module, kinds,
                     conv1d_model)  # fmt: skip


def _plan_module(
    plan: Plan, index: int, files: AdapterFiles, config: LoraConfig, store: TensorStore,
    base: BaseCheckpoint, headers: dict[str, tuple[Dtype, tuple[int, ...]]], module: str,
    kinds: dict[str, str], conv1d_model: bool,
) -> None:  # fmt: skip
    embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
    a = kinds.get("lora_embedding_A" if embedding else "lora_A")
    b = kinds.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None:
        raise AdapterFormatError(
            f"`{files.weights_path}`: `{module}` has only one of its two LoRA factors"
        )
    key = base.key_of(module, "weight")
    base_shape = headers[key][1]
    a_shape, b_shape = _shape(store, a), _shape(store, b)
    kind = _kind(module, a_shape, b_shape, base_shape, embedding, conv1d_model,
                 bool(config.fan_in_fan_out))  # fmt: skip
    if kind is None:
        raise IncompatibleModelError(
            f"`{module}`: the adapter's factors A {list(a_shape)} and B {list(b_shape)} do not "
            f"fit the base's `{key}` {list(base_shape)}",
            hint="pass the base model the adapter was trained on",
        )
    rank = config.rank_for(module)
    if a_shape[0] != rank:
        raise AdapterFormatError(
            f"`{files.config_path or files.weights_path}`: `{module}` has rank {rank} in the "
            f"config, but its factors have rank {a_shape[0]}",
            hint="check r and rank_pattern in adapter_config.json",
        )
    scaling = config.scaling(config.alpha_for(module), rank)
    magnitude = kinds.get("lora_magnitude_vector")
    if magnitude is not None:
        n = base_shape[1] if kind == "embedding" else b_shape[0]
        if _shape(store, magnitude) != (n,):
            raise IncompatibleModelError(
                f"`{module}`: the DoRA magnitude has shape {list(_shape(store, magnitude))}, "
                f"expected [{n}]"
            )
    if key != f"{module}.weight" and module.rsplit(".", 1)[-1] == "lm_head" and base.tied:
        plan.warnings.append(
            f"`{module}` is tied to `{key}`: its LoRA is merged into that tensor, which the "
            "input embedding shares too (as in PEFT's merged model)"
        )
    elif base.is_tied_embedding(key):
        plan.warnings.append(
            f"`{module}` is the input embedding, which the output head shares (tied word "
            "embeddings): merging its LoRA changes the output head too (as in PEFT's merged model)"
        )
    plan.add(key, Lora(index, files.name, module, kind, a, b, magnitude, scaling, rank),
             "dora_" + kind if magnitude else kind)  # fmt: skip
    bias_key = kinds.get("lora_B.bias")
    target = None if kind == "embedding" else base.find(module, "bias")
    if bias_key is not None:
        if target is None:
            raise IncompatibleModelError(
                f"`{module}`: the adapter has a lora_B bias (lora_bias=true) but the base's "
                "layer has no bias"
            )
        if _shape(store, bias_key) != headers[target][1]:
            raise IncompatibleModelError(
                f"`{module}`: the lora_B bias has shape {list(_shape(store, bias_key))}, the "
                f"base's `{target}` {list(headers[target][1])}"
            )
    if target is not None:  # kept only where some adapter has a lora_B bias (Plan.prune)
        step = LoraBias(index, module, bias_key, scaling, magnitude is not None)
        plan.add(target, step, "lora_bias" if bias_key is not None else None)
