"""select_adapters(): a new PEFT directory holding only the chosen adapters, bytes copied as they are."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.errors import AdapterFormatError, SelectionError
from adapterctl.format.atomic import atomic_directory, check_not_inside, check_output
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.header import read_header
from adapterctl.format.layout import (
    BIN_NAME,
    README_NAME,
    SAFETENSORS_NAME,
    AdapterFiles,
    adapter_subdir,
    find_adapters,
    pick_adapters,
    validate_adapter_name,
)
from adapterctl.format.tensors import copy_stream, load_bin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectedAdapter:
    name: str  # the name in the output
    source_name: str
    path: str  # folder inside the output ("" for the root)
    files: tuple[str, ...]
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_name": self.source_name,
            "path": self.path,
            "files": list(self.files),
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class SelectionResult:
    source: str
    output: str
    adapters: tuple[SelectedAdapter, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "source": self.source,
            "output": self.output,
            "adapters": [a.to_dict() for a in self.adapters],
        }


def parse_renames(pairs: Sequence[str]) -> dict[str, str]:
    """`OLD=NEW` strings to a mapping; each OLD at most once."""
    renames: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise SelectionError(
                f"invalid rename {pair!r}: expected OLD=NEW", hint="e.g. --rename alpha=default"
            )
        if old in renames:
            raise SelectionError(f"adapter `{old}` is renamed twice")
        renames[old] = new
    return renames


def _validate(files: AdapterFiles) -> None:
    """Refuse what PEFT could not load: a bad config or header, or an unsafe pickle."""
    if files.config_path is None:
        raise AdapterFormatError(
            f"`{files.weights_path}` has no `{CONFIG_NAME}` beside it; a PEFT directory needs one"
        )
    problem = LoraConfig.from_file(files.config_path).encoding_problem
    if problem:  # copied as it is: the copy has the same problem
        log.warning("`%s`: %s; the copy keeps its bytes", files.config_path, problem)
    if files.format == "bin":
        load_bin(files.weights_path)
    else:
        read_header(files.weights_path)


def select_adapters(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    adapters: Sequence[str],
    renames: dict[str, str] | None = None,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SelectionResult:
    """Write `output` with only `adapters` from `source`, renamed by `renames` (old -> new).

    The adapter that ends up named `default` goes to the root, the others to subfolders, as PEFT
    lays them out; configs and weights are copied byte for byte and the source's README.md comes
    along. The output appears atomically or not at all.
    """
    renames = dict(renames or {})
    if not adapters:
        raise SelectionError("no adapter chosen", hint="pass --adapter NAME at least once")
    if len(set(adapters)) != len(adapters):
        raise SelectionError("an adapter is chosen more than once")
    for old in renames:
        if old not in adapters:
            raise SelectionError(f"`{old}` is renamed but not chosen", hint=f"add --adapter {old}")
    picked = pick_adapters(find_adapters(source), list(adapters), source)
    new_names = [validate_adapter_name(renames.get(a.name, a.name)) for a in picked]
    if len(set(new_names)) != len(new_names):
        raise SelectionError(f"two chosen adapters would both be named {sorted(new_names)}")
    out = Path(output)
    check_output(Path(os.path.abspath(out)), force)
    check_not_inside(out, [source])
    for files in picked:
        _validate(files)
        for message in files.warnings:
            log.warning("%s", message)
    total = sum(os.path.getsize(p) for f in picked for p in (f.config_path, f.weights_path) if p)

    def advance(n: int) -> None:
        if progress is not None:
            progress(n, total)

    results = []
    with atomic_directory(out, force=force) as tmp:
        root = Path(source)
        if root.is_dir():
            _copy_card(root, tmp, picked, new_names if renames else None)
        for files, new in zip(picked, new_names, strict=True):
            sub = adapter_subdir(new)
            target = tmp / sub if sub else tmp
            target.mkdir(exist_ok=True)
            written = []
            nbytes = 0
            weights_name = SAFETENSORS_NAME if files.format == "safetensors" else BIN_NAME
            for src, name in ((files.config_path, CONFIG_NAME), (files.weights_path, weights_name)):
                assert src is not None
                with open(src, "rb") as fi, open(target / name, "xb") as fo:
                    nbytes += copy_stream(fi, fo, advance)
                written.append(f"{sub}/{name}" if sub else name)
            results.append(SelectedAdapter(new, files.name, sub, tuple(written), nbytes))
    return SelectionResult(os.fspath(source), os.fspath(out), tuple(results))


def _copy_card(
    root: Path, tmp: Path, picked: list[AdapterFiles], new_names: list[str] | None
) -> None:
    """SOURCE's card, as it is; with renames, its adapter facts rewritten for the new names."""
    from adapterctl.format.files import read_optional

    data = read_optional(root / README_NAME, "model card")
    if data is None:
        return
    if new_names is not None:
        from adapterctl.ops.card import facts_note, read_card, refresh_card

        existing = read_card(root)
        if existing is None:  # removed meanwhile
            return
        configs = {}
        for files, name in zip(picked, new_names, strict=True):
            assert files.config_path is not None
            configs[name] = LoraConfig.from_file(files.config_path)
        where = f"`{root / README_NAME}`"
        data = refresh_card(existing, configs, where).encode("utf-8")
        note = facts_note(existing, configs, where)
        if note:
            log.warning("%s", note)
    (tmp / README_NAME).write_bytes(data)
