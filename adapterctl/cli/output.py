"""The only module that writes to the terminal: JSON, tables, warnings, errors, progress.

A command makes one `Output(json_mode)` and writes through it: `result` (the JSON document, or
the human rendering), `table` (the one table layout: `columns.table_lines`), `key_values`,
`line`, `done`, `warning`, `error`, `status` and `progress`; the `render_*` functions below take
(out, report). Data goes to stdout; warnings, errors and progress bars go to stderr. Every line
is written by `_line`, which shows untrusted text through the one rule of `safe.visible`
(control, bidi and format characters escaped, never interpreted) and writes what the stream's
encoding can hold.
Tables are plain text laid out for the terminal's width (`columns`); rich draws only the progress
bar and the spinner, on a terminal, and is imported there alone. Under --json, stdout holds one
strictly valid JSON document and stderr only JSON lines (warnings and the error). NO_COLOR is
honoured (by rich, and by our plain lines, which carry no colour).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

from adapterctl.cli.columns import (
    natural_key,
    natural_keyer,
    natural_sorted,
    shorten,
    shown,
    table_lines,
    width,
    wrap,
)
from adapterctl.cli.jsonstream import json_pieces
from adapterctl.cli.safe import for_stream, json_visible, symbol, visible
from adapterctl.errors import StandardOutputError
from adapterctl.ops.checks import human_size

if TYPE_CHECKING:
    from adapterctl.engine.load import LoadReport
    from adapterctl.engine.save import SaveReport
    from adapterctl.ops.combine import CombineResult
    from adapterctl.ops.convert import ConversionResult
    from adapterctl.ops.engines import EngineReport, Verdict
    from adapterctl.ops.extract import ExtractResult
    from adapterctl.ops.inspect import AdapterReport, InspectReport
    from adapterctl.ops.merge import MergeResult
    from adapterctl.ops.push import PushResult
    from adapterctl.ops.select import SelectionResult

#: adapters with at least this many tensors are shown one row per module (`inspect --tensors`
#: lists every tensor)
COMPACT_FROM = 400


@contextlib.contextmanager
def _writing(stream: TextIO) -> Iterator[None]:
    """A failed write of a command's output (not a reader gone away: BrokenPipeError) is an
    error: an incomplete report or document must never exit 0."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        name = "standard output" if stream is sys.stdout else "standard error"
        raise StandardOutputError(
            f"cannot write to {name}: {e.strerror or e}", hint="the output is incomplete"
        ) from e


def flush_stdout() -> None:
    """Flush what is still buffered for stdout (its errors are the command's, see `_writing`)."""
    with _writing(sys.stdout):
        sys.stdout.flush()


def _write(stream: TextIO, text: str) -> None:
    with _writing(stream):
        _write_all(stream, for_stream(stream, text))


def _write_all(stream: TextIO, text: str) -> None:
    """`text` written whole to the stream's file descriptor, or an OSError: Python's buffered
    writer drops the rest of a short write to a file that cannot grow (a file-size limit) without
    a word, which would leave an incomplete report and exit 0."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):  # not a file (a test runner's capture)
        stream.write(text)
        return
    stream.flush()
    data = memoryview(text.encode(stream.encoding or "utf-8", stream.errors or "strict"))
    while data:
        try:
            data = data[os.write(fd, data) :]
        except BlockingIOError:  # a non-blocking pipe that is full: wait until it drains
            import select

            select.select([], [fd], [])


def _line(text: str, stream: TextIO | None = None) -> None:
    """One line of output, untrusted parts included: made visible, never interpreted."""
    _write(stream or sys.stdout, visible(text) + "\n")


def _lines(lines: Iterable[str], stream: TextIO | None = None) -> None:
    """Lines already made visible (laid out by `columns`)."""
    out = stream or sys.stdout
    it = iter(lines)
    while chunk := list(islice(it, 4096)):  # a 50k-row table is not one string
        _write(out, "".join(line + "\n" for line in chunk))


def _mark() -> str:
    return symbol(sys.stdout, "✓")


def _ellipsis() -> str:
    return symbol(sys.stdout, "…")


def _finite(obj: Any) -> Any:
    """NaN and ±infinity as the strings "NaN", "Infinity" and "-Infinity" (JSON has no literal
    for them; Python's `NaN` tokens are rejected by strict parsers such as jq)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None, *, ascii_only: bool = False) -> str:
    """Strictly valid JSON, lossless for every string, safe to print: control, bidi and format
    characters inside strings are `\\u` escapes, never raw."""
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only, allow_nan=False)
    except ValueError:  # a non-finite float somewhere (rare: convert the whole document then)
        text = json.dumps(_finite(obj), indent=indent, ensure_ascii=ascii_only, allow_nan=False)
    return text if ascii_only else json_visible(text)


