"""The sources of a combine: each SOURCE found (an adapter folder, `DIR/NAME` inside a
multi-adapter folder, a weights file, or a Hub id through `ops.hub.resolve`), its config read and
its tensors classified into LoRA modules; what combine cannot compute exactly is refused here,
before anything is written."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from adapterctl.errors import AdapterFormatError, ConversionError, UnsupportedVariantError
from adapterctl.format.config import LoraConfig, residual_init
from adapterctl.format.dtypes import Dtype
from adapterctl.format.factors import pair_problem
from adapterctl.format.keys import classify
from adapterctl.format.layout import AdapterFiles, find_adapters, pick_adapters
from adapterctl.format.nonfinite import NONFINITE_CODES, count_nonfinite, has_nonfinite
from adapterctl.format.rawtensor import FLOAT_CODES, OpenStore, RawTensor, TensorStore, numel
from adapterctl.format.variants import refuse_variants
from adapterctl.ops.convert import one_adapter

log = logging.getLogger(__name__)

#: the LoRA layers combine computes (a convolution's factors are not a plain product it splits)
SUPPORTED = "Linear, Conv1D and Embedding LoRA"
_HINT = f"combine computes {SUPPORTED} adapters; `adapterctl select` copies others unchanged"
_PAIRS = {"lora_A": ("lora_B", "linear"), "lora_embedding_A": ("lora_embedding_B", "embedding")}


@dataclass(frozen=True)
class SourceModule:
    """One LoRA module of one source: its factors' keys, rank and own scaling (patterns and
    rslora applied: LoraConfig.scaling/alpha_for/rank_for)."""

    module: str
    kind: str  # "linear" (Linear, Conv1D) | "embedding"
    a_key: str
    b_key: str
    rank: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtypes: tuple[Dtype, Dtype]  # A's, B's
    scaling: float


@dataclass
class Source:
    label: str
    files: AdapterFiles
    config: LoraConfig
    store: TensorStore
    modules: dict[str, SourceModule] = field(default_factory=dict)
    #: keys of modules_to_save tensors (carried over when only this source has them)
    saved: list[str] = field(default_factory=list)
    #: keys of saved copies of base weights (PEFT's `save_embedding_layers`: an embedding's
    #: `base_layer.weight`), carried over when every source that has one has the same
    base_copies: list[str] = field(default_factory=list)


def find_source(spec: str | os.PathLike[str], token: str | None = None) -> AdapterFiles:
    """The one adapter SOURCE names: a folder or weights file; `DIR/NAME`, adapter NAME of the
    multi-adapter folder DIR (the root adapter is `default`); else a Hub id."""
    path = Path(spec)
    if not path.exists() and path.parent.is_dir() and path.name:
        with contextlib.suppress(AdapterFormatError):
            found = find_adapters(path.parent)
            if any(a.name == path.name for a in found):
                (files,) = pick_adapters(found, [path.name], path.parent)
                if files.config_path is None:  # pragma: no cover - found by its config
                    raise AdapterFormatError(f"`{files.weights_path}` has no config beside it")
                return files
    if not path.exists():
        from adapterctl.ops.hub import resolve

        path = resolve(spec, kind="adapters", token=token)
    return one_adapter(path, "source")


def _refuse_config(config: LoraConfig, label: str) -> None:
    refuse_variants(config, label, _HINT)
    if config.use_dora:
        raise UnsupportedVariantError(
            f"`{label}` is a DoRA adapter: its weight change depends on the base weight and is "
            "not a sum of factor products, so it cannot be combined from the files",
            hint="turn it into plain LoRA first: `adapterctl convert SOURCE OUT --base BASE "
            "--dora-to-lora`",
        )
    if config.lora_bias:
        raise UnsupportedVariantError(
            f"`{label}` trains a bias on lora_B (`lora_bias`), which no combination of factors "
            "can carry",
            hint=_HINT,
        )
    if config.bias != "none":
        raise UnsupportedVariantError(
            f'`{label}` trains the base\'s biases (`bias: "{config.bias}"`), which cannot be '
            "combined into LoRA factors",
            hint=_HINT,
        )
    if residual_init(config.init_lora_weights):
        raise ConversionError(
            f"`{label}` is a {config.init_lora_weights} adapter: its factors change the base, so "
            "they cannot be combined as they are",
            hint="convert it to plain LoRA first (`adapterctl convert --initial` or `--base`)",
        )


def open_source(files: AdapterFiles, label: str, stack: contextlib.ExitStack) -> Source:
    """Read one source's config and classify its tensors (headers only)."""
    assert files.config_path is not None  # find_source
    config = LoraConfig.from_file(files.config_path)
    _refuse_config(config, label)
    store = stack.enter_context(OpenStore(files.weights_path, files.format))
    source = Source(label, files, config, store)
    specs = store.specs()
    saved_names = config.modules_to_save or []
    for key, (dtype, shape) in specs.items():
        info = classify(key, saved_names)
        if info.kind == "modules_to_save":
            source.saved.append(key)
            continue
        if info.kind in ("lora_B", "lora_embedding_B"):
            continue  # with its A
        if info.kind in ("embedding", "base_layer"):
            source.base_copies.append(key)
            continue
        if info.kind not in _PAIRS or info.depth:
            raise UnsupportedVariantError(
                f"`{label}`: `{key}` is {_what(info.kind, info.depth)}, which combine cannot "
                "compute",
                hint=_HINT,
            )
        b_kind, kind = _PAIRS[info.kind]
        b_key = key.replace(f".{info.kind}", f".{b_kind}", 1)
        if b_key not in specs:
            raise AdapterFormatError(f"`{label}`: `{key}` has no `{b_key}` beside it")
        b_dtype, b_shape = specs[b_key]
        for k, d in ((key, dtype), (b_key, b_dtype)):
            if d.code not in FLOAT_CODES:
                raise AdapterFormatError(
                    f"`{label}`: `{k}` is {d.code}: LoRA factors are floating-point numbers",
                    hint=f"factors are one of {', '.join(FLOAT_CODES)}; this file is not a "
                    "LoRA adapter PEFT wrote",
                )
        if len(shape) != 2:
            raise UnsupportedVariantError(
                f"`{label}`: `{info.module}` is a convolution's LoRA ({list(shape)}), which "
                "combine does not compute",
                hint=_HINT,
            )
        problem = pair_problem(info.kind, shape, b_kind, b_shape)
        if problem:
            raise AdapterFormatError(f"`{label}`: `{info.module}`: {problem}")
        rank = config.rank_for(info.module)
        if rank != shape[0]:
            raise AdapterFormatError(
                f"`{label}`: `{info.module}` has rank {shape[0]} but its config gives it {rank}"
            )
        scaling = config.scaling(config.alpha_for(info.module), rank)
        source.modules[info.module] = SourceModule(
            info.module, kind, key, b_key, rank, shape, b_shape, (dtype, b_dtype), scaling
        )
    if not source.modules:
        raise AdapterFormatError(f"`{label}` holds no LoRA factors to combine")
    return source


