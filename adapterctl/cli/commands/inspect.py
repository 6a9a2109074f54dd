"""`adapterctl inspect`: tensors, shapes, dtypes, config and problems, from headers alone."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer

from adapterctl.cli.options import JsonOpt, RevisionOpt, SourceArg, SubfolderOpt, TokenOpt
from adapterctl.cli.output import COMPACT_FROM, Output, render_inspect
from adapterctl.errors import ExitCode


def inspect_cmd(
    source: SourceArg,
    adapter: Annotated[
        Optional[str],  # noqa: UP045 - Typer reads this annotation at run time
        typer.Option(
            "--adapter",
            "-a",
            metavar="NAME",
            help="Only this adapter of a multi-adapter directory.",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Also scan the values for NaN/Inf (a warning per tensor); exit 1 when the report "
            "finds an error (after printing it).",
        ),
    ] = False,
    tensors: Annotated[
        bool,
        typer.Option(
            "--tensors",
            help=f"One row per tensor (from {COMPACT_FROM} tensors on: one per module).",
        ),
    ] = False,
    revision: RevisionOpt = None,
    subfolder: SubfolderOpt = None,
    token: TokenOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show what an adapter holds: tensors, shapes, dtypes, config and problems.

    Reads adapter_config.json and the safetensors header only (never the tensor data), so it is
    instant on any size of adapter and never imports torch; --check also reads the values, in
    bounded pieces, to count NaN and Inf. SOURCE may be a Hub repo id
    (OWNER/NAME): then the headers are read over HTTP range requests, not the weights.
    """
    from adapterctl.format.gcpause import gc_paused
    from adapterctl.ops.inspect import inspect_adapter

    out = Output(json_)
    with gc_paused():  # a report of 100k tensors is many small objects, none in a cycle
        report = inspect_adapter(
            source, adapter, revision=revision, subfolder=subfolder, token=token, scan=check
        )
        render = functools.partial(render_inspect, all_tensors=tensors)
        lazy = functools.partial(report.to_dict, lazy=True)  # written as it is made
        out.result(report, render, document=lazy)
    if check and report.has_errors:
        bad = next(a for a in report.adapters if a.errors)
        count = sum(len(a.errors) for a in report.adapters)
        out.error(
            f"`{bad.path}` fails the check: {bad.errors[0].message}",
            f"{count} error(s) in the report" + (" above" if not json_ else ""),
            type_name="CheckFailed",
        )
        raise typer.Exit(int(ExitCode.FAILURE))
