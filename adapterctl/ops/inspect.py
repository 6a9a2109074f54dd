"""inspect_adapter(): what an adapter file holds and what is wrong with it, from headers alone.

A local adapter's header is read from its file; a Hub repo's (`inspect_hub`) over HTTP range
requests (`HfApi.parse_safetensors_file_metadata`), its configs downloaded (they are small),
never its weights."""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from adapterctl.errors import AdapterNotFoundError
from adapterctl.format.config import CONFIG_NAME, LoraConfig
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.header import TensorInfo, read_header
from adapterctl.format.keys import KeyInfo
from adapterctl.format.layout import (
    BIN_NAME,
    DEFAULT_ADAPTER,
    SAFETENSORS_NAME,
    AdapterFiles,
    find_adapters,
    pick_adapters,
)
from adapterctl.format.nonfinite import (
    NONFINITE_CODES,
    NonFinite,
    count_nonfinite,
    may_hold_nonfinite,
)
from adapterctl.format.tensors import SafetensorsReader, bin_tensors
from adapterctl.ops import SCHEMA_VERSION
from adapterctl.ops.checks import (
    ModuleEntry,
    Problem,
    TensorEntry,
    analyse,
    target_summary,
    tensor_kinds,
)


@dataclass(frozen=True)
class AdapterReport:
    name: str
    path: str
    format: str
    config: LoraConfig | None
    tensors: tuple[TensorEntry, ...]  # sorted by name
    modules: tuple[ModuleEntry, ...]
    problems: tuple[Problem, ...]
    #: per tensor, what `checks.tensor_kinds` says (module path, kind, key), as analysed
    kinds: tuple[tuple[str, str, KeyInfo], ...] = field(default=(), compare=False, repr=False)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def dtype_mix(self) -> dict[str, int]:
        """Bytes per dtype."""
        mix: Counter[str] = Counter()
        for t in self.tensors:
            mix[t.dtype] += t.nbytes
        return dict(sorted(mix.items()))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def summary(self) -> dict[str, Any]:
        """The human-facing summary fields (config values with PEFT's defaults filled in)."""
        c = self.config
        lora = [m for m in self.modules if m.r is not None]
        ranks = sorted({m.r for m in lora if m.r is not None})
        scalings = sorted({m.scaling for m in lora if m.scaling is not None})
        return {
            "peft_type": c.peft_type if c else None,
            "task_type": c.task_type if c else None,
            "base_model": c.base_model_name_or_path if c else None,
            "r": c.r if c else None,
            "lora_alpha": c.lora_alpha if c else None,
            "ranks": ranks,
            "scalings": scalings,
            "use_rslora": c.use_rslora if c else None,
            "use_dora": c.use_dora if c else None,
            "bias": c.bias if c else None,
            "init_lora_weights": c.init_lora_weights if c else None,
            "target_modules": target_summary(c) if c else None,
            "modules_to_save": c.modules_to_save if c else None,
            "lora_modules": len(lora),
        }

    def to_dict(self, *, lazy: bool = False) -> dict[str, Any]:
        """The JSON report; `lazy`: tensors and modules as generators of their dicts, for a
        writer that makes each as it writes it (100k tensors' dicts never held at once)."""
        tensors = (_tensor_dict(t) for t in self.tensors)
        modules = (m.to_dict() for m in self.modules)
        return {
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "config": self.config.raw if self.config else None,
            "tensors": tensors if lazy else list(tensors),
            "modules": modules if lazy else list(modules),
            "num_parameters": self.num_parameters,
            "total_bytes": self.total_bytes,
            "problems": [p.to_dict() for p in self.problems],
        }


def _tensor_dict(t: TensorEntry) -> dict[str, Any]:
    """A tensor in the JSON report; `nonfinite` counts ({"nan", "posinf", "neginf"}) only where
    the values were scanned (`inspect --check` of local files)."""
    out: dict[str, Any] = {
        "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "nbytes": t.nbytes
    }  # fmt: skip
    if t.nonfinite is not None:
        out["nonfinite"] = t.nonfinite.to_dict()
    return out


