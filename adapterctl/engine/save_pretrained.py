"""save_pretrained: an adapter's tensors and config, written as PEFT 0.21.2 writes them.

Keys come from the one key module (`format.keys`), bytes from the one safetensors writer
(`format.tensors`). Every file is first written to a temp file beside its place, and all are renamed
in only once all are written: a failure (a full disk) leaves the (possibly existing) directory as
it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adapterctl.engine.layers import LoraLayer, param
from adapterctl.errors import AdapterctlError
from adapterctl.format.config import CONFIG_NAME, LoraConfig, reload_drift
from adapterctl.format.dtypes import BY_TORCH_NAME
from adapterctl.format.keys import EMBEDDING_NAMES, PREFIX, stored_key
from adapterctl.format.layout import BIN_NAME, SAFETENSORS_NAME, adapter_subdir
from adapterctl.format.tensors import PT_METADATA, TensorSource, write_safetensors

if TYPE_CHECKING:
    from adapterctl.engine.model import AdapterModel


def _layer_tensors(path: str, layer: LoraLayer, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if layer.kind == "embedding":
        yield stored_key(path, "lora_embedding_A"), layer.lora_embedding_A[name]
        yield stored_key(path, "lora_embedding_B"), layer.lora_embedding_B[name]
    else:
        yield stored_key(path, "lora_A"), param(layer.lora_A[name])
        yield stored_key(path, "lora_B"), param(layer.lora_B[name])
        if getattr(layer.lora_B[name], "bias", None) is not None:
            yield stored_key(path, "lora_B.bias"), param(layer.lora_B[name], "bias")
    if name in layer.lora_magnitude_vector:
        yield stored_key(path, "lora_magnitude_vector"), layer.magnitude(name)


def embedding_targeted(config: LoraConfig, module_names: list[str]) -> bool:
    """PEFT's test for "an embedding layer is in target_modules" (docs/peft-format.md §2.4)."""
    tm = config.target_modules
    if isinstance(tm, str):
        if tm == "all-linear":
            return False
        regex = config.regex(tm, "`target_modules`")
        return any(
            regex.fullmatch(n) for n in module_names if n.rsplit(".", 1)[-1] in EMBEDDING_NAMES
        )
    return any(e in (tm or []) for e in EMBEDDING_NAMES)


def _base_vocab_size(config: LoraConfig) -> int | None:
    """vocab_size in the base's config.json, when the base is a local directory (no network)."""
    import json

    base = config.base_model_name_or_path
    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        return None
    from adapterctl.errors import AdapterctlError
    from adapterctl.format.files import read_small

    try:
        value = json.loads(read_small(os.path.join(base, "config.json"), "model config"))
        value = value.get("vocab_size")
    except (AdapterctlError, ValueError, RecursionError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _save_embeddings(model: AdapterModel, name: str, choice: str | bool) -> bool:
    """PEFT's save_embedding_layers rule (docs/peft-format.md, Trap T5): explicit, or "auto" when
    an embedding is a target (without trainable tokens) or the vocabulary was resized against the
    base's config."""
    if choice is True or choice is False:
        return choice
    if choice != "auto":
        raise AdapterctlError(
            f"save_embedding_layers must be 'auto', True or False, not {choice!r}"
        )
    config = model.peft_config[name]
    names = [n for n, _ in model.base_model.model.named_modules()]
    tokens = config.peft_type == "TRAINABLE_TOKENS" or config.trainable_token_indices
    if embedding_targeted(config, names) and not tokens:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
            UserWarning,
            stacklevel=4,
        )
        return True
    current = getattr(getattr(model.base_model.model, "config", None), "vocab_size", None)
    original = _base_vocab_size(saved_config(model, name))
    if original is not None and current is not None and original != current:
        warnings.warn(
            "Setting `save_embedding_layers` to `True`: the embedding layer has been resized "
            f"during finetuning ({original} -> {current} tokens).",
            UserWarning,
            stacklevel=4,
        )
        return True
    return False


