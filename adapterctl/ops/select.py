"""select_adapters(): a new PEFT directory holding only the chosen adapters, bytes copied as they are."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.errors import AdapterFormatError, InvalidOptionError, SelectionError
from adapterctl.format.atomic import atomic_directory, preflight
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.files import read_small
from adapterctl.format.header import read_header
from adapterctl.format.layout import (
    BIN_NAME,
    README_NAME,
    SAFETENSORS_NAME,
    AdapterFiles,
    adapter_subdir,
    find_adapters,
    pick_adapters,
    read_readme,
    validate_adapter_name,
)
from adapterctl.format.tensors import copy_stream, load_bin
from adapterctl.format.variants import variant_message, variants_in
from adapterctl.ops import SCHEMA_VERSION

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
            "schema_version": SCHEMA_VERSION,
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
            raise InvalidOptionError(
                f"invalid rename {pair!r}: expected OLD=NEW", hint="e.g. --rename alpha=default"
            )
        if old in renames:
            raise InvalidOptionError(f"adapter `{old}` is renamed twice")
        renames[old] = new
    return renames


@dataclass(frozen=True)
class _Checked:
    """One adapter as validated: the config's bytes (written as they are), and the weights' size
    and header, which the copy must match."""

    files: AdapterFiles
    config: bytes
    size: int
    header: bytes | None  # the safetensors header (None for .bin)


def _validate(files: AdapterFiles) -> _Checked:
    """Refuse what PEFT could not load: a bad config or header, or an unsafe pickle."""
    if files.config_path is None:
        raise AdapterFormatError(
            f"`{files.weights_path}` has no `{CONFIG_NAME}` beside it; a PEFT directory needs one"
        )
    label = os.fspath(files.config_path)
    config = read_small(files.config_path, "adapter config")
    try:
        size = os.path.getsize(files.weights_path)
    except OSError as e:
        raise AdapterFormatError(f"cannot read `{e.filename or label}`: {e.strerror}") from e
    parsed = LoraConfig.from_raw(config, label=label)
    variants = variants_in(parsed)
    if variants:  # a byte copy is exact for any variant
        log.warning("`%s`: %s; it is copied as is", files.name, variant_message(variants))
    if parsed.encoding_problem:  # copied as it is: the copy has the same problem
        log.warning(
            "`%s`: %s; the copy keeps its bytes", files.config_path, parsed.encoding_problem
        )
    if files.format == "bin":
        load_bin(files.weights_path)
        return _Checked(files, config, size, None)
    return _Checked(files, config, size, read_header(files.weights_path).header_bytes)


class _Reader:
    """The source's weights, read for copying: a read error names the source (an error from the
    copy's writes names the output)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        except OSError as e:
            raise self.error(e) from e

    def error(self, e: OSError) -> AdapterFormatError:
        return AdapterFormatError(f"cannot read `{self.path}`: {e.strerror}")

    def read(self, n: int) -> bytes:
        try:
            return self.file.read(n)
        except OSError as e:
            raise self.error(e) from e

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def _check_copy(checked: _Checked, copy: Path) -> None:
    """The copy must be what was validated: same size, and a header that parses and is the same
    (another process may rewrite the source while it is copied)."""
    src = checked.files.weights_path
    try:
        same = os.path.getsize(copy) == checked.size
        if same and checked.header is None:
            load_bin(copy)
        elif same:
            same = read_header(copy).header_bytes == checked.header
    except AdapterFormatError:
        same = False
    if not same:
        raise AdapterFormatError(
            f"`{src}` changed while it was being copied; nothing was written",
            hint="rerun once nothing else writes to the source",
        )


def _check_new_name(name: str) -> None:
    """A --rename target becomes a folder name: the adapter-name rule, and printable."""
    try:
        validate_adapter_name(name)
    except SelectionError as e:
        raise InvalidOptionError(e.message, hint=e.hint) from e
    if not name.isprintable():
        raise InvalidOptionError(
            f"invalid adapter name {name!r}: it holds control or invisible characters",
            hint="adapter names are folder names",
        )


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
    # what the options ask for, checked before the source is read: usage errors (exit 2)
    if not adapters:
        raise InvalidOptionError("no adapter chosen", hint="pass --adapter NAME at least once")
    if len(set(adapters)) != len(adapters):
        raise InvalidOptionError("an adapter is chosen more than once")
    for old, new in renames.items():
        if old not in adapters:
            raise InvalidOptionError(
                f"`{old}` is renamed but not chosen", hint=f"add --adapter {old}"
            )
        _check_new_name(new)
    picked = pick_adapters(find_adapters(source), list(adapters), source)
    new_names = [validate_adapter_name(renames.get(a.name, a.name)) for a in picked]
    if len(set(new_names)) != len(new_names):
        raise InvalidOptionError(f"two chosen adapters would both be named {sorted(new_names)}")
    out = Path(output)
    preflight([out], force=force, inputs=[source])
    checked = [_validate(files) for files in picked]
    for files in picked:
        for message in files.warnings:
            log.warning("%s", message)
    readme = read_readme(Path(source)) if Path(source).is_dir() else None
    total = sum(len(c.config) + c.size for c in checked)

    def advance(n: int) -> None:
        if progress is not None:
            progress(n, total)

    results = []
    with atomic_directory(out, force=force, inputs=[source]) as tmp:
        if readme is not None:
            names = new_names if renames else None
            _write_card(readme, Path(source), tmp, out, checked, names)
        for check, new in zip(checked, new_names, strict=True):
            files = check.files
            sub = adapter_subdir(new)
            target = tmp / sub if sub else tmp
            target.mkdir(exist_ok=True)
            weights_name = SAFETENSORS_NAME if files.format == "safetensors" else BIN_NAME
            (target / CONFIG_NAME).write_bytes(check.config)
            advance(len(check.config))
            nbytes = len(check.config)
            with _Reader(files.weights_path) as fi, open(target / weights_name, "xb") as fo:
                nbytes += copy_stream(fi, fo, advance)  # type: ignore[arg-type]
            _check_copy(check, target / weights_name)
            written = [f"{sub}/{n}" if sub else n for n in (CONFIG_NAME, weights_name)]
            results.append(SelectedAdapter(new, files.name, sub, tuple(written), nbytes))
    return SelectionResult(os.fspath(source), os.fspath(out), tuple(results))


def _write_card(
    data: bytes,
    root: Path,
    tmp: Path,
    out: Path,
    checked: list[_Checked],
    new_names: list[str] | None,
) -> None:
    """SOURCE's card (its bytes, read before any output existed), as it is; with renames, its
    adapter facts rewritten for the new names."""
    if new_names is not None:
        from adapterctl.ops.card import decode_card, facts_note, refresh_card

        where = f"`{root / README_NAME}`"
        existing = decode_card(data, where)
        configs = {
            name: LoraConfig.from_raw(check.config, label=str(check.files.config_path))
            for check, name in zip(checked, new_names, strict=True)
        }
        data = refresh_card(existing, configs, where).encode("utf-8")
        written = f"the card written to `{out / README_NAME}`"
        note = facts_note(existing, configs, written, where)
        if note:
            log.warning("%s", note)
    (tmp / README_NAME).write_bytes(data)