def _json_line(obj: Any, stream: TextIO) -> None:
    ascii_only = symbol(stream, "✓") != "✓"  # a stream that is not Unicode gets \u escapes
    stream.write(json_text(obj, ascii_only=ascii_only) + "\n")
    stream.flush()


def _emit_json(obj: Any) -> None:
    """One JSON document on stdout, indented only for a person at a terminal; written in pieces
    (jsonstream: a generator in it is an array made as it is written)."""
    indent = 2 if sys.stdout.isatty() else None
    ascii_only = symbol(sys.stdout, "✓") != "✓"

    def encode(value: Any) -> str:
        return json_text(value, indent, ascii_only=ascii_only)

    with _writing(sys.stdout):
        for piece in json_pieces(obj, indent, encode):
            _write_all(sys.stdout, piece)
        _write_all(sys.stdout, "\n")
        sys.stdout.flush()


class Reported(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Reported)


class Output:
    """Everything a command writes, in the mode it runs in: under --json, one JSON document on
    stdout and JSON lines on stderr; otherwise lines and tables for a person."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode

    @cached_property
    def columns(self) -> int | None:
        """The width to lay out for (None: no limit, when stdout is not a terminal)."""
        return width()

    def result(
        self,
        report: R,
        render: Callable[[Output, R], None],
        *,
        document: Callable[[], Any] | None = None,
    ) -> None:
        """The command's result: under --json the JSON document (`document()`, by default the
        report's `to_dict()`), else `render(self, report)`."""
        if self.json_mode:
            self.json(report.to_dict() if document is None else document())
        else:
            render(self, report)

    def json(self, document: Any) -> None:
        """One JSON document on stdout, indented only for a person at a terminal; written in
        pieces (jsonstream: a generator in it is an array made as it is written)."""
        _emit_json(document)

    @contextlib.contextmanager
    def failure_document(
        self, kind: type[BaseException], document: Callable[[Any], Any]
    ) -> Iterator[None]:
        """Under --json, the document of a `kind` failure (what failed: the `--verify` report)
        before the error line the error boundary writes; the error itself goes on."""
        try:
            yield
        except kind as e:
            if self.json_mode:
                self.json(document(e))
            raise

    def line(self, text: str = "") -> None:
        """A plain line of the result on stdout (untrusted parts made visible)."""
        _line(text)

    def done(self, message: str) -> None:
        """A "✓ wrote ..." line: the result of a command that writes files."""
        _line(f"{_mark()} {message}")

    def wrapped(self, text: str, *, first: str = "", indent: int = 2) -> None:
        """`first` + `text` on stdout, broken at spaces to the width, continuations indented."""
        _lines(wrap(text, self.columns, indent=indent, first=first))

    def table(self, header: list[str], rows: Iterable[Any], justify: str) -> None:
        """Aligned columns on stdout fitted to the width; `justify` holds "l" or "r" per column
        (the first column's names are shortened where they do not fit)."""
        rows = rows if isinstance(rows, list) else list(rows)
        _lines(table_lines(header, rows, justify, columns=self.columns, ellipsis=_ellipsis()))

    def key_values(
        self, rows: list[tuple[str, str]], *, indent: str = "", fit: bool = False
    ) -> None:
        """`key  value` lines with the keys padded to one width; with `fit`, long values are
        wrapped to the width under themselves."""
        key_width = max(len(k) for k, _ in rows)
        cols = self.columns if fit else None
        for key, value in rows:
            first = f"{indent}{key.ljust(key_width)}  "
            _lines(wrap(value, cols, indent=len(first), first=first))

    def warning(self, message: str) -> None:
        """`warning: ...` on stderr, or `{"warning": {"message": ...}}` under --json."""
        if self.json_mode:
            _json_line({"warning": {"message": message}}, sys.stderr)
        else:
            _line(f"warning: {message}", sys.stderr)

    def error(self, message: str, hint: str | None, *, type_name: str) -> None:
        """One `error:` line (and at most one `hint:` line), or one JSON object under --json."""
        if self.json_mode:
            error = {"type": type_name, "message": message, "hint": hint}
            _json_line({"error": error}, sys.stderr)
            return
        _line(f"error: {message}", sys.stderr)
        if hint:
            _line(f"hint: {hint}", sys.stderr)
        sys.stderr.flush()

    def python_warning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        """`warnings.showwarning` for a command's run: a Python warning (numpy's overflow, a
        dependency's deprecation) as one `warning:` line, or a JSON line under --json."""
        self.warning(f"{category.__name__}: {message}")

    def status(self) -> contextlib.AbstractContextManager[Callable[[str], None]]:
        """A one-line spinner on stderr naming the current step (drawn only on a terminal)."""
        return status()

    def progress(self, description: str) -> contextlib.AbstractContextManager[Advance]:
        """A byte progress bar on stderr (drawn only on a terminal); see `progress`."""
        return progress(description)