def adapter_state_dict(
    model: AdapterModel, name: str, save_embedding_layers: str | bool = "auto"
) -> dict[str, torch.Tensor]:
    """The stored tensors of adapter `name` (PEFT's keys: `base_model.model.` + path + suffix)."""
    config = model.peft_config[name]
    inner = model.base_model
    out: dict[str, torch.Tensor] = {}
    for path, layer in inner.lora_layers():
        if name in layer.r:
            out.update(_layer_tensors(path, layer, name))
    if config.bias == "all":
        for key, p in inner.model.named_parameters():
            if (
                key.endswith(".bias")
                and ".lora_" not in key
                and ".modules_to_save." not in key
                and ".original_module." not in key
            ):
                out[PREFIX + key] = p
    elif config.bias == "lora_only":
        for path, layer in inner.lora_layers():
            bias = getattr(layer.base_layer, "bias", None)
            if name in layer.r and isinstance(bias, torch.Tensor):
                out[f"{PREFIX}{path}.base_layer.bias"] = bias
    for path, wrapper in inner.wrappers():
        if name in wrapper.modules_to_save:
            for key, p in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{key}"] = p
    before_embeddings = set(out)
    if _save_embeddings(model, name, save_embedding_layers):
        modules = dict(inner.model.named_modules())
        targeted = embedding_targeted(config, list(modules))
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            emb = getattr(inner.model, getter, lambda: None)()
            if emb is None:
                continue
            found = next((p for p, m in modules.items() if m is emb), None)
            if found is None:
                continue
            path = found
            owner, _, last = path.rpartition(".")
            wrapped = modules.get(owner) if last == "base_layer" else None
            if isinstance(wrapped, LoraLayer):
                out[f"{PREFIX}{owner}.base_layer.weight"] = param(wrapped.base_layer)
            elif isinstance(emb, LoraLayer):
                out[f"{PREFIX}{path}.base_layer.weight"] = param(emb.base_layer)
            elif not targeted:  # with embeddings in target_modules, PEFT saves only wrapped ones
                out[f"{PREFIX}{path}.weight"] = param(emb)
    embeddings = [k for k in out if k not in before_embeddings]
    if embeddings:
        size = sum(out[k].numel() * out[k].element_size() for k in embeddings)
        warnings.warn(
            f"saving {len(embeddings)} full embedding matrices with the adapter "
            f"({size / 2**20:.1f} MiB): {', '.join(k.removeprefix(PREFIX) for k in embeddings)}",
            UserWarning,
            stacklevel=3,
        )
    return {k: v.detach() for k, v in out.items()}


def _untied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone all but the first of each group
    (docs/peft-format.md, Trap T13)."""
    seen: set[tuple[str, int, int]] = set()
    out = {}
    for key, t in sd.items():
        storage = t.untyped_storage()
        ident = (str(t.device), storage.data_ptr(), storage.nbytes())
        if ident in seen and storage.nbytes() > 0:
            t = t.clone()
        seen.add(ident)
        out[key] = t.contiguous()
    return out


def _stage(path: Path, write: Any) -> Path:
    """Write what `path` will hold to a temp file beside it, fsynced; the caller renames it in."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _write_bin(f: Any, sd: dict[str, torch.Tensor]) -> None:
    """torch.save through memory: its zip writer hides the OSError of a failed write (a full disk
    is "unexpected pos"), a plain write does not."""
    import io

    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in sd.items()}, buffer)
    f.write(buffer.getbuffer())


