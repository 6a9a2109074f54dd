"""The only module that writes to the terminal: JSON, rich tables, warnings, errors, progress.

Data goes to stdout; warnings, errors and progress bars go to stderr. rich is imported inside the
functions that draw tables or bars, so `--help` and `--json` never load it. NO_COLOR is honoured
(by rich, and by our own plain lines, which carry no colour).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from adapterctl.ops.checks import human_size

if TYPE_CHECKING:
    from adapterctl.engine.session import LoadReport
    from adapterctl.ops.convert import ConversionResult
    from adapterctl.ops.inspect import AdapterReport, InspectReport
    from adapterctl.ops.push import PushResult
    from adapterctl.ops.select import SelectionResult


def emit_json(obj: Any) -> None:
    """One JSON document on stdout, indented only for a person at a terminal."""
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def warning(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def error(message: str, hint: str | None, *, type_name: str, json_mode: bool) -> None:
    """One `error:` line (and at most one `hint:` line), or one JSON object under --json."""
    message = " ".join(message.split())  # always a single line
    if json_mode:
        payload = {"error": {"type": type_name, "message": message, "hint": hint}}
        sys.stderr.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        sys.stderr.write(f"error: {message}\n")
        if hint:
            sys.stderr.write(f"hint: {' '.join(hint.split())}\n")
    sys.stderr.flush()


def result_line(message: str) -> None:
    """A short "✓ wrote ..." line: the result of a command that writes files."""
    sys.stdout.write(f"{message}\n")


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warning(record.getMessage())


def route_library_warnings() -> None:
    """Show the library's logged warnings as `warning:` lines on stderr."""
    logger = logging.getLogger("adapterctl")
    if not any(isinstance(h, _WarningHandler) for h in logger.handlers):
        handler = _WarningHandler(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False


@contextlib.contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on stderr (drawn only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        yield lambda advance, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=None)

        def update(advance: int, total: int) -> None:
            bar.update(task, advance=advance, total=total)

        yield update


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:g}"


def render_inspect(report: InspectReport) -> None:
    """Per adapter: a summary, a table of its tensors, and its problems."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    for i, adapter in enumerate(report.adapters):
        if i:
            console.print()
        _render_summary(console, adapter)
        table = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
        for col, justify in (
            ("module", "left"),
            ("kind", "left"),
            ("shape", "right"),
            ("dtype", "left"),
            ("size", "right"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        from adapterctl.format.keys import classify

        mts = adapter.config.modules_to_save or [] if adapter.config else []
        rows = []
        for t in adapter.tensors:
            info = classify(t.name, mts)
            shape = "×".join(str(d) for d in t.shape) or "scalar"
            rows.append([info.module or t.name, info.kind, shape, t.dtype, human_size(t.nbytes)])
        _print_table(console, table, rows, left=2)
        _render_modules(console, adapter)
        for p in adapter.problems:
            console.print(f"{p.severity}: {p.message}", markup=False, soft_wrap=True)


def _render_summary(console: Any, a: AdapterReport) -> None:
    s = a.summary()
    console.print(f"adapter {a.name}  ({a.path}, {a.format})", markup=False, style="bold")
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
            ("init", json.dumps(s["init_lora_weights"])),
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
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"  {key.ljust(width)}  {value}", markup=False)
    console.print()


def _render_modules(console: Any, a: AdapterReport) -> None:
    """Per-module rank/alpha/scaling, shown only where they differ from module to module."""
    lora = [m for m in a.modules if m.r is not None]
    if len({(m.r, m.alpha, m.scaling) for m in lora}) <= 1:
        return
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("module", "r", "alpha", "scaling"):
        table.add_column(col, justify="left" if col == "module" else "right")
    console.print()
    rows = [[m.path, str(m.r), _num(m.alpha), _num(m.scaling)] for m in lora]
    _print_table(console, table, rows, left=1)


#: rich lays a table out at about a millisecond a row: past this many, plain columns are printed
RICH_TABLE_ROWS = 2000


def _print_table(console: Any, table: Any, rows: list[list[str]], left: int) -> None:
    """`table` with `rows` through rich, or, for a table of more than RICH_TABLE_ROWS rows (a
    100k-tensor adapter), as plain aligned columns in linear time."""
    if len(rows) > RICH_TABLE_ROWS:
        console.file.flush()
        plain_table([str(c.header) for c in table.columns], rows, left=left)
        return
    for row in rows:
        table.add_row(*row)
    console.print(table)


def plain_table(header: list[str], rows: list[list[str]], left: int = 1) -> None:
    """Aligned columns on stdout without rich (its import and layout cost more than the work of a
    fast command); the first `left` columns are left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


def render_conversion(result: ConversionResult) -> None:
    """Per module: what was done, the new r and alpha; then sizes and the verification."""
    reduced = any(m.energy is not None for m in result.modules)
    header = ["module", "done", "r", "alpha"] + (["energy", "rel. error"] if reduced else [])
    rows = []
    for m in result.modules:
        row = [m.module, ", ".join(m.actions) or "copied", f"{m.r_in} -> {m.r}"]
        row.append(f"{_num(m.alpha_in)} -> {_num(m.alpha)}")
        if reduced:
            row += [f"{m.energy:.4f}" if m.energy is not None else "-", _num(m.relative_error)]
        rows.append(row)
    plain_table(header, rows, left=2)
    sizes = f"{human_size(result.bytes_in)} -> {human_size(result.bytes_out)}"
    v = result.verification
    if v is not None and v.worst is not None:
        worst = f"{v.worst.name} {v.worst.error:.2g} (allowed {v.worst.threshold:.2g})"
        checked = f"; verified {v.checked} checks, worst {worst}"
    else:
        checked = ""
    result_line(f"✓ {result.output} ({len(result.modules)} modules, {sizes}{checked})")


def render_push(result: PushResult) -> None:
    """The files and where they went (or, for a dry run, the files and the card)."""
    rows = [[f.path_in_repo, human_size(f.size)] for f in result.files]
    plain_table(["file", "size"], rows)
    if result.dry_run:
        sys.stdout.write(f"\n{result.card}")
        result_line(f"dry run: nothing uploaded to {result.repo_id} ({result.revision})")
    elif result.pull_request_url:
        result_line(f"✓ pull request {result.pull_request_url}")
    elif result.changed:
        result_line(f"✓ {result.commit_url}")
    else:
        result_line(
            f"✓ {result.repo_id} already holds these files: no commit ({result.commit_url})"
        )


def render_selection(result: SelectionResult) -> None:
    for a in result.adapters:
        where = f"{result.output}/{a.path}" if a.path else result.output
        renamed = f" (was {a.source_name})" if a.source_name != a.name else ""
        result_line(f"✓ {a.name}{renamed} -> {where} ({human_size(a.nbytes)})")


@contextlib.contextmanager
def status() -> Iterator[Callable[[str], None]]:
    """A one-line spinner on stderr naming the current step (drawn only on a terminal)."""
    if not sys.stderr.isatty():
        yield lambda message: None
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as spinner:
        yield lambda message: spinner.update(message)


def render_load(r: LoadReport) -> None:
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
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        sys.stdout.write(f"{key.ljust(width)}  {value}\n")
    if r.generation is not None:
        g = r.generation
        sys.stdout.write(f"\nprompt: {g.prompt}\nadapter: {g.text}\n")
        if g.base_text is not None:
            sys.stdout.write(f"base: {g.base_text}\n")
    for message in r.warnings:
        warning(message)
