"""Where adapters live on disk: directories, multi-adapter layouts and single files.

PEFT saves the adapter named `default` at the root of a directory and every other adapter `X` in
the subfolder `X/`, each with its own adapter_config.json and weights file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from adapterctl.errors import (
    AdapterctlError,
    AdapterFormatError,
    AdapterNotFoundError,
    NotAnAdapterError,
    SelectionError,
)
from adapterctl.format.config import CONFIG_NAME
from adapterctl.format.keys import PREFIX

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
README_NAME = "README.md"
DEFAULT_ADAPTER = "default"


def validate_adapter_name(name: str) -> str:
    """Adapter names become folder names: no separators, no `..`, not empty."""
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name != name.strip()
        or name.startswith(".")
        or name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, README_NAME)
    )
    if bad:
        raise SelectionError(
            f"invalid adapter name {name!r}",
            hint="adapter names are folder names: no path separators, no leading dot, not empty",
        )
    return name


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter found on disk."""

    name: str
    directory: Path | None  # None for a bare weights file
    config_path: (
        Path | None
    )  # None when a bare .safetensors file has no adapter_config.json beside it
    weights_path: Path
    format: str  # "safetensors" | "bin"
    warnings: tuple[str, ...] = ()


def _is_file(path: Path) -> bool:
    """Path.is_file, with unreadable places as a clear error instead of an OSError."""
    try:
        return path.is_file()
    except OSError as e:
        raise AdapterFormatError(f"cannot read `{path}`: {e.strerror}") from e


def _weights_in(directory: Path) -> tuple[Path, str, tuple[str, ...]] | None:
    st, binp = directory / SAFETENSORS_NAME, directory / BIN_NAME
    if _is_file(st):
        warns: tuple[str, ...] = ()
        if _is_file(binp):
            warns = (
                f"both `{st.name}` and `{binp.name}` are in `{directory}`; using safetensors, as PEFT does",
            )
        return st, "safetensors", warns
    if _is_file(binp):
        return binp, "bin", ()
    return None


def _adapter_in(directory: Path, name: str) -> AdapterFiles | None:
    config = directory / CONFIG_NAME
    if not _is_file(config):
        return None
    found = _weights_in(directory)
    if found is None:
        raise AdapterFormatError(
            f"`{directory}` has `{CONFIG_NAME}` but no `{SAFETENSORS_NAME}` or `{BIN_NAME}`"
        )
    weights, fmt, warns = found
    return AdapterFiles(name, directory, config, weights, fmt, warns)


#: a transformers model's weights, beside its config.json
MODEL_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)  # fmt: skip
_USE_AS_BASE = "use it as BASE: `adapterctl load BASE ADAPTER` or `adapterctl save BASE OUTPUT ...`"


def refuse_model(path: Path) -> None:
    """One error line for a transformers model where an adapter was expected: a directory with
    config.json and model weights (and no adapter_config.json), or a safetensors file without an
    adapter config beside it none of whose tensors is an adapter's (no `lora_`, no
    `base_model.model.` prefix)."""
    if path.is_dir():
        weights = next((n for n in MODEL_WEIGHTS if (path / n).is_file()), None)
        if (path / "config.json").is_file() and weights is not None:
            raise NotAnAdapterError(
                f"`{path}` is a model, not an adapter (config.json and {weights})",
                hint=_USE_AS_BASE,
            )
        return
    if path.suffix != ".safetensors" or (path.parent / CONFIG_NAME).is_file():
        return
    from adapterctl.format.header import read_header

    try:
        names = read_header(path).tensors
    except AdapterFormatError:
        return  # reported as what it is by whoever reads it
    if names and not any("lora_" in n or n.startswith(PREFIX) for n in names):
        raise NotAnAdapterError(
            f"`{path}` is a model, not an adapter ({len(names)} tensors, none of them an "
            "adapter's)",
            hint=_USE_AS_BASE.replace("it as BASE", "its folder as BASE"),
        )