def _sources(sd: dict[str, torch.Tensor]) -> list[TensorSource]:
    sources = []
    for key, t in sd.items():
        dtype = BY_TORCH_NAME.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise AdapterctlError(f"cannot save `{key}`: dtype {t.dtype} has no safetensors code")

        def data(t: torch.Tensor = t) -> bytes:
            raw: bytes = (
                t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
            return raw

        sources.append(TensorSource(key, dtype, tuple(t.shape), data))
    return sources


def saved_config(model: AdapterModel, name: str) -> LoraConfig:
    """The config as PEFT writes it: base_model_name_or_path and auto_mapping filled in."""
    config = model.peft_config[name]
    changes: dict[str, Any] = {}
    inner = model.base_model.model
    if config.base_model_name_or_path is None:
        name_or_path = getattr(inner, "name_or_path", None) or getattr(
            getattr(inner, "config", None), "_name_or_path", None
        )
        changes["base_model_name_or_path"] = name_or_path or None
    if config.task_type is None and config.auto_mapping is None:
        changes["auto_mapping"] = {
            "base_model_class": type(inner).__name__,
            "parent_library": type(inner).__module__,
        }
    return config.replace(**changes) if changes else config


def _converted(
    sd: dict[str, torch.Tensor], config: LoraConfig, initial_dir: Path
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The one conversion `adapterctl convert` uses, applied to the live adapter's tensors."""
    import numpy as np

    from adapterctl.format.rawtensor import OpenStore, RawTensor
    from adapterctl.ops.convert import convert_tensors, converted_config, one_adapter

    files = one_adapter(initial_dir, "initial adapter")  # safetensors or .bin (weights_only)
    assert files.config_path is not None
    initial_config = LoraConfig.from_file(files.config_path)
    with OpenStore(files.weights_path, files.format) as store:
        initial = {k: store.get(k) for k in store.specs()}
    trained = {}
    for key, t in sd.items():
        dtype = BY_TORCH_NAME[str(t.dtype).removeprefix("torch.")]
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        trained[key] = RawTensor(dtype, tuple(t.shape), raw.view(np.dtype(dtype.numpy_name)))
    out = convert_tensors(trained, initial, config, initial_config)
    tensors = {
        k: torch.from_numpy(np.frombuffer(v.buffer(), dtype=np.uint8).copy())
        .view(getattr(torch, v.dtype.torch_name or ""))
        .reshape(v.shape)
        for k, v in out.items()
    }
    return tensors, converted_config(config, initial_config)


def save_pretrained(
    model: AdapterModel,
    save_directory: str | os.PathLike[str],
    *,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    save_embedding_layers: str | bool = "auto",
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write the adapters, all files or none; returns the files written. With
    `path_initial_model_for_weight_conversion` (the initial adapter of a PiSSA/OLoRA/CorDA
    adapter, saved before training), write it converted to plain LoRA instead, never into the
    initial adapter's own folder."""
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    if path_initial_model_for_weight_conversion is not None and len(names) != 1:
        raise AdapterctlError(
            "converting needs exactly one adapter to save: one initial adapter fits one trained one",
            hint="pass selected_adapters=[name]",
        )
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise AdapterctlError(f"no adapter named {', '.join(f'`{n}`' for n in unknown)} is loaded")
    if not is_main_process:
        return []
    root = Path(save_directory)
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise AdapterctlError(f"`{root}` is not a directory")
    subs = [root / adapter_subdir(n) for n in names if adapter_subdir(n)]
    made = [p for p in (*subs, root, *root.parents) if not p.exists()]  # deepest first
    root.mkdir(parents=True, exist_ok=True)
    staged: list[
        tuple[Path, Path]
    ] = []  # (temp file, final path): renamed in only once all are written
    try:
        saved: dict[str, Any] = {}
        for name in names:
            files, saved[name] = _stage_adapter(
                model, root, name, state_dict, save_embedding_layers, safe_serialization,
                path_initial_model_for_weight_conversion,
            )  # fmt: skip
            staged += files
        if names:  # the card goes to the root only, as PEFT writes it
            from adapterctl.ops.card import card_text, read_card

            config = saved_config(model, names[0])
            tags = getattr(model.base_model.model, "model_tags", None)
            existing, where = read_card(root), f"`{root / 'README.md'}`"
            card = card_text(
                config, existing, list(tags) if tags else None, adapters=saved, label=where
            ).encode("utf-8")
            staged.append((_stage(root / "README.md", lambda f: f.write(card)), root / "README.md"))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for directory in made:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only the folders this call made, and only while empty
        raise
    return [final for _, final in staged]


def _stage_adapter(
    model: AdapterModel,
    root: Path,
    name: str,
    state_dict: dict[str, torch.Tensor] | None,
    save_embedding_layers: str | bool,
    safe_serialization: bool,
    initial: str | os.PathLike[str] | None,
) -> tuple[list[tuple[Path, Path]], LoraConfig]:
    """Adapter `name`'s weights and config, written to temp files in its folder, and the config
    as written."""
    from adapterctl.format.atomic import check_inputs

    targets = [p for p, layer in model.base_model.lora_layers() if name in layer.r]
    drift = reload_drift(model.peft_config[name], targets)
    if drift:
        warnings.warn(
            f"adapter `{name}` has overlapping rank/alpha patterns that resolve differently "
            f"after a reload (PEFT tries them in sorted order): {'; '.join(drift[:3])}",
            UserWarning,
            stacklevel=4,
        )
    sd = (
        state_dict
        if state_dict is not None
        else adapter_state_dict(model, name, save_embedding_layers)
    )
    sub = adapter_subdir(name)
    target = root / sub if sub else root
    if initial is not None:  # its files would be overwritten: that loses the initial adapter
        check_inputs(target, [initial], replaces=False)
    target.mkdir(exist_ok=True)
    config = saved_config(model, name)
    if initial is not None:
        sd, config = _converted(sd, config, Path(initial))
    staged = []
    try:
        if safe_serialization:
            sources = _sources(_untied(sd))
            weights = target / SAFETENSORS_NAME
            write: Any = lambda f: write_safetensors(f, sources, PT_METADATA)  # noqa: E731
        else:
            weights = target / BIN_NAME
            write = lambda f: _write_bin(f, sd)  # noqa: E731
        staged.append((_stage(weights, write), weights))
        text = config.to_json().encode()
        staged.append((_stage(target / CONFIG_NAME, lambda f: f.write(text)), target / CONFIG_NAME))
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return staged, config
