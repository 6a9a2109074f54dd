"""`adapterctl load` as one library call: base model, adapter, report, generation, merge."""

from __future__ import annotations

import resource
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.engine.base import quiet_transformers
from adapterctl.errors import (
    AdapterctlError,
    AdapterNotFoundError,
    IncompatibleModelError,
    InvalidOptionError,
)
from adapterctl.ops import SCHEMA_VERSION

if TYPE_CHECKING:
    from adapterctl.engine.model import AdapterModel
    from adapterctl.engine.weights import LoadResult
    from adapterctl.format.config import LoraConfig


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    base_text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text": self.text, "base_text": self.base_text}


@dataclass(frozen=True)
class LoadReport:
    base: str
    base_class: str
    class_source: str
    base_parameters: int
    device: str
    dtype: str
    adapter: str
    adapter_name: str
    injected: dict[str, int]  # layer kind -> count (linear, conv1d, embedding, modules_to_save)
    trainable_parameters: int
    adapter_parameters: int
    missing_keys: list[str]
    unexpected_keys: list[str]
    base_load_s: float
    adapter_load_s: float
    peak_rss_mib: float
    cuda_peak_mib: float | None
    warnings: list[str] = field(default_factory=list)
    generation: Generation | None = None
    merged_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "base": {
                "path": self.base,
                "class": self.base_class,
                "class_source": self.class_source,
                "parameters": self.base_parameters,
                "device": self.device,
                "dtype": self.dtype,
                "load_seconds": round(self.base_load_s, 4),
            },
            "adapter": {
                "path": self.adapter,
                "name": self.adapter_name,
                "injected": self.injected,
                "parameters": self.adapter_parameters,
                "trainable_parameters": self.trainable_parameters,
                "missing_keys": self.missing_keys,
                "unexpected_keys": self.unexpected_keys,
                "load_seconds": round(self.adapter_load_s, 4),
            },
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "cuda_peak_mib": None if self.cuda_peak_mib is None else round(self.cuda_peak_mib, 1),
            "warnings": self.warnings,
            "generation": self.generation.to_dict() if self.generation else None,
            "merged_to": self.merged_to,
        }