@dataclass(frozen=True)
class InspectReport:
    source: str
    adapters: tuple[AdapterReport, ...]

    @property
    def has_errors(self) -> bool:
        return any(a.errors for a in self.adapters)

    def to_dict(self, *, lazy: bool = False) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "adapters": [a.to_dict(lazy=lazy) for a in self.adapters],
        }


def _tensor_entries(files: AdapterFiles, scan: bool) -> list[TensorEntry]:
    if files.format == "bin":
        found = list(bin_tensors(files.weights_path))
        counts = scan_nonfinite(files) if scan else {}
        return [
            TensorEntry(t.name, t.dtype_name, t.shape, t.nbytes, counts.get(t.name)) for t in found
        ]
    if not scan:
        return _entries(read_header(files.weights_path).tensors, {})
    with SafetensorsReader(files.weights_path) as reader:  # one header read for both
        counts = _scan_safetensors(reader)
        tensors = reader.tensors
    del reader  # its header's raw bytes are not needed while the entries are made
    return _entries(tensors, counts)


def _entries(tensors: dict[str, TensorInfo], counts: dict[str, NonFinite]) -> list[TensorEntry]:
    """The entries of a header's tensors (in any order: the report sorts them), each TensorInfo
    dropped as its entry is made (the caller keeps no other reference to `tensors`' header)."""
    entries = []
    while tensors:
        _, t = tensors.popitem()
        entries.append(
            TensorEntry(t.name, t.dtype.display_name, t.shape, t.nbytes, counts.get(t.name))
        )
    return entries


def scan_nonfinite(files: AdapterFiles) -> dict[str, NonFinite]:
    """NaN, +Inf and -Inf per float tensor, read in 1 MiB pieces and counted on the bits (no
    float conversion); memory stays one piece (a `.bin` is loaded whole by torch, as always)."""
    if files.format == "bin":
        from adapterctl.format.tensors import bin_arrays

        return {
            name: count_nonfinite(array.reshape(-1).view("u1"), dtype.code)
            for name, (dtype, _, array) in bin_arrays(files.weights_path).items()
            if dtype.code in NONFINITE_CODES
        }
    with SafetensorsReader(files.weights_path) as reader:
        return _scan_safetensors(reader)


_NONE = NonFinite()  # one shared value for the (many) tensors without NaN or Inf


def _scan_safetensors(reader: SafetensorsReader) -> dict[str, NonFinite]:
    """Neighbouring small tensors of one dtype are read and counted together, up to a piece
    (100k tiny tensors cost a few hundred reads, not 100k); each is counted on its own only
    where its piece holds any NaN or Inf. A tensor larger than a piece is read in pieces."""
    from adapterctl.format import tensors as tensors_mod

    piece = tensors_mod._CHUNK
    counts: dict[str, NonFinite] = {}
    batch: list[TensorInfo] = []
    size = 0
    for t in sorted(reader.tensors.values(), key=_start):  # the data lies in offset order
        code = t.dtype.code
        if code not in NONFINITE_CODES:
            continue
        if batch and (code != batch[0].dtype.code or size + t.nbytes > piece):
            _count_batch(reader, batch, counts)
            batch, size = [], 0
        if t.nbytes > piece:
            total = _NONE
            for data in reader.iter_bytes(t.name, piece):
                if may_hold_nonfinite(data, code):
                    total += count_nonfinite(data, code)
            counts[t.name] = total if total.total else _NONE
            continue
        batch.append(t)
        size += t.nbytes
    if batch:
        _count_batch(reader, batch, counts)
    return counts


def _start(t: TensorInfo) -> int:
    return t.start