def finite_factor(source: Source, key: str) -> RawTensor:
    """`key` of `source`, refused where it holds NaN or ±Inf (a sum, a pruning or an SVD of it is
    no number): found on the bits as the factor is read for combining (format.nonfinite:
    `has_nonfinite` at memory speed, counted only where there are some), so the sources are read
    once; the output is still in its temporary folder then, so nothing is written."""
    t = source.store.get(key)
    if t.dtype.code not in NONFINITE_CODES or not has_nonfinite(t):
        return t
    found = count_nonfinite(t.buffer(), t.dtype.code)
    raise ConversionError(
        f"`{source.label}`: `{key}` holds {found.describe()} (of {numel(t.shape):,} "
        "values): its module cannot be combined",
        hint="nothing was written; `adapterctl inspect --check` lists every tensor "
        "holding NaN or Inf",
    )


def _what(kind: str, depth: int) -> str:
    if depth:
        return "a `target_parameters` LoRA (on a parameter, not a layer)"
    return {
        "lora_magnitude_vector": "a DoRA magnitude",
        "lora_B.bias": "a `lora_bias` bias",
        "bias": "a trained bias",
        "embedding": "a full embedding weight (saved with `save_embedding_layers`)",
        "trainable_tokens_delta": "a trainable-tokens delta",
    }.get(kind, "not a LoRA factor")


def identity(files: AdapterFiles) -> tuple[int, int]:
    """The weights file's device and inode: two SOURCEs naming one adapter are one source."""
    st = os.stat(files.weights_path)
    return st.st_dev, st.st_ino
