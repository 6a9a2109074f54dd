"""Loading a transformers base model for an adapter: which class, which device, which dtype."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterctl.errors import (
    AdapterctlError,
    AdapterNotFoundError,
    IncompatibleModelError,
    InvalidOptionError,
)
from adapterctl.format.config import LoraConfig
from adapterctl.format.files import read_small

#: --model-class values and the transformers auto class each one means.
MODEL_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "question-ans": "AutoModelForQuestionAnswering",
    "feature-extraction": "AutoModel",
}
_TASK_TO_CLASS = {
    "CAUSAL_LM": "causal-lm",
    "SEQ_CLS": "seq-cls",
    "TOKEN_CLS": "token-cls",
    "SEQ_2_SEQ_LM": "seq2seq-lm",
    "QUESTION_ANS": "question-ans",
    "FEATURE_EXTRACTION": "feature-extraction",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::[0-9]+)?|xpu(?::[0-9]+)?")


def check_options(
    model_class: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    adapter_name: str = "default",
) -> None:
    """--model-class, --dtype, --device and --adapter-name, refused before anything is loaded or
    downloaded."""
    from adapterctl.errors import SelectionError
    from adapterctl.format.layout import validate_adapter_name

    try:
        validate_adapter_name(adapter_name)
    except SelectionError as e:
        raise InvalidOptionError(f"--adapter-name: {e.message}", hint=e.hint) from e
    if model_class != "auto" and model_class not in MODEL_CLASSES:
        raise InvalidOptionError(
            f"--model-class: unknown model class {model_class!r}",
            hint=f"one of: auto, {', '.join(MODEL_CLASSES)}",
        )
    if dtype not in DTYPES:
        raise InvalidOptionError(
            f"--dtype: unknown dtype {dtype!r}", hint=f"one of: {', '.join(DTYPES)}"
        )
    if not _DEVICE.fullmatch(device):
        raise InvalidOptionError(
            f"--device: unknown device {device!r}", hint="auto, cpu, cuda or cuda:N"
        )


def model_class_for(base: Path, config: LoraConfig, choice: str = "auto") -> tuple[Any, str]:
    """The transformers class to load `base` with, and where that choice came from.

    `choice` other than "auto" wins; then the adapter's task_type; then its auto_mapping; then the
    `architectures` in the base's config.json.
    """
    import transformers

    if choice != "auto":
        check_options(model_class=choice)
        return getattr(transformers, MODEL_CLASSES[choice]), f"--model-class {choice}"
    if config.task_type in _TASK_TO_CLASS:
        name = MODEL_CLASSES[_TASK_TO_CLASS[config.task_type]]
        return getattr(transformers, name), f"task_type {config.task_type}"
    mapping = config.auto_mapping or {}
    cls_name = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    parent = mapping.get("parent_library", "") if isinstance(mapping, dict) else ""
    if cls_name and str(parent).startswith("transformers") and hasattr(transformers, cls_name):
        return getattr(transformers, cls_name), "auto_mapping"
    try:
        archs = (
            json.loads(read_small(base / "config.json", "model config")).get("architectures") or []
        )
    except (AdapterctlError, ValueError, RecursionError, AttributeError):
        archs = []
    for arch in archs:
        if hasattr(transformers, arch):
            return getattr(transformers, arch), "the base's config.json"
    raise AdapterctlError(
        f"cannot tell which model class to load `{base}` with",
        hint="pass --model-class causal-lm (or seq-cls, token-cls, ...)",
    )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapterctlError(
            f"--device {device}: CUDA is not available here", hint="use --device cpu"
        )
    return device


def load_base(
    base: Path,
    model_class: Any,
    *,
    device: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    dtype: str = "auto",
) -> Any:
    """`model_class.from_pretrained(base)` on the chosen device and dtype, offline."""
    import torch

    if not (base / "config.json").is_file():
        raise AdapterNotFoundError(
            f"`{base}` is not a transformers model directory (no config.json)",
            hint="pass the directory that `save_pretrained` wrote",
        )
    check_options(dtype=dtype, device=device)
    from adapterctl.format.header import check_path_not_lfs_pointer

    for weights in sorted(base.glob("*.safetensors")) + sorted(base.glob("*.bin")):
        check_path_not_lfs_pointer(weights)  # transformers would fail on its header or pickle
    target = resolve_device(device) if device_map is None else None  # refuse before loading
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # our checks say it
    try:
        model, info = model_class.from_pretrained(
            str(base), local_files_only=True, output_loading_info=True, **kwargs
        )
    except pickle.UnpicklingError as e:  # transformers loads .bin weights with weights_only
        from adapterctl.format.tensors import refused_pickle

        bins = sorted(base.glob("*.bin"))
        raise refused_pickle(str(bins[0] if len(bins) == 1 else base / "*.bin"), e) from e
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IncompatibleModelError(
            f"cannot load `{base}` as {getattr(model_class, '__name__', model_class)}: {first}",
            hint="check --model-class",
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or []) + sorted(
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []
    )
    if missing:
        shown = ", ".join(f"`{k}`" for k in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise IncompatibleModelError(
            f"`{base}` does not fit {model_class.__name__}: {len(missing)} of its weights are not "
            f"in the checkpoint (they would be random): {shown}",
            hint="the adapter was made for another architecture, or pass --model-class",
        )
    if target is not None:
        model = model.to(target)
    return model.eval()


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model",
)  # fmt: skip


def load_tokenizer(base: Path) -> Any:
    """The tokenizer saved with the base (transformers would invent an empty one otherwise)."""
    from transformers import AutoTokenizer

    if not any((base / name).is_file() for name in _TOKENIZER_FILES):
        raise AdapterNotFoundError(
            f"`{base}` has no usable tokenizer: none of {', '.join(_TOKENIZER_FILES)} is there",
            hint="--prompt needs the tokenizer files next to the base model",
        )
    try:
        return AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterNotFoundError(
            f"`{base}` has no usable tokenizer: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
            hint="--prompt needs the tokenizer files next to the base model",
        ) from e


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or load reports: the caller shows its own steps."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def save_model(model: Any, directory: Path) -> None:
    """transformers' save_pretrained of a plain model into `directory`, with safetensors' I/O
    errors (SafetensorError: "... (os error 28)") raised as the OSError they are, so the writer
    names the output and the reason instead of failing as an internal error."""
    import errno
    import os
    import re

    from safetensors import SafetensorError

    try:
        model.save_pretrained(str(directory))
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code) if found else str(e)) from e