def _count_batch(
    reader: SafetensorsReader, batch: list[TensorInfo], counts: dict[str, NonFinite]
) -> None:
    """Count one run of contiguous tensors of one dtype (their bytes follow each other)."""
    code, base = batch[0].dtype.code, batch[0].start
    data = reader.read_span(base, batch[-1].end, batch[0].name)
    if not may_hold_nonfinite(data, code) or not count_nonfinite(data, code).total:
        for t in batch:
            counts[t.name] = _NONE
        return
    view = memoryview(data)
    for t in batch:
        found = count_nonfinite(view[t.start - base : t.end - base], code) if t.nbytes else _NONE
        counts[t.name] = found if found.total else _NONE


def build_report(
    name: str,
    path: str,
    fmt: str,
    config: LoraConfig | None,
    tensors: list[TensorEntry],
    warnings: tuple[str, ...] = (),
) -> AdapterReport:
    """Check one adapter's config against its tensors (wherever they were read from)."""
    tensors = sorted(tensors, key=_name)
    kinds = tuple(tensor_kinds(tensors, config))
    modules, problems = analyse(tensors, config, kinds)
    problems = [Problem("warning", w) for w in warnings] + problems
    return AdapterReport(
        name, path, fmt, config, tuple(tensors), tuple(modules), tuple(problems), kinds
    )


def _name(t: TensorEntry) -> str:
    return t.name


def report_adapter(files: AdapterFiles, scan: bool = False) -> AdapterReport:
    """Read one adapter's config and header and check them; with `scan`, count the NaN and
    ±Inf in its values too (a warning per tensor that holds any)."""
    config = LoraConfig.from_file(files.config_path) if files.config_path else None
    path = os.fspath(files.weights_path.parent if files.directory is None else files.directory)
    return build_report(
        files.name, path, files.format, config, _tensor_entries(files, scan), files.warnings
    )


def inspect_adapter(
    source: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    scan: bool = False,
) -> InspectReport:
    """Report every adapter at `source` (or only `adapter`): tensors, modules and problems.

    Reads adapter_config.json and the safetensors header only; a `.bin` file is read with
    `torch.load(weights_only=True)`, the one path that imports torch. `source` may be a Hub repo
    id: then only the headers are read, over HTTP range requests. With `scan` (what
    `inspect --check` asks), the values of local files are read too, in bounded pieces, and
    NaN/±Inf counted per tensor.
    """
    from adapterctl.ops.hub import hub_or_local, offline, refuse_local_revision

    found = hub_or_local(source)
    refuse_local_revision(found, revision)
    if isinstance(found, str) and not offline():  # offline, the cached copy is read below
        return inspect_hub(
            found, adapter=adapter, revision=revision, subfolder=subfolder, token=token
        )
    if isinstance(found, str) or subfolder:
        from adapterctl.ops.hub import resolve

        source = resolve(
            source, kind="adapters", revision=revision, subfolder=subfolder, token=token
        )
    adapters = find_adapters(source)
    if adapter is not None:
        adapters = pick_adapters(adapters, [adapter], source)
    return InspectReport(os.fspath(source), tuple(report_adapter(f, scan) for f in adapters))


# --- a Hub repo: headers over HTTP range requests ---------------------------------------------


def _hub_adapters(files: list[str], sub: str) -> dict[str, str]:
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


def _hub_tensors(
    repo_id: str, path: str, *, revision: str | None, token: str | None
) -> list[TensorEntry]:
    from adapterctl.ops.hub import api, hub_errors

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
    *,
    adapter: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
) -> InspectReport:
    """`inspect_adapter` of a Hub repo id: its configs downloaded, its safetensors headers read
    over HTTP range requests (a `.bin`, which has no header, is downloaded)."""
    from huggingface_hub import hf_hub_download

    from adapterctl.ops.hub import api, endpoint, hub_errors, label, subfolder_prefix

    sub = subfolder_prefix(subfolder)
    with hub_errors(repo_id, revision=revision):
        files = api(token).list_repo_files(repo_id, revision=revision)
    found = _hub_adapters(files, sub)
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
            tensors = _hub_tensors(repo_id, join(SAFETENSORS_NAME), revision=revision, token=token)
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
