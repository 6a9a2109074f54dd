"""`adapterctl merge`: adapters merged into a base checkpoint one tensor at a time.

The base's tensors are read one at a time (its headers first, to plan the output shards), each
merged if an adapter targets it (its factors read then) and written into the current output shard
before the next; no model is built and torch is not imported for a safetensors base.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapterctl.errors import AdapterctlError, IncompatibleModelError, SelectionError
from adapterctl.format.atomic import atomic_directory, preflight
from adapterctl.format.checkpoint import BaseCheckpoint
from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import DTYPES, Dtype
from adapterctl.format.files import open_regular
from adapterctl.format.layout import AdapterFiles, find_adapters, pick_adapters
from adapterctl.format.rawtensor import (
    CAST_TARGETS,
    FLOAT_CODES,
    OpenStore,
    RawTensor,
    TensorStore,
    cast,
    from_float,
    numel,
    to_float32,
    to_floats,
)
from adapterctl.format.tensors import FileSpan, TensorSource, copy_stream, write_safetensors
from adapterctl.ops import SCHEMA_VERSION
from adapterctl.ops.merge.plan import (
    Lora,
    LoraBias,
    Op,
    Plan,
    Replace,
    check_config,
    plan_adapter,
    refuse_quantized,
)
from adapterctl.ops.merge.rule import Step, bias_sequence, merge_sequence
from adapterctl.ops.merge.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    parse_size,
    shard_names,
    split,
    write_index,
)
from adapterctl.ops.merge.verify import Verification, VerificationFailed, check

if TYPE_CHECKING:
    import numpy as np

#: `--dtype` values: auto keeps each tensor's dtype
DTYPE_CHOICES = ("auto", *CAST_TARGETS)
#: a base's files besides its weights that the merged model keeps (not trainer state)
COMPANION_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)  # fmt: skip


class Progress(Protocol):
    """`progress(advance, total, phase)`: bytes written ("merging"), then bytes checked
    ("verifying"); a new phase starts at 0."""

    def __call__(self, advance: int, total: int, phase: str = "merging", /) -> None: ...


@dataclass(frozen=True)
class MergeResult:
    base: str
    adapter: str
    output: str
    adapters: list[str]
    dtype: str
    modules: dict[str, int]  # merged per variant (linear, conv1d, embedding, dora_*, lora_bias...)
    tensors_merged: int
    tensors_copied: int
    tensors_added: int
    shards: list[str]
    bytes: int
    seconds: float
    peak_memory: int  # bytes (maxrss)
    warnings: list[str] = field(default_factory=list)
    verification: Verification | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "base": self.base,
            "adapter": self.adapter,
            "output": self.output,
            "adapters": self.adapters,
            "dtype": self.dtype,
            "modules": dict(sorted(self.modules.items())),
            "tensors_merged": self.tensors_merged,
            "tensors_copied": self.tensors_copied,
            "tensors_added": self.tensors_added,
            "shards": self.shards,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "peak_memory": self.peak_memory,
            "warnings": self.warnings,
            "verification": None if self.verification is None else self.verification.to_dict(),
        }


def peak_memory() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _pick(adapter: Path, names: list[str] | None) -> list[AdapterFiles]:
    found = find_adapters(adapter)
    if names:
        return pick_adapters(found, names, adapter)
    if len(found) != 1:
        raise SelectionError(
            f"`{adapter}` holds {len(found)} adapters ({', '.join(a.name for a in found)})",
            hint="pick the ones to merge, in order, with --adapter NAME",
        )
    return found


def _code(dtype: str | None) -> str | None:
    """The cast target's safetensors code (None: keep each tensor's dtype)."""
    if dtype is None or dtype == "auto":
        return None
    if dtype not in CAST_TARGETS:
        from adapterctl.errors import InvalidOptionError

        raise InvalidOptionError(
            f"--dtype {dtype[:40]!r} is not one of {', '.join(DTYPE_CHOICES)}",
            hint="auto keeps each tensor's dtype",
        )
    return CAST_TARGETS[dtype]


def _out_dtype(dtype: Dtype, code: str | None) -> Dtype:
    return DTYPES[code] if code is not None and dtype.code in FLOAT_CODES else dtype


def _norm(x: np.ndarray[Any, Any], axis: int) -> np.ndarray[Any, Any]:
    import numpy as np

    return np.asarray(np.linalg.norm(x, axis=axis), dtype=x.dtype)


def _rounder(code: str) -> Callable[[Any], Any]:
    import numpy as np

    if code in ("F32", "F64"):
        target = np.float32 if code == "F32" else np.float64
        return lambda x: np.asarray(x, dtype=target)
    return lambda x: to_float32(from_float(x, code))


class Merger:
    """Computes each output tensor from the base tensor and the plan's operations."""

    def __init__(
        self,
        base: BaseCheckpoint,
        stores: list[TensorStore],
        plan: Plan,
        code: str | None,
        headers: dict[str, tuple[Dtype, tuple[int, ...]]],
    ) -> None:
        self.base = base
        self.stores = stores
        self.plan = plan
        self.code = code
        self.headers = headers
        #: the dtype of tensors added to the base: --dtype, else the base's first float dtype
        self.added_code = code or next(
            (dt.code for dt, _ in headers.values() if dt.code in FLOAT_CODES), None
        )

    def _factor(self, op: Lora | LoraBias, key: str, compute: str) -> Any:
        t = self.stores[op.adapter].get(key)
        values = to_float32(t)
        return values.astype("float64") if compute == "F64" else values

    def tensor(self, key: str) -> RawTensor:
        """The output tensor `key`: the base's bytes, cast with --dtype, the plan's ops applied."""
        raw = self.base.read(key)
        ops = self.plan.ops.get(key, [])
        if self.code is not None:
            raw = cast(raw, self.code)
        if not ops:
            return raw
        return self.apply(key, raw, ops)

    def apply(self, key: str, raw: RawTensor, ops: list[Op]) -> RawTensor:
        import numpy as np

        code = raw.dtype.code
        if code not in FLOAT_CODES:
            raise IncompatibleModelError(
                f"cannot merge into `{key}`: it is a {raw.dtype.display_name} tensor"
            )
        compute = "F64" if code == "F64" else "F32"
        store = _rounder(code)
        w: Any = None
        for op in ops:  # the plan puts them first
            if isinstance(op, Replace):
                raw = cast(self.stores[op.adapter].get(op.key), code)
        rest = [op for op in ops if not isinstance(op, Replace)]
        if rest:
            w = to_floats(raw)
        biases = [op for op in rest if isinstance(op, LoraBias)]
        if biases:
            steps_b = [
                (None if o.key is None else self._factor(o, o.key, compute), o.scaling, o.dora)
                for o in biases
            ]
            w = bias_sequence(w, steps_b, store=store)
        modules: dict[str, list[Lora]] = {}  # one layer's adapters, in order (tied: two layers)
        for op in rest:
            if isinstance(op, Lora):
                modules.setdefault(op.module, []).append(op)
        # PEFT merges layer by layer in the model's module order: an input embedding comes before
        # an lm_head tied to it
        for layer in sorted(modules.values(), key=lambda ops: ops[0].kind != "embedding"):
            steps = [
                Step(
                    self._factor(op, op.a, compute),
                    self._factor(op, op.b, compute),
                    op.scaling,
                    None if op.magnitude is None else self._factor(op, op.magnitude, compute),
                )
                for op in layer
            ]
            w = merge_sequence(layer[0].kind, w, steps, store=store, norm=_norm)
        if w is None:
            return raw
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(w) & np.isfinite(to_floats(raw))
        if bool(bad.any()):
            names = sorted({op.module for op in ops if not isinstance(op, Replace)})
            raise AdapterctlError(
                f"merging into `{key}` ({', '.join(names)}) gives {int(bad.sum())} values that "
                f"are not finite in {raw.dtype.display_name} where the base's are",
                hint="check the adapter's lora_alpha and factors (`adapterctl inspect --check`), "
                "or merge into a float32 base (--dtype float32)",
            )
        return from_float(w, code)

    def source(self, key: str) -> Callable[[], memoryview | Iterator[memoryview | FileSpan]]:
        """What the writer calls for `key`'s bytes, when it writes it."""
        if key in self.plan.added:
            return lambda: self.added(key).buffer()
        if not self.plan.ops.get(key):
            return lambda: self.copied(key)
        return lambda: self.tensor(key).buffer()

    def copied(self, key: str) -> Iterator[memoryview | FileSpan]:
        """A tensor no adapter touches: its bytes copied by the kernel from the base's shard,
        or (cast with --dtype, or from a `.bin` base) piece by piece; memory stays one piece,
        whatever the tensor's size (an embedding is often the largest)."""
        dtype, _ = self.headers[key]
        if _out_dtype(dtype, self.code) == dtype:
            span = self.base.span(key)  # the bytes stay as they are
            if span is not None:
                yield span
                return
        for piece in self.base.pieces(key):
            if self.code is None:
                yield memoryview(piece)
                continue
            count = len(piece) * 8 // dtype.bits
            yield cast(RawTensor(dtype, (count,), piece), self.code).buffer()

    def added(self, key: str) -> RawTensor:
        """A modules_to_save tensor the base lacks, in the dtype the model is in (as the module
        transformers makes for it)."""
        index, stored, _, _ = self.plan.added[key]
        t = self.stores[index].get(stored)
        return t if self.added_code is None else cast(t, self.added_code)