class _WarningHandler(logging.Handler):
    def __init__(self, out: Output) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.warning(record.getMessage())


def route_library_warnings(out: Output) -> None:
    """Show the library's logged warnings through `out` as `warning:` lines (JSON lines under
    --json)."""
    logger = logging.getLogger("adapterctl")
    for h in logger.handlers:
        if isinstance(h, _WarningHandler):
            h.out = out
            return
    logger.addHandler(_WarningHandler(out))
    logger.propagate = False


def _console() -> Any:
    """A rich console on stderr that interprets nothing it is given."""
    from rich.console import Console

    return Console(stderr=True, markup=False, emoji=False, highlight=False)


def _text(label: str) -> Any:
    from rich.text import Text

    return Text(visible(label))


class Advance(Protocol):
    def __call__(self, advance: int, total: int, phase: str | None = None, /) -> None: ...


def _no_progress(advance: int, total: int, phase: str | None = None, /) -> None:
    return None


@contextlib.contextmanager
def progress(description: str) -> Iterator[Advance]:
    """A byte progress bar on stderr (drawn only when stderr is a terminal). `update(advance,
    total, phase)`: a phase other than the bar's current one restarts it under that label,
    counting items (modules, checks) rather than bytes."""
    if not sys.stderr.isatty():
        yield _no_progress
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(binary_units=True),
        console=_console(),
        transient=True,
    )
    with bar:
        task = bar.add_task(visible(description), total=None)
        current = [description]

        def update(advance: int, total: int, phase: str | None = None, /) -> None:
            label = phase or description
            if label != current[0]:
                current[0] = label
                bar.reset(task, total=total, description=visible(label))
            bar.update(task, advance=advance, total=total)

        yield update


@contextlib.contextmanager
def status() -> Iterator[Callable[[str], None]]:
    """A one-line spinner on stderr naming the current step (drawn only on a terminal)."""
    if not sys.stderr.isatty():
        yield lambda message: None
        return
    spinner_name = "dots" if symbol(sys.stderr, "…") == "…" else "line"
    with _console().status(_text("starting"), spinner=spinner_name) as spinner:
        yield lambda message: spinner.update(_text(message))


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:g}"


def _shape(shape: tuple[int, ...]) -> str:
    return symbol(sys.stdout, "×").join(str(d) for d in shape) or "scalar"


def render_inspect(out: Output, report: InspectReport, *, all_tensors: bool = False) -> None:
    """Per adapter: a summary, its tensors (one row per module from COMPACT_FROM tensors on,
    unless `all_tensors`), and its problems."""
    for i, adapter in enumerate(report.adapters):
        if i:
            out.line()
        _render_adapter(out, adapter, all_tensors)


