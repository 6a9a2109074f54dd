"""`adapterctl inspect`: tensors, shapes, dtypes, config and problems, from headers alone."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer

from adapterctl.cli import choices
from adapterctl.cli.options import JsonOpt, RevisionOpt, SourceArg, SubfolderOpt, TokenOpt
from adapterctl.cli.output import COMPACT_FROM, Output, render_inspect, render_inspect_engines
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
    engine: Annotated[
        Optional[list[str]],  # noqa: UP045 - Typer reads this annotation at run time
        typer.Option(
            "--engine",
            "-e",
            metavar="ENGINE",
            help="Also say whether ENGINE loads the adapter and computes what PEFT 0.21.2 "
            "computes, and what it needs: vllm, tgi, lorax, llama.cpp, peft or peft@X.Y "
            "(repeatable; with --check, exit 1 when one would not).",
            autocompletion=choices.engines,
        ),
    ] = None,
    base: Annotated[
        Optional[str],  # noqa: UP045 - Typer reads this annotation at run time
        typer.Option(
            "--base",
            metavar="BASE",
            help="With --engine: the base model (folder, config.json or Hub id) whose "
            "config.json the rules check shapes, vocabulary and architecture against.",
        ),
    ] = None,
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
    if engine:
        _inspect_engines(out, source, adapter, engine, base, check, tensors, revision,
                         subfolder, token)  # fmt: skip
        return
    if base is not None:
        from adapterctl.errors import InvalidOptionError

        raise InvalidOptionError("--base is read only with --engine", hint="add --engine ENGINE")
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


def _inspect_engines(
    out: Output,
    source: str,
    adapter: str | None,
    engines: list[str],
    base: str | None,
    check: bool,
    tensors: bool,
    revision: str | None,
    subfolder: str | None,
    token: str | None,
) -> None:
    """`inspect --engine`: the report, then per adapter a verdict per engine; with --check, exit
    1 when the report has an error or an engine would not load it or compute the same."""
    from adapterctl.format.gcpause import gc_paused
    from adapterctl.ops.engines import judge, parse_engine, read_base_config
    from adapterctl.ops.inspect import inspect_adapter

    for spec in engines:
        parse_engine(spec)  # a typo is refused before anything is read
    base_config = read_base_config(base, token=token) if base is not None else None
    with gc_paused():
        report = inspect_adapter(
            source, adapter, revision=revision, subfolder=subfolder, token=token, scan=check
        )
        judged = judge(report, engines, base_config)
        render = functools.partial(render_inspect_engines, all_tensors=tensors)
        out.result(judged, render, document=functools.partial(judged.to_dict, lazy=True))
    if check and (report.has_errors or judged.failed):
        failing = [
            (a.name, v)
            for a, vs in zip(report.adapters, judged.verdicts, strict=True)
            for v in vs
            if not v.same_as_peft
        ]
        if failing:
            name, v = failing[0]
            what = "does not load" if not v.loads else "computes something else than PEFT"
            first = f"{v.engine} {v.version} {what}: {v.findings[0].message}"
            out.error(
                f"adapter `{name}` fails the check: {first}",
                f"{len(failing)} failing engine verdict(s) in the report"
                + (" above" if not out.json_mode else ""),
                type_name="CheckFailed",
            )
        else:
            bad = next(a for a in report.adapters if a.errors)
            out.error(
                f"`{bad.path}` fails the check: {bad.errors[0].message}",
                None,
                type_name="CheckFailed",
            )
        raise typer.Exit(int(ExitCode.FAILURE))