def missing(path: str | Path, why: str = "", hint: str | None = None) -> AdapterctlError:
    """The error for a local path that cannot be found: one the system cannot look up (a folder
    that may not be searched, a name too long), an interrupted --force replace when its aside copy
    lies beside it, else "does not exist" (`why` and `hint` add the caller's reason)."""
    import errno

    from adapterctl.format.atomic import interrupted_swap

    try:
        os.lstat(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            return AdapterFormatError(f"cannot read `{path}`: {e.strerror}")

    aside = interrupted_swap(path)
    if aside is not None:
        return AdapterNotFoundError(
            f"`{path}` is missing; its previous contents are in `{aside}` "
            "(an interrupted --force replace)",
            hint=f"rename it back (`mv {aside} {path}`), or rerun the command that wrote "
            "it: an adapterctl command that writes there puts it back first",
        )
    return AdapterNotFoundError(f"`{path}` does not exist{why}", hint=hint)


def find_adapters(source: str | os.PathLike[str]) -> list[AdapterFiles]:
    """All adapters at `source`: the root adapter (`default`) first, then subfolders by name.

    `source` may be an adapter directory, a multi-adapter directory, or a single weights file
    (whose sibling adapter_config.json, if any, is its config).
    """
    path = Path(source)
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a parent folder that may not be searched
        raise AdapterFormatError(f"cannot read `{path}`: {e.strerror}") from e
    if not exists:
        raise missing(path)
    if _is_file(path):
        refuse_model(path)
        if path.suffix not in (".safetensors", ".bin"):
            raise AdapterFormatError(
                f"`{path}` is not a `.safetensors` or `.bin` file",
                hint="pass an adapter directory or its weights file",
            )
        config = path.parent / CONFIG_NAME
        fmt = "safetensors" if path.suffix == ".safetensors" else "bin"
        return [
            AdapterFiles(DEFAULT_ADAPTER, None, config if config.is_file() else None, path, fmt)
        ]
    if not path.is_dir():
        raise AdapterFormatError(f"`{path}` is neither a file nor a directory")
    adapters: list[AdapterFiles] = []
    broken: list[AdapterFormatError] = []

    def probe(directory: Path, name: str) -> AdapterFiles | None:
        try:
            return _adapter_in(directory, name)
        except AdapterFormatError as e:  # one broken folder does not hide the others
            broken.append(e)
            return None

    root = probe(path, DEFAULT_ADAPTER)
    if root is not None:
        adapters.append(root)
    try:
        children = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as e:
        raise AdapterFormatError(f"cannot list `{path}`: {e.strerror}") from e
    for child in children:  # temp siblings and hidden folders are never adapters
        found = probe(child, child.name)
        if found is not None:
            if root is not None and child.name == DEFAULT_ADAPTER:
                log.warning("ignoring `%s`: the root adapter is already named `default`", child)
                continue
            adapters.append(found)
    if broken and not adapters:
        raise broken[0]
    for problem in broken:
        log.warning("skipping: %s", problem.message)
    if not adapters:
        refuse_model(path)
        hint = None
        if (path / SAFETENSORS_NAME).is_file() or (path / BIN_NAME).is_file():
            hint = (
                f"`{CONFIG_NAME}` is missing; pass the weights file itself to read it without one"
            )
        raise AdapterNotFoundError(
            f"no adapter in `{path}`: no `{CONFIG_NAME}` at its root or in its subfolders",
            hint=hint,
        )
    return adapters


def pick_adapters(
    adapters: list[AdapterFiles], names: list[str], source: object
) -> list[AdapterFiles]:
    """The adapters named, in the order named; unknown names are an error listing what exists."""
    by_name = {a.name: a for a in adapters}
    picked = []
    for name in names:
        if name not in by_name:
            raise SelectionError(
                f"no adapter named `{name}` in `{source}`",
                hint=f"adapters there: {', '.join(sorted(by_name))}",
            )
        picked.append(by_name[name])
    return picked


def adapter_subdir(name: str) -> str:
    """Where PEFT puts adapter `name` inside a save directory ("" for the root)."""
    return "" if name == DEFAULT_ADAPTER else validate_adapter_name(name)


def _hub_blobs(root: str) -> str | None:
    """For a folder inside a Hugging Face cache snapshot (`models--ORG--NAME/snapshots/REV/...`),
    the repo cache's `blobs` folder its files link into; None for any other folder."""
    parts = Path(root).parts
    for i in range(len(parts) - 2, 0, -1):  # the nearest `snapshots` folder with a REV below it
        if parts[i] == "snapshots":
            repo = parts[i - 1]
            if repo.partition("--")[0] in ("models", "datasets", "spaces") and "--" in repo:
                return os.path.join(*parts[:i], "blobs")
            return None
    return None


def _within(real: str, folder: str) -> bool:
    """Whether the real path `real` lies inside the real folder `folder`: by path, else by
    device and inode of its parents (a case-insensitive or bind-mounted file system)."""
    if os.path.commonpath([real, folder]) == folder:
        return True
    try:
        want = os.stat(folder)
        return any(os.path.samestat(os.stat(p), want) for p in Path(real).parents)
    except OSError:
        return False


def _identity(real: str) -> os.stat_result | None:
    try:
        return os.stat(real)
    except OSError:  # reported as what it is by whoever reads it
        return None


def check_inside(path: Path, root: Path) -> os.stat_result | None:
    """Refuse a file of the adapter directory `root` that is (or lies through) a symlink to a file
    outside it: push would upload it, convert and select copy it (a README.md linking to a token
    file). Hugging Face cache snapshots link every file into their repo's `blobs` folder: allowed.
    Returns the file's stat (for reading it as that very file), None when there is none."""
    if not os.path.exists(path):  # nothing, or a broken symlink: nothing to read
        return None
    real, folder = os.path.realpath(path), os.path.realpath(root)
    if _within(real, folder):
        return _identity(real)
    blobs = _hub_blobs(folder)
    if blobs is not None and os.path.isdir(blobs) and _within(real, blobs):
        return _identity(real)
    how = "is a symlink to" if os.path.islink(path) else "lies, through a symlinked folder, in"
    raise AdapterFormatError(
        f"`{path}` {how} a file outside the adapter directory: `{real}`",
        hint="copy the file into the adapter directory if it belongs there",
    )


def read_readme(directory: Path) -> bytes | None:
    """The bytes of `directory`/README.md, None when there is none; one that links outside
    `directory` is an error (check_inside). Read before any output is written, so a card that
    cannot be read is blamed on itself, never on the output."""
    from adapterctl.format.files import read_optional

    path = directory / README_NAME
    checked = check_inside(path, directory)
    return read_optional(path, "model card", same_as=checked)
