"""The weights of a transformers base model read one tensor at a time from its shards (no model is
built): what `convert --base` needs to rebuild an initial PiSSA/OLoRA adapter, and what `merge`
streams through.

Safetensors shards are read by header, each tensor when asked for; a `.bin` base (`merge` only) is
read one shard at a time with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterctl.errors import AdapterctlError, AdapterFormatError, ConversionError
from adapterctl.format.dtypes import Dtype
from adapterctl.format.files import read_small
from adapterctl.format.rawtensor import RawTensor
from adapterctl.format.tensors import FileSpan, SafetensorsReader, bin_arrays

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TIED_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)


def _weight_map(label: Path) -> dict[str, str]:
    try:
        index = json.loads(read_small(label, "weights index"))
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterFormatError(f"`{label}` is not a weights index: {e}") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", "..")
        for k, v in weight_map.items()
    ):
        raise AdapterFormatError(f"`{label}`: weight_map must map names to shard files")
    return dict(weight_map)


class BaseCheckpoint:
    """`with BaseCheckpoint(path) as base: base.weight("model.layers.0.self_attn.q_proj")`.

    `allow_bin=True` also reads a `.bin` checkpoint (torch.load, weights only, one shard held at a time).
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_bin: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(
                f"base `{self.path}` is not a directory",
                hint="pass the original base model's directory (config.json + *.safetensors)",
            )
        self._bin_ok = allow_bin
        self.format = "safetensors"
        self._readers: dict[str, SafetensorsReader] = {}
        self._bin_shard: tuple[str, dict[str, tuple[Dtype, tuple[int, ...], Any]]] | None = None
        self._where = self._locate()
        self.tied = self._tied()

    def _locate(self) -> dict[str, str]:
        """Every tensor name -> the shard file holding it."""
        if (self.path / INDEX).is_file():
            return _weight_map(self.path / INDEX)
        if (self.path / SINGLE).is_file():
            return dict.fromkeys(self._reader(SINGLE).tensors, SINGLE)
        if self._bin_ok and (self.path / BIN_INDEX).is_file():
            self.format = "bin"
            return _weight_map(self.path / BIN_INDEX)
        if self._bin_ok and (self.path / BIN_SINGLE).is_file():
            self.format = "bin"
            return dict.fromkeys(self._bin(BIN_SINGLE), BIN_SINGLE)
        found = sorted(p.name for p in self.path.glob("*.bin"))
        if self._bin_ok:
            raise AdapterFormatError(
                f"no `{SINGLE}`, `{INDEX}`, `{BIN_SINGLE}` or `{BIN_INDEX}` in base `{self.path}`",
                hint="pass a transformers model directory (save_pretrained writes one)",
            )
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

    def is_tied_embedding(self, key: str) -> bool:
        """Whether `key` is the input embedding that a tied output head shares."""
        return self.tied and key.endswith(TIED_EMBEDDINGS)

    def _reader(self, shard: str) -> SafetensorsReader:
        if shard not in self._readers:
            self._readers[shard] = SafetensorsReader(self.path / shard)
        return self._readers[shard]

    def _bin(self, shard: str) -> dict[str, tuple[Dtype, tuple[int, ...], Any]]:
        """A `.bin` shard's tensors; only the last one asked for stays in memory."""
        if self._bin_shard is None or self._bin_shard[0] != shard:
            self._bin_shard = None  # the previous shard goes before the next is loaded
            self._bin_shard = (shard, bin_arrays(self.path / shard))
        return self._bin_shard[1]

    @property
    def shards(self) -> list[str]:
        """The shard files, in the order their tensors come (index order of first appearance)."""
        return list(dict.fromkeys(sorted(self._where.values())))

    def tensors(self) -> Iterator[tuple[str, str, Dtype, tuple[int, ...]]]:
        """(name, shard, dtype, shape) of every stored tensor: shard by shard, each shard's
        tensors in the file's own order."""
        for shard in self.shards:
            wanted = {k for k, v in self._where.items() if v == shard}
            if self.format == "bin":
                stored = self._bin(shard)
                items = [(k, d, s) for k, (d, s, _) in stored.items()]
            else:
                header = self._reader(shard).tensors
                ordered = sorted(header.items(), key=lambda kv: kv[1].start)
                items = [(k, t.dtype, t.shape) for k, t in ordered]
            seen = {k for k, _, _ in items}
            lacking = sorted(wanted - seen)
            if lacking:
                raise AdapterFormatError(
                    f"`{self.path / shard}` lacks `{lacking[0]}`, which its index names"
                )
            for name, dtype, shape in items:
                if name in wanted:
                    yield name, shard, dtype, tuple(shape)

    def key_for(self, module: str) -> str:
        """The checkpoint's name for `module`'s weight: the same path, or the path without / with
        the model's base prefix (a checkpoint of LlamaModel has no `model.`), or a tied lm_head's
        input embedding."""
        return self.key_of(module, "weight")

    def key_of(self, module: str, param: str) -> str:
        """`key_for` for any parameter of a module (`bias`, ...)."""
        found = self.find(module, param)
        if found is not None:
            return found
        candidates = self._candidates(module, param)
        raise ConversionError(
            f"base `{self.path}` has no {param} for `{module}`"
            + (f" (several match: {', '.join(candidates[:3])})" if candidates else ""),
            hint="pass the base model the adapter was made on",
        )

    def _candidates(self, module: str, param: str) -> list[str]:
        wanted = f"{module}.{param}"
        tail = wanted.split(".", 1)[1] if "." in module else wanted
        return sorted(
            k
            for k in self._where
            if k == tail or k.endswith("." + wanted) or k.endswith("." + tail)
        )

    def find(self, module: str, param: str = "weight") -> str | None:
        """`key_of`, or None where the checkpoint has no such tensor."""
        wanted = f"{module}.{param}"
        if wanted in self._where:
            return wanted
        candidates = self._candidates(module, param)
        if len(candidates) == 1:
            return candidates[0]
        if param == "weight" and module.rsplit(".", 1)[-1] == "lm_head" and self.tied:
            tied = [k for k in self._where if k.endswith(TIED_EMBEDDINGS)]
            if len(tied) == 1:
                return tied[0]
        return None

    def span(self, key: str) -> FileSpan | None:
        """Where the stored tensor `key`'s bytes lie in its safetensors shard, for the writer to
        copy in the kernel (None for a `.bin` base, whose tensors are unpickled)."""
        if self.format == "bin":
            return None
        reader = self._reader(self._where[key])
        if key not in reader.tensors:
            raise AdapterFormatError(f"`{reader.path}` lacks `{key}`, which its index names")
        return reader.span(key)

    def pieces(self, key: str) -> Iterator[bytes | memoryview]:
        """The stored tensor `key`'s bytes in pieces of about 1 MiB cut at element boundaries
        (a `.bin` shard's tensor, already in memory, as one piece): copied, a tensor of any size
        is never whole in memory."""
        shard = self._where[key]
        if self.format == "bin":
            yield self.read(key).buffer()
            return
        reader = self._reader(shard)
        if key not in reader.tensors:
            raise AdapterFormatError(f"`{reader.path}` lacks `{key}`, which its index names")
        yield from reader.iter_bytes(key)

    def read(self, key: str) -> RawTensor:
        """The stored tensor `key` (a name the checkpoint holds)."""
        shard = self._where[key]
        if self.format == "bin":
            stored = self._bin(shard)
            if key not in stored:
                raise AdapterFormatError(
                    f"`{self.path / shard}` lacks `{key}`, which its index names"
                )
            dtype, shape, array = stored[key]
            return RawTensor(dtype, shape, array)
        reader = self._reader(shard)
        if key not in reader.tensors:
            raise AdapterFormatError(f"`{reader.path}` lacks `{key}`, which its index names")
        t = reader.tensors[key]
        return RawTensor(t.dtype, t.shape, reader.read_bytes(key))

    def weight(self, module: str) -> RawTensor:
        return self.read(self.key_for(module))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._bin_shard = None

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
