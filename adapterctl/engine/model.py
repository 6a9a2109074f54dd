"""AdapterModel: PEFT's PeftModel persistence and runtime API on adapterctl's own LoRA layers.

The nesting mirrors PEFT's (`AdapterModel.base_model` is the LoRA model, whose `.model` is the
transformers model), so `state_dict()` keys are PEFT's keys exactly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import torch
from torch import nn

from adapterctl.engine.inject import LoraModel, parent_of
from adapterctl.engine.layers import param
from adapterctl.engine.weights import (
    HubOptions,
    LoadResult,
    WeightOptions,
    apply_key_mapping,
    hub_options,
    load_into,
    locate,
    memory_keys,
    read_weights,
    warn_missing,
)
from adapterctl.errors import AdapterctlError, IncompatibleModelError
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.keys import PREFIX
from adapterctl.format.layout import validate_adapter_name
from adapterctl.format.variants import refuse_variants


@dataclass(frozen=True)
class LoadedAdapter:
    """What `AdapterModel.load` made: the model, the folder the adapter was read from (the Hub
    cache's for a repo id), and which keys were loaded, missing or unexpected."""

    model: AdapterModel
    directory: Path
    load_result: LoadResult


class AdapterModel(nn.Module):
    """A transformers model with LoRA adapters, API-compatible with PEFT's `PeftModel`."""

    #: what the last from_pretrained loaded (PEFT has no such attribute; `load` returns it)
    last_load: LoadResult | None = None

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig,
        adapter_name: str = "default",
        *,
        low_cpu_mem_usage: bool = False,
        loading: bool = False,
    ) -> None:
        """Inject the adapter `config` describes into `model` (in place). `low_cpu_mem_usage`:
        its tensors are made on the meta device, to be assigned when its weights are loaded.
        `loading`: `config` is a saved adapter's (its weights follow), not a new one."""
        super().__init__()
        self.base_model = LoraModel(model)
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self._add(config, adapter_name, meta=low_cpu_mem_usage, loading=loading)

    # --- construction ---------------------------------------------------------------------------

    def _add(
        self, config: LoraConfig, name: str, *, meta: bool = False, loading: bool = True
    ) -> list[str]:
        from adapterctl.engine.init import check_init, decompose_all

        validate_adapter_name(name)
        refuse_variants(config)  # never compute something else (KaSA, BD-LoRA, ...)
        method = check_init(config, loading=loading)
        if method is not None and meta:
            raise AdapterctlError(
                f"`init_lora_weights` is {method!r}, which needs the real base weights; "
                "it cannot be combined with low_cpu_mem_usage"
            )
        if name in self.peft_config:
            raise AdapterctlError(f"an adapter named `{name}` is already loaded")
        bias_users = [n for n, c in self.peft_config.items() if c.bias != "none"]
        if config.bias != "none" and bias_users:
            raise AdapterctlError(
                f"only one adapter may train biases; `{bias_users[0]}` already does",
                hint="PEFT has the same limit",
            )
        _refuse_unsupported_base(self.base_model.model)
        injected = self.base_model.inject(config, name, meta=meta)
        # what PEFT writes back into the config after injecting: all-linear expanded, long lists
        # condensed, fan_in_fan_out as the (last) targeted layer needs it, SEQ_CLS heads saved
        changes: dict[str, Any] = {}
        stored = self.base_model.stored_targets
        if stored != config.target_modules:
            changes["target_modules"] = stored
        kinds = [self.base_model.model.get_submodule(k).kind for k in injected]
        linear = [k for k in kinds if k in ("linear", "conv1d")]
        if linear and config.fan_in_fan_out != (linear[-1] == "conv1d"):
            changes["fan_in_fan_out"] = linear[-1] == "conv1d"
        if config.task_type == "SEQ_CLS":
            heads = list(config.modules_to_save or [])
            missing = [h for h in ("classifier", "score") if h not in heads]
            if missing:
                changes["modules_to_save"] = heads + missing
        if changes:
            config = config.replace(**changes)
        self.peft_config[name] = config
        if method is not None:
            decompose_all(self, name, method)
        if method is not None and loading:
            warnings.warn(
                f"`init_lora_weights` is {method!r}: the targeted base weights were replaced by "
                "their residual, as PEFT does when loading such an adapter; convert it to plain "
                "LoRA with `adapterctl convert` to load it on an unmodified base",
                UserWarning,
                stacklevel=_caller_outside(),
            )
        return injected

    @classmethod
    def load(
        cls,
        model: nn.Module,
        source: str | os.PathLike[str],
        *,
        adapter_name: str = "default",
        config: LoraConfig | None = None,
        hub: HubOptions | None = None,
        **options: Unpack[WeightOptions],
    ) -> LoadedAdapter:
        """Inject the adapter saved at `source` (a folder, or a Hub repo id found as `hub` says)
        into `model` (in place) and load its weights; missing and unexpected keys are returned,
        not warned of."""
        directory = locate(source, hub or HubOptions())
        if config is None:
            config = LoraConfig.from_file(directory / CONFIG_NAME)
        refuse_variants(config, str(directory))
        low_cpu_mem_usage = options.get("low_cpu_mem_usage", False)
        wrapped = cls(
            model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, loading=True
        )
        result = wrapped._load_weights(directory, adapter_name, options)
        return LoadedAdapter(wrapped, directory, result)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> AdapterModel:
        """PEFT's from_pretrained: `load`, warning of missing keys; `last_load` holds the keys."""
        hub = hub_options(kwargs)
        _refuse_ephemeral(ephemeral_gpu_offload)
        loaded = cls.load(
            model,
            model_id,
            adapter_name=adapter_name,
            config=config,
            is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
            torch_device=kwargs.get("torch_device"),
            hub=hub,
        )
        warn_missing(loaded.load_result)
        loaded.model.last_load = loaded.load_result
        return loaded.model

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> LoadResult:
        """Load another adapter next to the loaded ones; it is not activated (as in PEFT)."""
        hub = hub_options(kwargs)
        _refuse_ephemeral(ephemeral_gpu_offload)
        directory = locate(model_id, hub)
        config = LoraConfig.from_file(directory / CONFIG_NAME)
        refuse_variants(config, str(directory))
        active = self.active_adapter
        self._add(config, adapter_name, meta=low_cpu_mem_usage)
        self.base_model.set_adapter(active)
        options = WeightOptions(
            is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
            torch_device=torch_device,
        )
        return self._load_weights(directory, adapter_name, options)

    def _load_weights(self, directory: Path, name: str, options: WeightOptions) -> LoadResult:
        config = self.peft_config[name]
        low_cpu_mem_usage = options.get("low_cpu_mem_usage", False)
        sd = read_weights(directory, options.get("torch_device") or "cpu")
        key_mapping = options.get("key_mapping")
        if key_mapping is None:
            key_mapping = getattr(self.base_model.model, "_checkpoint_conversion_mapping", None)
        sd = apply_key_mapping(sd, key_mapping)
        wrappers = [p for p, _ in self.base_model.wrappers()]
        sd = memory_keys(sd, name, config, wrappers)
        device_of = self._adapter_devices(name) if low_cpu_mem_usage else None
        expected = [f"base_model.model.{k}" for k in self.base_model.lora_keys(name)]
        # PEFT casts the new adapter's tensors (autocast: float32 on a half-precision base) before
        # it loads the file, so float32 factors are loaded exactly, never through the base's dtype
        autocast = options.get("autocast_adapter_dtype", True)
        self._cast_adapter(name, autocast, meta=True)
        try:
            result = load_into(
                self, sd, name, expected=expected, assign=low_cpu_mem_usage, device_of=device_of
            )
        except IncompatibleModelError as e:  # say which file
            raise IncompatibleModelError(f"`{directory}`: {e.message}", hint=e.hint) from e
        self._cast_adapter(name, autocast)
        self._set_trainable(name, options.get("is_trainable", False))
        return result

    def _adapter_devices(self, name: str) -> dict[str, torch.device]:
        """Where each adapter tensor goes: the device of the layer it wraps."""
        out: dict[str, torch.device] = {}
        for path, layer in self.base_model.lora_layers():
            device = param(layer.base_layer).device
            for key, _ in layer.named_parameters():
                out[f"{PREFIX}{path}.{key}"] = device
        return out

    def _cast_adapter(self, name: str, autocast: bool, *, meta: bool = False) -> None:
        """Adapter tensors in their layer's dtype, then fp32 for half-precision layers (autocast);
        `meta`: tensors not yet materialized too (before a load that assigns)."""
        for _, layer in self.base_model.lora_layers():
            base_dtype = param(layer.base_layer).dtype
            half = base_dtype in (torch.float16, torch.bfloat16)
            target = torch.float32 if autocast and half else base_dtype
            tensors = [
                p
                for container in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
                if name in container
                for p in container[name].parameters()
            ]
            tensors += [
                pdict[name]
                for pdict in (layer.lora_embedding_A, layer.lora_embedding_B)
                if name in pdict
            ]
            for p in tensors:
                if p.is_floating_point() and (meta or not p.is_meta):
                    p.data = p.data.to(target)

    def _set_trainable(self, name: str, is_trainable: bool) -> None:
        config = self.peft_config[name]
        if not is_trainable:
            if len(self.peft_config) == 1 or self.training:
                for p in self.parameters():
                    p.requires_grad_(False)
                self.eval()
                return
            # the rest is frozen and in eval mode already: touch only what this adapter added,
            # so that loading the 24th adapter costs what loading the 2nd did
            self.base_model.freeze_adapter(name)
            return
        for p in self.base_model.model.parameters():
            p.requires_grad_(False)
        for _, p in self.base_model.adapter_parameters(name):
            p.requires_grad_(True)
        if config.bias == "all":
            for key, p in self.base_model.model.named_parameters():
                if key.endswith(".bias") and ".original_module." not in key:
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for _, layer in self.base_model.lora_layers():
                bias = getattr(layer.base_layer, "bias", None)
                if bias is not None:
                    bias.requires_grad_(True)

    # --- runtime ------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.generate(*args, **kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterctlError(f"no adapter named `{adapter_name}` is loaded")
        self.base_model.set_adapter(adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterctlError(f"no adapter named `{adapter_name}` is loaded")
        for _, layer in self.base_model.lora_layers():
            layer.delete_adapter(adapter_name)
        for _, w in self.base_model.wrappers():
            if adapter_name in w.modules_to_save:
                del w.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        layers: list[Any] = [m for _, m in self.base_model.lora_layers()]
        layers += [m for _, m in self.base_model.wrappers()]
        before = [m.disabled for m in layers]
        for m in layers:
            m.disabled = True
        try:
            yield
        finally:
            for m, was in zip(layers, before, strict=True):
                m.disabled = was

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    # --- saving -------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the adapters as PEFT does: `default` at the root, the others in subfolders.

        `state_dict=` is the one extra keyword (as PEFT takes it); anything else is an error.
        """
        from adapterctl.engine.save_pretrained import save_pretrained

        unknown = sorted(set(kwargs) - {"state_dict"})
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
        save_pretrained(
            self,
            save_directory,
            safe_serialization=safe_serialization,
            selected_adapters=selected_adapters,
            save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process,
            state_dict=kwargs.get("state_dict"),
            path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
        )

    # --- merging ------------------------------------------------------------------------------

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters into the base weights and return the plain transformers model."""
        return self._unload(merge=True, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain transformers model."""
        return self._unload(merge=False, adapter_names=None)

    def _unload(self, merge: bool, adapter_names: list[str] | None) -> nn.Module:
        model = self.base_model.model
        for path, layer in list(self.base_model.lora_layers()):
            base = layer.base_layer
            if merge:
                names = adapter_names or [a for a in layer.active_adapters if a in layer.r]
                weight, bias = layer.merged_weight(names)
                _refuse_new_nonfinite(path, names, base, weight, bias)
                with torch.no_grad():
                    param(base).data = weight
                    if bias is not None:
                        param(base, "bias").data = bias
            parent, child = parent_of(model, path)
            setattr(parent, child, base)
        for path, wrapper in list(self.base_model.wrappers()):
            new = wrapper.original_module
            active = wrapper.active_adapter
            if merge and active is not None and active in wrapper.modules_to_save:
                new = wrapper.modules_to_save[active]
            parent, child = parent_of(model, path)
            setattr(parent, child, new)
        self.peft_config = {}
        return model


def _caller_outside() -> int:
    """The `stacklevel` that names the first caller outside this module, for a warning raised in
    the function that calls this (`load`, `from_pretrained` and `load_adapter` nest differently)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _refuse_new_nonfinite(
    path: str, names: list[str], base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """A merge that makes a weight NaN or infinite where the base's was finite (a huge
    lora_alpha, a half-precision overflow) is an error naming the module, never a broken model.
    Raised before this module is changed (modules merged before it stay merged)."""
    for new, old in ((weight, param(base)), (bias, getattr(base, "bias", None))):
        if new is None or not isinstance(old, torch.Tensor):
            continue
        bad = ~torch.isfinite(new) & torch.isfinite(old.detach())
        if bool(bad.any()):
            raise AdapterctlError(
                f"merging {', '.join(names)} into `{path}` gives {int(bad.sum())} values that are "
                f"not finite in {str(new.dtype).removeprefix('torch.')} where the base's are",
                hint="check the adapter's lora_alpha and factors (`adapterctl inspect --check`), "
                "or merge into a float32 base",
            )


def _refuse_unsupported_base(model: nn.Module) -> None:
    """Quantized bases and architectures whose adapter keys transformers v5 rewrites
    (docs/peft-format.md, Trap T18)."""
    config = getattr(model, "config", None)
    if getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None):
        raise IncompatibleModelError(
            "quantized base models (bitsandbytes and others) are not supported",
            hint="load the base in float32, float16 or bfloat16",
        )
    model_type = getattr(config, "model_type", None)
    if model_type:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        if get_checkpoint_conversion_mapping(model_type) is not None:  # type: ignore[no-untyped-call]
            raise IncompatibleModelError(
                f"transformers rewrites the weight names of `{model_type}` models when loading, "
                "and PEFT rewrites their adapter keys to match; adapterctl does not do this yet",
                hint="load this adapter with PEFT",
            )


def _refuse_ephemeral(flag: bool) -> None:
    if flag:
        raise AdapterctlError(
            "ephemeral_gpu_offload is not supported by adapterctl",
            hint="load the base onto the GPU (device_map) instead",
        )


def get_adapter_model(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> AdapterModel:
    """A fresh adapter on `model`, initialised as the config says (LoRA's default: random A,
    zero B), its tensors in float32 on a half-precision base unless `autocast_adapter_dtype` is
    off (PEFT's rule, docs/peft-format.md §6.4)."""
    from adapterctl.engine.init import init_default

    wrapped = AdapterModel(model, config, adapter_name)
    init_default(wrapped, adapter_name, config)
    wrapped._cast_adapter(adapter_name, autocast_adapter_dtype)
    return wrapped