def _copy_companions(base: Path, out: Path, code: str | None, dtype: str | None) -> list[str]:
    copied = []
    for name in COMPANION_FILES:
        src = base / name
        if not src.is_file():
            continue
        with open_regular(src, "model file") as f:
            if name == "config.json" and code is not None:
                (out / name).write_bytes(_config_with_dtype(f.read(), src, dtype))
            else:  # a tokenizer can be tens of MB: in pieces, as the tensors
                with open(out / name, "wb") as dst:
                    copy_stream(f, dst)
        copied.append(name)
    return copied


def _config_with_dtype(data: bytes, label: Path, dtype: str | None) -> bytes:
    """config.json with its dtype key set (`dtype`, as transformers 5 writes it, or the
    `torch_dtype` an older config has)."""
    try:
        config = json.loads(data)
    except ValueError as e:
        raise IncompatibleModelError(f"`{label}` is not JSON: {e}") from e
    if not isinstance(config, dict):
        raise IncompatibleModelError(f"`{label}` does not hold a JSON object")
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = dtype
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def merge(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    adapter_names: list[str] | None = None,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    verify: bool = False,
    force: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    base_revision: str | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Write `output`: the base model at `base` with the adapters at `adapter` merged in, as
    PEFT's `merge_and_unload()` computes it; atomically, or not at all. `base` and `adapter` may
    be Hub repo ids (`revision`/`subfolder`/`token` for the adapter, `base_revision` for the base).
    """
    from adapterctl.ops.hub import is_local_path, resolve

    started = time.perf_counter()
    code = _code(dtype)
    limit = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    local = [p for p in (base, adapter) if isinstance(p, os.PathLike) or is_local_path(str(p))]
    preflight([output], force=force, inputs=local)  # before anything is downloaded
    adapter_dir = resolve(
        adapter, kind="adapters", revision=revision, subfolder=subfolder, token=token
    )
    base_dir = resolve(base, kind="base", revision=base_revision, token=token)
    inputs = [base_dir, adapter_dir]
    preflight([output], force=force, inputs=inputs)
    picked = _pick(adapter_dir, adapter_names)
    configs = []
    for files in picked:
        if files.config_path is None:
            raise IncompatibleModelError(
                f"`{files.weights_path}` has no adapter_config.json beside it; merging needs it"
            )
        config = LoraConfig.from_file(files.config_path)
        check_config(config, os.fspath(files.config_path))
        configs.append(config)
    with contextlib.ExitStack() as stack:
        checkpoint = stack.enter_context(BaseCheckpoint(base_dir, allow_bin=True))
        refuse_quantized(checkpoint)
        layout = list(checkpoint.tensors())
        headers = {name: (dt, shape) for name, _, dt, shape in layout}
        stores: list[TensorStore] = []
        plan = Plan()
        for i, (files, config) in enumerate(zip(picked, configs, strict=True)):
            store = stack.enter_context(OpenStore(files.weights_path, files.format))
            stores.append(store)
            plan_adapter(plan, i, files, config, store, checkpoint, headers)
        plan.prune()
        merger = Merger(checkpoint, stores, plan, code, headers)
        sizes: list[tuple[str, int]] = []
        specs: dict[str, tuple[Dtype, tuple[int, ...]]] = {}
        for name, _, dt, shape in layout:
            specs[name] = (_out_dtype(dt, code), shape)
        for name, (_, _, dt, shape) in plan.added.items():
            specs[name] = (_out_dtype(dt, merger.added_code), shape)
        for name, (dt, shape) in specs.items():
            sizes.append((name, dt.bits * numel(shape) // 8))
        groups = split(sizes, limit)
        names = shard_names(len(groups))
        total = sum(size for _, size in sizes)
        verification = None
        with atomic_directory(output, force=force, inputs=inputs) as tmp:
            for file, group in zip(names, groups, strict=True):
                sources = [TensorSource(n, *specs[n], merger.source(n)) for n in group]
                with open(tmp / file, "wb") as f:
                    write_safetensors(
                        f,
                        sources,
                        progress=None if progress is None else lambda k: progress(k, total),
                    )
            if len(names) > 1:
                write_index(tmp, dict(zip(names, groups, strict=True)), total)
            _copy_companions(base_dir, tmp, code, dtype)
            if verify:
                verification = check(tmp, names, groups, checkpoint, stores, plan, code, progress)
                if not verification.passed:
                    raise VerificationFailed(verification)
        merged = sum(1 for ops in plan.ops.values() if any(not isinstance(o, Replace) for o in ops))
        replaced = len(plan.ops) - merged
        return MergeResult(
            base=os.fspath(base),
            adapter=os.fspath(adapter),
            output=os.fspath(output),
            adapters=[f.name for f in picked],
            dtype=dtype or "auto",
            modules=dict(plan.counts),
            tensors_merged=merged + replaced,
            tensors_copied=len(layout) - merged - replaced,
            tensors_added=len(plan.added),
            shards=names,
            bytes=total,
            seconds=time.perf_counter() - started,
            peak_memory=peak_memory(),
            warnings=list(plan.warnings),
            verification=verification,
        )
