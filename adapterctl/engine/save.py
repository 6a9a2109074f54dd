"""`adapterctl save` as one library call: a new adapter on a base model, written as PEFT writes it."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.errors import ConfigError, InvalidOptionError
from adapterctl.ops import SCHEMA_VERSION
from adapterctl.ops.checks import pattern_warnings

if TYPE_CHECKING:
    from adapterctl.format.newconfig import NewAdapter

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "added_tokens.json",
)  # fmt: skip


@dataclass(frozen=True)
class SaveReport:
    output: str
    adapter_name: str
    base: str
    base_class: str
    init: str | bool
    modules: int
    parameters: int
    files: list[str]
    residual_out: str | None
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "output": self.output,
            "adapter_name": self.adapter_name,
            "base": self.base,
            "base_class": self.base_class,
            "init_lora_weights": self.init,
            "modules": self.modules,
            "parameters": self.parameters,
            "files": self.files,
            "residual_out": self.residual_out,
            "seconds": round(self.seconds, 4),
            "warnings": self.warnings,
        }


def create_adapter(
    base: str | Path, output: str | Path, new: NewAdapter, **kwargs: Any
) -> SaveReport:
    """Load `base`, create the adapter `new` describes, and write it (and a residual base);
    keyword arguments as `_create`'s. transformers' own progress bars stay off."""
    from adapterctl.engine.base import quiet_transformers

    with quiet_transformers():
        return _create(base, output, new, **kwargs)


def _create(
    base: str | Path,
    output: str | Path,
    new: NewAdapter,
    *,
    adapter_name: str = "default",
    residual_out: str | Path | None = None,
    safe_serialization: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    seed: int = 0,
    force: bool = False,
) -> SaveReport:
    """Load `base`, create the adapter `new` describes, and write it (and a residual base)."""
    import torch

    from adapterctl.engine.base import load_base, model_class_for, save_model
    from adapterctl.engine.inject import module_names
    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.atomic import AtomicOutputs, preflight
    from adapterctl.format.config import LoraConfig, reload_drift, residual_init

    start = time.perf_counter()
    from adapterctl.engine.base import check_options
    from adapterctl.ops.hub import hub_or_local, resolve

    check_options(dtype=dtype, device=device, adapter_name=adapter_name)
    config_fields = new.config_fields()
    if isinstance(hub_or_local(base, bare=True), str):  # the config names the Hub id
        config_fields = {"base_model_name_or_path": str(base), **config_fields}
    try:  # the fields are the caller's options, not a file: a bad one is a usage error
        config = LoraConfig(**config_fields)
    except ConfigError as e:
        raise InvalidOptionError(e.message, hint=e.hint) from e
    init = config.init_lora_weights
    residual = residual_init(init)
    if residual and residual_out is None:
        raise InvalidOptionError(
            f"--init {init} turns the base into a residual model: pass --residual-out DIR to keep it",
            hint="train on the residual base with this adapter, then `adapterctl convert`",
        )
    if residual_out is not None and not residual:
        raise InvalidOptionError(
            "--residual-out does nothing without --init pissa, pissa_niter_K or olora",
            hint="drop --residual-out, or pass --init pissa/olora",
        )
    base, output = resolve(base, kind="base"), Path(output)
    outputs = [output] if residual_out is None else [output, Path(residual_out)]
    preflight(outputs, force=force, inputs=[base])
    cls, _ = model_class_for(base, config, "auto")
    model = load_base(base, cls, device=device, dtype=dtype)
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = get_adapter_model(model, config, adapter_name)
        targets = [p for p, layer in wrapped.base_model.lora_layers() if adapter_name in layer.r]
        # what `inspect` and `load` count: DoRA magnitudes and saved copies included
        parameters = sum(p.numel() for _, p in wrapped.base_model.adapter_parameters(adapter_name))
        pattern_warnings(
            config,
            targets,
            lambda m: warnings.warn(m, UserWarning, stacklevel=1),
            where="that this adapter targets",
            names=module_names(wrapped.base_model.model),
        )
        drift = reload_drift(config, targets)
        if drift:
            raise InvalidOptionError(
                f"overlapping rank/alpha patterns would mean something else once saved: {drift[0]}",
                hint="use patterns that do not overlap, or order them so that sorted order agrees",
            )
        if residual:
            # PEFT's documented workflow: the saved adapter says `true`, so loading it on the
            # residual base does not decompose again
            # (on the config as injection left it: all-linear expanded, as PEFT writes it)
            saved = wrapped.peft_config[adapter_name]
            wrapped.peft_config[adapter_name] = saved.replace(init_lora_weights=True)
        # the adapter and the residual base appear together or not at all
        with AtomicOutputs(force=force, inputs=[base]) as written:
            tmp = written.add(output)
            wrapped.save_pretrained(
                tmp,
                safe_serialization=safe_serialization,
                save_embedding_layers=new.embeddings,
            )
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            if residual_out is not None:
                plain: Any = wrapped.unload()  # the base layers hold the residual weights now
                tmp = written.add(residual_out)
                save_model(plain, tmp)
                for name in _TOKENIZER_FILES:
                    if (base / name).is_file():
                        shutil.copyfile(base / name, tmp / name)
    return SaveReport(
        output=str(output),
        adapter_name=adapter_name,
        base=str(base),
        base_class=type(model).__name__,
        init=init,
        modules=len(targets),
        parameters=parameters,
        files=files,
        residual_out=None if residual_out is None else str(residual_out),
        seconds=time.perf_counter() - start,
        warnings=[str(w.message) for w in caught],
    )
