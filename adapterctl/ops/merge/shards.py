"""Output shards as transformers writes them: `--max-shard-size` parsed as huggingface_hub parses
it, tensors split in order (a new shard when the next tensor would overflow the current one, a
tensor larger than the limit alone in its own), named `model-00001-of-0000N.safetensors` with a
`model.safetensors.index.json`, or one `model.safetensors`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from adapterctl.errors import InvalidOptionError

#: transformers' default `max_shard_size` (PreTrainedModel.save_pretrained)
DEFAULT_MAX_SHARD_SIZE = "50GB"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]{2})?\s*")


def parse_size(size: str | int) -> int:
    """ "5GB" -> 5_000_000_000 (decimal units, as huggingface_hub's parse_size_to_int), or bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.fullmatch(str(size)) if len(str(size)) <= 40 else None
        unit = (m.group(2) or "").upper() if m else ""
        if m is None or (unit and unit not in _UNITS) or (not unit and "." in m.group(1)):
            raise InvalidOptionError(
                f"--max-shard-size {str(size)[:40]!r} is not a size",
                hint='give bytes or a number with KB, MB, GB or TB, e.g. "5GB" or "500MB"',
            )
        value = int(float(m.group(1)) * _UNITS[unit]) if unit else int(m.group(1))
    if value <= 0:
        raise InvalidOptionError(f"--max-shard-size must be positive, not {size}")
    return value


def split(sizes: list[tuple[str, int]], max_size: int) -> list[list[str]]:
    """Tensor names grouped into shards, in order, as huggingface_hub's
    split_torch_state_dict_into_shards groups them."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_size:
            shards.append([name])
            continue
        if current_size + size > max_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards or [[]]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, shards: dict[str, list[str]], total_size: int) -> None:
    """transformers' index: metadata.total_size and every tensor's shard, sorted keys."""
    weight_map = {name: file for file, names in shards.items() for name in names}
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(directory / INDEX, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