def _render_adapter(out: Output, adapter: AdapterReport, all_tensors: bool) -> None:
    _render_summary(out, adapter)
    if len(adapter.tensors) >= COMPACT_FROM and not all_tensors:
        _render_compact(out, adapter)
    else:
        _render_tensors(out, adapter)
        _render_modules(out, adapter)
    for p in adapter.problems:
        out.wrapped(p.message, first=f"{p.severity}: ")


def render_inspect_engines(out: Output, r: EngineReport, *, all_tensors: bool = False) -> None:
    """`inspect --engine`: each adapter as `render_inspect` shows it, then a verdict per engine
    (loads, same as PEFT, needs) and the findings behind them."""
    for i, (adapter, verdicts) in enumerate(zip(r.inspect.adapters, r.verdicts, strict=True)):
        if i:
            out.line()
        _render_adapter(out, adapter, all_tensors)
        _render_verdicts(out, verdicts)


def _render_verdicts(out: Output, verdicts: tuple[Verdict, ...]) -> None:
    rows = [
        [v.engine, v.version, _yes(v.loads), _yes(v.same_as_peft), "; ".join(v.needs) or "-"]
        for v in verdicts
    ]
    out.line()
    out.table(["engine", "version", "loads", "same as PEFT", "needs"], rows, "lllll")
    for v in verdicts:
        for f in v.findings:
            out.wrapped(f.message, first=f"{v.engine} {f.level} [{f.rule}]: ")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _render_summary(out: Output, a: AdapterReport) -> None:
    s = a.summary()
    out.line(f"adapter {a.name}  ({a.path}, {a.format})")
    rows: list[tuple[str, str]] = [
        ("peft type", str(s["peft_type"] or "-")),
        ("task type", str(s["task_type"] or "-")),
        ("base model", str(s["base_model"] or "-")),
    ]
    if a.config is not None:
        rank = _num(s["r"])
        if s["ranks"] and s["ranks"] != [s["r"]]:
            rank += f" (stored: {', '.join(str(r) for r in s['ranks'])})"
        scal = ", ".join(_num(x) for x in s["scalings"]) or "-"
        rows += [
            ("r", rank),
            ("alpha", _num(s["lora_alpha"])),
            ("scaling", scal),
            ("rslora", "yes" if s["use_rslora"] else "no"),
            ("dora", "yes" if s["use_dora"] else "no"),
            ("bias", str(s["bias"])),
            ("init", json_text(s["init_lora_weights"])),
            ("target modules", str(s["target_modules"])),
            ("modules to save", ", ".join(s["modules_to_save"] or []) or "-"),
        ]
    mix = ", ".join(f"{k} {human_size(v)}" for k, v in a.dtype_mix.items()) or "-"
    rows += [
        ("lora modules", str(s["lora_modules"])),
        ("tensors", str(len(a.tensors))),
        ("parameters", f"{a.num_parameters:,}"),
        ("size", human_size(a.total_bytes)),
        ("dtypes", mix),
    ]
    out.key_values(rows, indent="  ", fit=True)
    out.line()


def _render_tensors(out: Output, a: AdapterReport) -> None:
    from adapterctl.ops.checks import tensor_kinds

    rows = []
    shared: dict[str, str] = {}  # 100k rows hold a few distinct shapes, dtypes and sizes
    classified = a.kinds or tensor_kinds(a.tensors, a.config)
    for t, (path, kind, info) in zip(a.tensors, classified, strict=True):
        module = (info.module if kind == info.kind else path) or t.name  # a variant's: its module
        cells = (_shape(t.shape), t.dtype, human_size(t.nbytes))
        rows.append((module, kind, *(shared.setdefault(c, c) for c in cells)))
    key = natural_keyer()
    rows.sort(key=lambda r: (key(r[0]), r[1]))
    out.table(["module", "kind", "shape", "dtype", "size"], rows, "llrlr")


