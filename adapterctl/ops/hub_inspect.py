"""`inspect` of a Hub repo: configs downloaded (they are small), safetensors headers read over HTTP
range requests (`HfApi.parse_safetensors_file_metadata`), never the weights."""

from __future__ import annotations

import posixpath

from adapterctl.errors import AdapterNotFoundError
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.layout import BIN_NAME, DEFAULT_ADAPTER, SAFETENSORS_NAME
from adapterctl.format.tensors import bin_tensors
from adapterctl.ops.checks import TensorEntry
from adapterctl.ops.hub import _subdir, api, endpoint, hub_errors, label
from adapterctl.ops.inspect import AdapterReport, InspectReport, build_report


def _adapters(files: list[str], sub: str) -> dict[str, str]:
    """Adapter name -> its folder in the repo ("" for the root), as PEFT lays them out."""
    found: dict[str, str] = {}
    for path in files:
        if not path.startswith(sub) or posixpath.basename(path) != CONFIG_NAME:
            continue
        folder = posixpath.dirname(path)
        rel = folder[len(sub.rstrip("/")) :].lstrip("/") if sub else folder
        if "/" in rel:
            continue  # deeper than one level: not a PEFT layout
        found[rel or DEFAULT_ADAPTER] = folder
    return found


def _tensors(repo_id: str, path: str, revision: str | None, token: str | None) -> list[TensorEntry]:
    with hub_errors(repo_id, revision=revision, path=path):
        meta = api(token).parse_safetensors_file_metadata(repo_id, path, revision=revision)
    entries = []
    for name, info in meta.tensors.items():
        dtype = DTYPES.get(info.dtype)
        shown = dtype.display_name if dtype else info.dtype
        start, end = info.data_offsets
        entries.append(TensorEntry(name, shown, tuple(info.shape), end - start))
    return entries


def inspect_hub(
    repo_id: str,
    adapter: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
) -> InspectReport:
    from huggingface_hub import hf_hub_download

    sub = _subdir(subfolder)
    with hub_errors(repo_id, revision=revision):
        files = api(token).list_repo_files(repo_id, revision=revision)
    found = _adapters(files, sub)
    if not found:
        raise AdapterNotFoundError(
            f"Hub repo `{repo_id}` has no `{CONFIG_NAME}`"
            + (f" in `{subfolder}`" if subfolder else " at its root or in its subfolders"),
            hint="an adapter repo holds adapter_config.json and adapter_model.safetensors",
        )
    names = sorted(found, key=lambda n: (n != DEFAULT_ADAPTER, n))
    if adapter is not None:
        if adapter not in found:
            from adapterctl.errors import SelectionError

            raise SelectionError(
                f"no adapter named `{adapter}` in Hub repo `{repo_id}`",
                hint=f"adapters there: {', '.join(names)}",
            )
        names = [adapter]
    reports: list[AdapterReport] = []
    for name in names:
        folder = found[name]

        def join(n: str, f: str = folder) -> str:
            return f"{f}/{n}" if f else n

        with hub_errors(repo_id, revision=revision, path=join(CONFIG_NAME)):
            config_file = hf_hub_download(
                repo_id, join(CONFIG_NAME), revision=revision, token=token, endpoint=endpoint()
            )
        config = LoraConfig.from_file(config_file)
        where = label(repo_id, revision=revision, subfolder=folder or None)
        if join(SAFETENSORS_NAME) in files:
            tensors = _tensors(repo_id, join(SAFETENSORS_NAME), revision, token)
            fmt = "safetensors"
        elif join(BIN_NAME) in files:  # a pickle has no header: it is downloaded (weights_only)
            with hub_errors(repo_id, revision=revision, path=join(BIN_NAME)):
                local = hf_hub_download(
                    repo_id, join(BIN_NAME), revision=revision, token=token, endpoint=endpoint()
                )
            tensors = [
                TensorEntry(t.name, t.dtype_name, t.shape, t.nbytes) for t in bin_tensors(local)
            ]
            fmt = "bin"
        else:
            raise AdapterNotFoundError(
                f"`{where}` has a config but no `{SAFETENSORS_NAME}` or `{BIN_NAME}`"
            )
        reports.append(build_report(name, where, fmt, config, tensors))
    return InspectReport(label(repo_id, revision=revision, subfolder=subfolder), tuple(reports))