def _first(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(f"`{k}`" for k in keys[:n]) + more


def _generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    if inputs["input_ids"].shape[1] == 0:
        raise AdapterctlError("the prompt encodes to no tokens", hint="pass a longer --prompt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    new = out[0, inputs["input_ids"].shape[1] :]
    text: str = tokenizer.decode(new, skip_special_tokens=True)
    return text


def load_session(
    base: str | Path,
    adapter: str | Path,
    *,
    adapter_name: str = "default",
    model_class: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    dtype: str = "auto",
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
    prompt: str | None = None,
    max_new_tokens: int = 20,
    compare_base: bool = False,
    merge_to: str | Path | None = None,
    force: bool = False,
    on_step: Callable[[str], None] | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
) -> LoadReport:
    """Load `base`, inject and load `adapter`, and report; refuse any missing or unexpected key.
    Either may be a Hub repo id (`revision`/`subfolder` apply to the adapter)."""
    from adapterctl.engine.base import check_options
    from adapterctl.format.atomic import preflight
    from adapterctl.ops.hub import hub_or_local, refuse_local_revision, resolve

    check_options(model_class, dtype, device, adapter_name)
    refuse_local_revision(hub_or_local(adapter), revision)
    if max_new_tokens < 1:
        raise InvalidOptionError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if merge_to is not None:  # before any download
        preflight([merge_to], force=force, inputs=[base, adapter])
    directory = resolve(
        adapter, kind="adapter", revision=revision, subfolder=subfolder, token=token
    )
    base = resolve(base, kind="base", token=token)
    if merge_to is not None:  # the Hub's cache folders are inputs too
        preflight([merge_to], force=force, inputs=[base, adapter, directory])
    import torch

    from adapterctl.engine.base import load_base, load_tokenizer, model_class_for
    from adapterctl.engine.model import AdapterModel

    step = on_step or (lambda _msg: None)
    with quiet_transformers():
        config = _read_config(directory)
        cls, source = model_class_for(base, config, model_class)
        tokenizer = load_tokenizer(base) if prompt is not None else None

        step(f"loading {cls.__name__} from {base}")
        t0 = time.perf_counter()
        model = load_base(base, cls, device=device, device_map=device_map, dtype=dtype)
        base_s = time.perf_counter() - t0
        base_params = sum(p.numel() for p in model.parameters())
        first = next(model.parameters())

        step(f"loading adapter {directory}")
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = AdapterModel.load(
                model,
                directory,
                adapter_name=adapter_name,
                config=config,
                is_trainable=is_trainable,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        adapter_s = time.perf_counter() - t0
        _refuse_key_mismatch(loaded.load_result)
        wrapped = loaded.model
        injected = _injected(wrapped)
        trainable, _ = wrapped.get_nb_trainable_parameters()
        adapter_params = wrapped.base_model.adapter_parameters(adapter_name)
        adapter_count = sum(p.numel() for _, p in adapter_params)

        generation = None
        if prompt is not None:
            step("generating")
            generation = _generation(wrapped, tokenizer, prompt, max_new_tokens, compare_base)
        if merge_to is not None:
            step(f"merging into {merge_to}")
            _merge(wrapped, tokenizer, base, merge_to, force=force, inputs=[base, directory])

        cuda_peak = None
        if torch.cuda.is_available():
            cuda_peak = torch.cuda.max_memory_allocated() / 2**20
        return LoadReport(
            base=str(base),
            base_class=type(model).__name__,
            class_source=source,
            base_parameters=base_params,
            device=str(first.device),
            dtype=str(first.dtype).removeprefix("torch."),
            adapter=str(directory),
            adapter_name=adapter_name,
            injected=injected,
            trainable_parameters=trainable,
            adapter_parameters=adapter_count,
            missing_keys=list(loaded.load_result.missing_keys),
            unexpected_keys=list(loaded.load_result.unexpected_keys),
            base_load_s=base_s,
            adapter_load_s=adapter_s,
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            cuda_peak_mib=cuda_peak,
            warnings=[str(w.message) for w in caught],
            generation=generation,
            merged_to=None if merge_to is None else str(merge_to),
        )


def _read_config(directory: Path) -> LoraConfig:
    """The adapter's config, its variants refused before the base is loaded; a config PEFT could
    not read for its encoding alone is read, with a warning."""
    from adapterctl.format.config import LoraConfig
    from adapterctl.format.variants import refuse_variants

    config = LoraConfig.from_file(directory / "adapter_config.json")
    refuse_variants(config, str(directory))
    if config.encoding_problem:
        import logging

        logging.getLogger(__name__).warning(
            "`%s`: %s; adapterctl reads it",
            directory / "adapter_config.json",
            config.encoding_problem,
        )
    return config


def _refuse_key_mismatch(result: LoadResult) -> None:
    """Any adapter key missing from the file, or any key in the file that matches nothing in the
    model, is an error: an adapter never loads and silently does nothing."""
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if not missing and not unexpected:
        return
    what = []
    if missing:
        what.append(f"{len(missing)} adapter key(s) missing from the file: {_first(missing)}")
    if unexpected:
        what.append(
            f"{len(unexpected)} key(s) in the file match nothing in the model: {_first(unexpected)}"
        )
    raise IncompatibleModelError(
        "; ".join(what), hint="the adapter does not fit this base (or --model-class)"
    )


def _injected(wrapped: AdapterModel) -> dict[str, int]:
    """Layer kind -> how many were injected (linear, conv1d, embedding, modules_to_save)."""
    kinds: Counter[str] = Counter(layer.kind for _, layer in wrapped.base_model.lora_layers())
    kinds["modules_to_save"] = sum(1 for _ in wrapped.base_model.wrappers())
    return {k: v for k, v in sorted(kinds.items()) if v}


def _generation(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, compare_base: bool
) -> Generation:
    """Greedy text for `prompt` with the adapter, and without it when `compare_base`."""
    text = _generate(model, tokenizer, prompt, max_new_tokens)
    base_text = None
    if compare_base:
        with model.disable_adapter():
            base_text = _generate(model, tokenizer, prompt, max_new_tokens)
    return Generation(prompt, text, base_text)


def _merge(
    wrapped: Any,
    tokenizer: Any,
    base: Path,
    merge_to: str | Path,
    *,
    force: bool,
    inputs: list[Path],
) -> None:
    """The merged model, with the base's tokenizer when it has one, written to `merge_to`."""
    from adapterctl.engine.base import load_tokenizer, save_model
    from adapterctl.format.atomic import atomic_directory

    merged: Any = wrapped.merge_and_unload()
    with atomic_directory(merge_to, force=force, inputs=inputs) as tmp:
        save_model(merged, tmp)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(base)
            except AdapterNotFoundError:  # a base without a tokenizer merges fine
                tokenizer = None
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