_SHORT_KINDS = {
    "lora_A": "A",
    "lora_B": "B",
    "lora_B.bias": "B.bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}


def _render_compact(out: Output, a: AdapterReport) -> None:
    """One row per module: its tensors, rank, alpha, dtypes and size."""
    from adapterctl.ops.checks import tensor_kinds

    entries = {m.path: m for m in a.modules}
    groups: dict[str, list[Any]] = {}  # path -> [kind, tensor, kind, tensor...]: no pairs held
    classified = a.kinds or tensor_kinds(a.tensors, a.config)
    for t, (path, kind, _) in zip(a.tensors, classified, strict=True):
        found = groups.get(path or t.name)
        if found is None:
            groups[path or t.name] = [kind, t]
        else:
            found += (kind, t)
    rows = []
    shared: dict[str, str] = {}  # 50k rows hold a few distinct cells besides their paths
    for path in natural_sorted(groups):
        members = groups.pop(path)  # each group freed once it is a row
        group = [(k, t.dtype, t.nbytes) for k, t in zip(members[::2], members[1::2], strict=True)]
        kinds = " ".join(_SHORT_KINDS.get(k, k) for k, _, _ in sorted(group))
        m = entries.get(path)
        dtypes = ", ".join(sorted({d for _, d, _ in group}))
        size = human_size(sum(n for _, _, n in group))
        r = _num(m.r) if m else "-"
        cells = (kinds, r, _num(m.alpha) if m else "-", dtypes, size)
        rows.append((path, *(shared.setdefault(c, c) for c in cells)))
    out.table(["module", "tensors", "r", "alpha", "dtype", "size"], rows, "llrrlr")
    out.line(f"({len(rows)} modules, one row each; `--tensors` lists all {len(a.tensors)} tensors)")


def _render_modules(out: Output, a: AdapterReport) -> None:
    """Per-module rank/alpha/scaling, shown only where they differ from module to module."""
    lora = [m for m in a.modules if m.r is not None]
    if len({(m.r, m.alpha, m.scaling) for m in lora}) <= 1:
        return
    rows = [
        [m.path, str(m.r), _num(m.alpha), _num(m.scaling)]
        for m in sorted(lora, key=lambda m: natural_key(m.path))
    ]
    out.line()
    out.table(["module", "r", "alpha", "scaling"], rows, "lrrr")


def render_conversion(out: Output, result: ConversionResult) -> None:
    """Per module: what was done, the new r and alpha; then sizes and the verification. What
    was done to every module alike is said once, above the table."""
    modules = sorted(result.modules, key=lambda m: natural_key(m.module))
    reduced = any(m.energy is not None for m in modules)
    actions = {", ".join(m.actions) or "copied" for m in modules}
    same = len(actions) == 1
    if same:
        out.wrapped(f"every module: {actions.pop()}")
    header = ["module", *([] if same else ["done"]), "r", "alpha"]
    header += ["energy", "rel. error"] if reduced else []
    rows = []
    for m in modules:
        row = [m.module, *([] if same else [", ".join(m.actions) or "copied"])]
        row += [f"{m.r_in} -> {m.r}", f"{_num(m.alpha_in)} -> {_num(m.alpha)}"]
        if reduced:
            row += [f"{m.energy:.4f}" if m.energy is not None else "-", _num(m.relative_error)]
        rows.append(row)
    left = 1 if same else 2
    justify = "".join("l" if i < left else "r" for i in range(len(header)))
    out.table(header, rows, justify)
    sizes = f"{human_size(result.bytes_in)} -> {human_size(result.bytes_out)}"
    out.wrapped(f"{result.output} ({len(modules)} modules, {sizes})", first=f"{_mark()} ")
    if result.portable and result.not_portable:
        kinds: dict[str, list[str]] = {}
        for kept in result.not_portable:
            kinds.setdefault(kept.kind, []).append(shown(kept.name))
        listed = "; ".join(  # every name is in --json; here at most three a kind
            f"{kind} {', '.join(names[:3])}"
            + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            for kind, names in kinds.items()
        )
        out.wrapped(f"not portable (kept as is): {listed}", first="  ")
    v = result.verification
    if v is not None and v.worst is not None:
        room = max(16, (out.columns or 10**6) - 40)
        name = shorten(shown(v.worst.name), room, _ellipsis())  # measured as shown
        worst = f"{name} {v.worst.error:.2g} (allowed {v.worst.threshold:.2g})"
        out.wrapped(f"verified {v.checked} checks, worst {worst}", first="  ")


def render_extract(out: Output, r: ExtractResult) -> None:
    """Per module: kind, shape, rank (and whether capped), method, kept energy, error; then what
    changed but was not stored, what was stored whole, size, time, memory, the verification."""
    modules = sorted(r.modules, key=lambda m: natural_key(m.module))
    rows = []
    for m in modules:
        kind = m.kind + (f" (+ {', '.join(m.tied)})" if m.tied else "")
        rank = f"{m.rank} (full)" if m.capped else str(m.rank)
        energy = f"{m.energy:.4f}"
        rows.append(
            [m.module, kind, _shape(m.shape), rank, m.method, energy, _num(m.relative_error)]
        )
    header = ["module", "kind", "shape", "r", "method", "energy", "rel. error"]
    out.table(header, rows, "llrrlrr")
    out.wrapped(f"{r.output} ({len(modules)} modules, {human_size(r.bytes)})", first=f"{_mark()} ")
    if r.unchanged:
        out.wrapped(f"unchanged (not written): {r.unchanged} modules", first="  ")
    if r.changed_not_stored:
        names = [shown(n) for n in r.changed_not_stored]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        out.wrapped(
            f"changed, not stored: {', '.join(names[:3])}{more} (--modules-to-save, --bias all)",
            first="  ",
        )
    if r.modules_to_save:
        out.wrapped(f"stored whole: {len(r.modules_to_save)} tensors", first="  ")
    out.wrapped(f"time {r.seconds:.2f} s, peak memory {human_size(r.peak_memory)}", first="  ")
    v = r.verification
    if v is not None and v.worst is not None:
        room = max(16, (out.columns or 10**6) - 40)
        name = shorten(shown(v.worst.name), room, _ellipsis())
        worst = f"{name} {v.worst.error:.2g} (allowed {v.worst.threshold:.2g})"
        out.wrapped(f"verified {v.checked} checks, worst {worst}", first="  ")
    for message in r.warnings:
        out.warning(message)


def render_merge(out: Output, r: MergeResult) -> None:
    """What was written, what each variant merged, sizes, time and memory, the verification."""
    shards = f"{len(r.shards)} shard" + ("s" if len(r.shards) != 1 else "")
    out.done(f"{r.output} ({shards}, {human_size(r.bytes)})")
    modules = ", ".join(f"{n} {variant}" for variant, n in sorted(r.modules.items())) or "-"
    tensors = f"{r.tensors_merged} merged, {r.tensors_copied} copied"
    if r.tensors_added:
        tensors += f", {r.tensors_added} added"
    rows = [
        ("adapters", ", ".join(r.adapters)),
        ("modules", modules),
        ("tensors", tensors),
        ("dtype", r.dtype),
        ("time", f"{r.seconds:.2f} s, peak memory {human_size(r.peak_memory)}"),
    ]
    v = r.verification
    if v is not None and v.worst is not None:
        room = max(16, (out.columns or 10**6) - 40)
        name = shorten(shown(v.worst.name), room, _ellipsis())
        rows.append(
            (
                "verified",
                f"{len(v.checks)} tensors, worst {name} {v.worst.error:.2g} "
                f"(allowed {v.worst.threshold:.2g})",
            )
        )
    out.key_values(rows, indent="  ", fit=True)
    for message in r.warnings:
        out.warning(message)


def render_combine(out: Output, r: CombineResult) -> None:
    """Per module: the rank in -> out (the energy kept and the error with svd / --verify); then
    what was written and the verification."""
    modules = sorted(r.modules, key=lambda m: natural_key(m.module))
    cut = any(m.energy is not None for m in modules)
    checked = any(m.error is not None for m in modules)
    header = ["module", "r", *(["energy"] if cut else []), *(["rel. error"] if checked else [])]
    rows = []
    for m in modules:
        ranks = m.ranks_in
        summed = f"{len(ranks)} x {ranks[0]}" if len(set(ranks)) == 1 and len(ranks) > 2 else None
        row = [m.module, f"{summed or '+'.join(str(k) for k in ranks)} -> {m.rank_out}"]
        row += [f"{m.energy:.4f}" if m.energy is not None else "-"] if cut else []
        row += [_num(m.error)] if checked else []
        rows.append(row)
    out.table(header, rows, "l" + "r" * (len(header) - 1))
    what = f"{r.method}, {len(r.sources)} sources, {len(modules)} modules"
    out.wrapped(f"{r.output} ({what}, {human_size(r.bytes_out)})", first=f"{_mark()} ")
    v = r.verification
    if v is not None and v.worst is not None:
        room = max(16, (out.columns or 10**6) - 40)
        name = shorten(shown(v.worst.name), room, _ellipsis())
        worst = f"{name} {v.worst.error:.2g} (allowed {v.worst.threshold:.2g})"
        out.wrapped(f"verified {v.checked} modules, worst {worst}", first="  ")


def render_push(out: Output, result: PushResult) -> None:
    """The files and where they went (or, for a dry run, the files and the card)."""
    rows = [[f.path_in_repo, human_size(f.size)] for f in result.files]
    out.table(["file", "size"], rows, "lr")
    if result.dry_run:
        out.line()
        out.line("model card (README.md):")
        for card_line in result.card.split("\n")[: -1 if result.card.endswith("\n") else None]:
            # indented, so no line of the card can pass for one of ours; each made visible
            out.line("  " + card_line.removesuffix("\r").expandtabs(4))
        out.line(f"dry run: nothing uploaded to {result.repo_id} ({result.revision})")
    elif result.pull_request_url:
        out.done(f"pull request {result.pull_request_url}")
    elif result.changed:
        out.done(f"{result.commit_url}")
    else:
        out.done(f"{result.repo_id} already holds these files: no commit ({result.commit_url})")


def render_selection(out: Output, result: SelectionResult) -> None:
    for a in result.adapters:
        where = f"{result.output}/{a.path}" if a.path else result.output
        renamed = f" (was {a.source_name})" if a.source_name != a.name else ""
        out.done(f"{a.name}{renamed} -> {where} ({human_size(a.nbytes)})")


def render_load(out: Output, r: LoadReport) -> None:
    """The `load` report: base, adapter, keys, timings, and any generated text."""
    injected = ", ".join(f"{n} {kind}" for kind, n in r.injected.items()) or "-"
    rows = [
        ("base", f"{r.base} ({r.base_class}, from {r.class_source})"),
        ("parameters", f"{r.base_parameters:,}"),
        ("device", f"{r.device}, {r.dtype}"),
        ("adapter", f"{r.adapter} as `{r.adapter_name}`"),
        ("injected", injected),
        ("adapter params", f"{r.adapter_parameters:,} ({r.trainable_parameters:,} trainable)"),
        ("keys", "all loaded: none missing, none unexpected"),
        ("load time", f"base {r.base_load_s:.2f} s, adapter {r.adapter_load_s:.3f} s"),
        (
            "peak memory",
            f"{r.peak_rss_mib:.0f} MiB RSS"
            + (f", {r.cuda_peak_mib:.0f} MiB CUDA" if r.cuda_peak_mib is not None else ""),
        ),
    ]
    if r.merged_to:
        rows.append(("merged to", r.merged_to))
    out.key_values(rows)
    if r.generation is not None:
        g = r.generation
        out.line()
        out.line(f"prompt: {g.prompt}")
        out.line(f"adapter: {g.text}")
        if g.base_text is not None:
            out.line(f"base: {g.base_text}")
    for message in r.warnings:
        out.warning(message)


def render_save(out: Output, r: SaveReport) -> None:
    """What was written, its warnings, and (for a residual init) the residual base and what next."""
    out.done(f"{r.adapter_name}: {r.modules} modules, {r.parameters:,} parameters -> {r.output}")
    for message in r.warnings:
        out.warning(message)
    if r.residual_out:
        out.done(f"residual base -> {r.residual_out}")
        out.line(
            "next: train on the residual base with this adapter, then "
            f"`adapterctl convert TRAINED OUT --initial {r.output}`"
        )
