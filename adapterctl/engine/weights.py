"""Adapter files into a live model: locate, read, rename keys, check shapes, assign
(docs/peft-format.md §6)."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from adapterctl.errors import AdapterNotFoundError, IncompatibleModelError
from adapterctl.format.config import LoraConfig
from adapterctl.format.keys import PREFIX, classify, to_memory_key
from adapterctl.format.layout import BIN_NAME, SAFETENSORS_NAME
from adapterctl.format.tensors import load_bin

#: the keywords PEFT's from_pretrained takes in its `**kwargs`
PEFT_KWARGS = ("subfolder", "revision", "cache_dir", "token", "torch_device")


class HubOptions(TypedDict, total=False):
    """Where an adapter is found: PEFT's Hub keywords (see `adapterctl.ops.hub.resolve`)."""

    subfolder: str | None
    revision: str | None
    token: str | None
    cache_dir: str | os.PathLike[str] | None


class WeightOptions(TypedDict, total=False):
    """How an adapter's weights are read and left: PEFT's from_pretrained keywords. Defaults:
    not trainable, autocast on, no low_cpu_mem_usage, the model's own key mapping, CPU."""

    is_trainable: bool
    autocast_adapter_dtype: bool
    low_cpu_mem_usage: bool
    key_mapping: dict[str, str] | None
    torch_device: str | None


@dataclass(frozen=True)
class LoadResult:
    """What loading one adapter's weights did: PEFT's missing/unexpected keys, as lists."""

    adapter_name: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    loaded_keys: list[str] = field(default_factory=list)


def locate(source: str | os.PathLike[str], options: HubOptions) -> Path:
    """The local folder holding the adapter at `source`: a local path, or a Hub repo id
    (`owner/name`) fetched through huggingface_hub's cache (HF_HUB_OFFLINE with a warm cache
    works, subfolder too: PEFT's bug in docs/peft-format.md, Trap T6 does not exist here).
    As in PEFT, `revision` does nothing for a local folder."""
    from adapterctl.ops.hub import resolve

    return resolve(source, kind="adapter", local_revision="ignore", **options)


def read_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """adapter_model.safetensors (preferred, as in PEFT) or adapter_model.bin (weights_only)."""
    st = directory / SAFETENSORS_NAME
    if st.is_file():
        from safetensors.torch import load_file

        from adapterctl.format.header import read_header

        read_header(st)  # our validation first: a bad file is one clear error
        return load_file(str(st), device=str(device))
    binp = directory / BIN_NAME
    if binp.is_file():
        return {k: v.to(device) for k, v in load_bin(binp).items()}
    raise AdapterNotFoundError(f"`{directory}` has no `{SAFETENSORS_NAME}` or `{BIN_NAME}`")


def apply_key_mapping(
    sd: dict[str, torch.Tensor], key_mapping: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    """PEFT's key_mapping: regex renames on the key without its prefix; the first that applies wins."""
    if not key_mapping:
        return sd
    out = {}
    for key, value in sd.items():
        prefixed = key.startswith(PREFIX)
        rest = key[len(PREFIX) :] if prefixed else key
        for pattern, repl in key_mapping.items():
            new, n = re.subn(pattern, repl, rest)
            if n:
                rest = new
                break
        out[(PREFIX if prefixed else "") + rest] = value
    return out


def memory_keys(
    sd: dict[str, torch.Tensor], adapter_name: str, config: LoraConfig, wrappers: list[str]
) -> dict[str, torch.Tensor]:
    """Stored keys -> the model's own keys (PEFT's names: `base_model.model.` + path)."""
    out = {}
    mts = config.modules_to_save or []
    for key, value in sd.items():
        if ".original_module." in key or ".modules_to_save." in key:
            # PEFT's bias="all" also saves the wrapper's internal copies of a modules_to_save
            # bias (the trained one is stored under its own name too): nothing to load
            continue
        info = classify(key, mts)
        if info.prefixed and info.is_lora:
            out[to_memory_key(key, adapter_name)] = value
            continue
        if info.prefixed and info.kind == "modules_to_save":
            owner = max(
                (w for w in wrappers if info.base_key.startswith(w + ".")), key=len, default=None
            )
            if owner is not None:
                rest = info.base_key[len(owner) + 1 :]
                out[f"{PREFIX}{owner}.modules_to_save.{adapter_name}.{rest}"] = value
                continue
        out[key] = value  # biases, saved embeddings: straight into the base model's own keys
    return out


def _set(root: nn.Module, key: str, value: torch.Tensor, assign: bool) -> None:
    owner_path, _, attr = key.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    current = getattr(owner, attr)
    with torch.no_grad():
        if assign or current.is_meta:
            new = value.to(dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(owner, attr, nn.Parameter(new, requires_grad=current.requires_grad))
            else:
                setattr(owner, attr, new)
        else:
            current.copy_(value.to(device=current.device, dtype=current.dtype))


def _lookup(root: nn.Module, key: str) -> torch.Tensor | None:
    """The parameter or buffer at `key`, without building a whole state dict."""
    owner_path, _, attr = key.rpartition(".")
    try:
        owner = root.get_submodule(owner_path) if owner_path else root
    except AttributeError:
        return None
    if attr in owner._parameters:
        return owner._parameters[attr]
    if attr in owner._buffers:
        return owner._buffers[attr]
    return None


def load_into(
    root: nn.Module,
    sd: dict[str, torch.Tensor],
    adapter_name: str,
    *,
    expected: list[str],
    assign: bool = False,
    device_of: dict[str, torch.device] | None = None,
) -> LoadResult:
    """Assign `sd` (model keys) into `root`; `expected` are the adapter's own keys (missing ones
    are reported, as PEFT does); keys that match nothing are returned; a shape mismatch raises."""
    own = {k: t for k in sd if (t := _lookup(root, k)) is not None}
    loaded, unexpected = [], []
    for key, value in sd.items():
        target = own.get(key)
        if target is None:
            unexpected.append(key)
            continue
        if tuple(target.shape) != tuple(value.shape):
            module = key.rsplit(".", 2)[0].removeprefix(PREFIX)
            raise IncompatibleModelError(
                f"size mismatch for `{key}` (module `{module}`): the model expects "
                f"{list(target.shape)} but the file has {list(value.shape)}",
                hint="the adapter was trained for a different base model",
            )
    for key, value in sd.items():
        if key in own:
            if assign and device_of is not None and key in device_of:
                value = value.to(device_of[key])
            _set(root, key, value, assign)
            loaded.append(key)
    missing = [k for k in expected if k not in sd]
    return LoadResult(adapter_name, missing, unexpected, loaded)


def warn_missing(result: LoadResult) -> None:
    if result.missing_keys:
        warnings.warn(
            f"Found missing adapter keys while loading the checkpoint: {result.missing_keys}",
            UserWarning,
            stacklevel=3,
        )


def hub_options(kwargs: dict[str, Any]) -> HubOptions:
    """The Hub keywords from PEFT's `**kwargs`; any keyword PEFT does not take is an error. For a
    local directory revision/cache_dir/token do nothing, as in PEFT."""
    unknown = sorted(set(kwargs) - set(PEFT_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
    return HubOptions(
        subfolder=kwargs.get("subfolder"),
        revision=kwargs.get("revision"),
        token=kwargs.get("token"),
        cache_dir=kwargs.get("cache_dir"),
    )
