"""`adapterctl load` as one library call: base model, adapter, report, generation, merge."""

from __future__ import annotations

import resource
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.engine.base import quiet_transformers
from adapterctl.errors import (
    AdapterctlError,
    AdapterNotFoundError,
    IncompatibleModelError,
    InvalidOptionError,
)
from adapterctl.ops import SCHEMA_VERSION


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
    from adapterctl.engine.weights import adapter_dir
    from adapterctl.format.atomic import preflight
    from adapterctl.ops.hub import base_source, hub_or_local, refuse_local_revision

    check_options(model_class, dtype, device, adapter_name)
    refuse_local_revision(hub_or_local(adapter), revision)
    if max_new_tokens < 1:
        raise InvalidOptionError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if merge_to is not None:  # before any download
        preflight([merge_to], force=force, inputs=[base, adapter])
    directory = adapter_dir(adapter, subfolder, revision, token)
    base = base_source(base, token=token)
    if merge_to is not None:  # the Hub's cache folders are inputs too
        preflight([merge_to], force=force, inputs=[base, adapter, directory])
    with quiet_transformers():
        return _load_session(
            base, directory, adapter_name=adapter_name, model_class=model_class, device=device,
            device_map=device_map, dtype=dtype, is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
            prompt=prompt, max_new_tokens=max_new_tokens, compare_base=compare_base,
            merge_to=merge_to, force=force, on_step=on_step,
        )  # fmt: skip


def _load_session(
    base: str | Path,
    adapter: str | Path,
    *,
    adapter_name: str,
    model_class: str,
    device: str,
    device_map: str | None,
    dtype: str,
    is_trainable: bool,
    autocast_adapter_dtype: bool,
    low_cpu_mem_usage: bool,
    prompt: str | None,
    max_new_tokens: int,
    compare_base: bool,
    merge_to: str | Path | None,
    force: bool,
    on_step: Callable[[str], None] | None,
) -> LoadReport:
    import torch

    from adapterctl.engine.base import load_base, load_tokenizer, model_class_for
    from adapterctl.engine.model import AdapterModel
    from adapterctl.engine.weights import adapter_dir
    from adapterctl.format.config import LoraConfig
    from adapterctl.format.variants import refuse_variants

    step = on_step or (lambda _msg: None)
    base, directory = Path(base), adapter_dir(adapter)
    config = LoraConfig.from_file(directory / "adapter_config.json")
    refuse_variants(config, str(directory))  # before the base is loaded
    if config.encoding_problem:
        import logging

        logging.getLogger(__name__).warning(
            "`%s`: %s; adapterctl reads it",
            directory / "adapter_config.json",
            config.encoding_problem,
        )
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
        wrapped = AdapterModel.from_pretrained(
            model,
            directory,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
    adapter_s = time.perf_counter() - t0
    result = wrapped.last_load
    assert result is not None
    missing = list(result.missing_keys)
    if missing or result.unexpected_keys:
        what = []
        if missing:
            what.append(f"{len(missing)} adapter key(s) missing from the file: {_first(missing)}")
        if result.unexpected_keys:
            what.append(
                f"{len(result.unexpected_keys)} key(s) in the file match nothing in the model: "
                f"{_first(result.unexpected_keys)}"
            )
        raise IncompatibleModelError(
            "; ".join(what), hint="the adapter does not fit this base (or --model-class)"
        )
    kinds: Counter[str] = Counter(layer.kind for _, layer in wrapped.base_model.lora_layers())
    kinds["modules_to_save"] = sum(1 for _ in wrapped.base_model.wrappers())
    trainable, _ = wrapped.get_nb_trainable_parameters()
    adapter_params = sum(p.numel() for _, p in wrapped.base_model.adapter_parameters(adapter_name))

    generation = None
    if prompt is not None:
        step("generating")
        text = _generate(wrapped, tokenizer, prompt, max_new_tokens)
        base_text = None
        if compare_base:
            with wrapped.disable_adapter():
                base_text = _generate(wrapped, tokenizer, prompt, max_new_tokens)
        generation = Generation(prompt, text, base_text)

    merged_to = None
    if merge_to is not None:
        from adapterctl.engine.base import save_model
        from adapterctl.format.atomic import atomic_directory

        step(f"merging into {merge_to}")
        merged: Any = wrapped.merge_and_unload()
        with atomic_directory(merge_to, force=force, inputs=[base, adapter]) as tmp:
            save_model(merged, tmp)
            if tokenizer is None:
                try:
                    tokenizer = load_tokenizer(base)
                except AdapterNotFoundError:  # a base without a tokenizer merges fine
                    tokenizer = None
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        merged_to = str(merge_to)

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
        injected={k: v for k, v in sorted(kinds.items()) if v},
        trainable_parameters=trainable,
        adapter_parameters=adapter_params,
        missing_keys=missing,
        unexpected_keys=list(result.unexpected_keys),
        base_load_s=base_s,
        adapter_load_s=adapter_s,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        cuda_peak_mib=cuda_peak,
        warnings=[str(w.message) for w in caught],
        generation=generation,
        merged_to=merged_to,
    )
