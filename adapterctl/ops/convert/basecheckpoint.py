"""The weights of a transformers base model read one tensor at a time from its safetensors shards
(no model is built, nothing else is read): what `convert --base` needs to rebuild an initial
PiSSA/OLoRA adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapterctl.errors import AdapterctlError, AdapterFormatError, ConversionError
from adapterctl.format.files import read_small
from adapterctl.format.rawtensor import RawTensor
from adapterctl.format.tensors import SafetensorsReader

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_TIED_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)


class BaseCheckpoint:
    """`with BaseCheckpoint(path) as base: base.weight("model.layers.0.self_attn.q_proj")`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(
                f"base `{self.path}` is not a directory",
                hint="pass the original base model's directory (config.json + *.safetensors)",
            )
        self._readers: dict[str, SafetensorsReader] = {}
        self._where = self._locate()
        self.tied = self._tied()

    def _locate(self) -> dict[str, str]:
        """Every tensor name -> the shard file holding it."""
        if (self.path / INDEX).is_file():
            label = self.path / INDEX
            try:
                index = json.loads(read_small(label, "weights index"))
                weight_map = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise AdapterFormatError(f"`{label}` is not a safetensors index: {e}") from e
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", "..")
                for k, v in weight_map.items()
            ):
                raise AdapterFormatError(f"`{label}`: weight_map must map names to shard files")
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            return dict.fromkeys(self._reader(SINGLE).tensors, SINGLE)
        found = sorted(p.name for p in self.path.glob("*.bin"))
        raise ConversionError(
            f"no `{SINGLE}` or `{INDEX}` in base `{self.path}`"
            + (f" (it holds {found[0]})" if found else ""),
            hint="the base is read from safetensors only; save it with safe_serialization=True",
        )

    def _tied(self) -> bool:
        try:
            config: Any = json.loads(read_small(self.path / "config.json", "model config"))
        except (AdapterctlError, ValueError, RecursionError):
            return False
        return isinstance(config, dict) and bool(config.get("tie_word_embeddings", False))

    def _reader(self, shard: str) -> SafetensorsReader:
        if shard not in self._readers:
            self._readers[shard] = SafetensorsReader(self.path / shard)
        return self._readers[shard]

    def key_for(self, module: str) -> str:
        """The checkpoint's name for `module`'s weight: the same path, or the path without / with
        the model's base prefix (a checkpoint of LlamaModel has no `model.`), or a tied lm_head's
        input embedding."""
        wanted = f"{module}.weight"
        if wanted in self._where:
            return wanted
        tail = wanted.split(".", 1)[1] if "." in module else wanted
        candidates = sorted(
            k
            for k in self._where
            if k == tail or k.endswith("." + wanted) or k.endswith("." + tail)
        )
        if len(candidates) == 1:
            return candidates[0]
        if module.rsplit(".", 1)[-1] == "lm_head" and self.tied:
            tied = [k for k in self._where if k.endswith(_TIED_EMBEDDINGS)]
            if len(tied) == 1:
                return tied[0]
        raise ConversionError(
            f"base `{self.path}` has no weight for `{module}`"
            + (f" (several match: {', '.join(candidates[:3])})" if candidates else ""),
            hint="pass the base model the adapter was made on",
        )

    def weight(self, module: str) -> RawTensor:
        key = self.key_for(module)
        reader = self._reader(self._where[key])
        if key not in reader.tensors:
            raise AdapterFormatError(f"`{reader.path}` lacks `{key}`, which its index names")
        t = reader.tensors[key]
        return RawTensor(t.dtype, t.shape, reader.array(key))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
