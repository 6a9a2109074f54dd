"""`adapterctl select`: a new PEFT directory with only the chosen adapters."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from adapterctl.cli.options import ForceOpt, JsonOpt, OutputArg, RevisionOpt, SourceArg, TokenOpt
from adapterctl.cli.output import Output, render_selection


def select_cmd(
    source: SourceArg,
    output_dir: OutputArg,
    adapter: Annotated[
        list[str],
        typer.Option(
            "--adapter",
            "-a",
            metavar="NAME",
            help="An adapter to keep (repeat for several).",
            show_default=False,
        ),
    ],
    rename: Annotated[
        Optional[list[str]],  # noqa: UP045 - Typer reads this annotation at run time
        typer.Option(
            "--rename",
            metavar="OLD=NEW",
            help="OLD=NEW: give a kept adapter a new name; NEW=default puts it at the root.",
            show_default=False,
        ),
    ] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Copy chosen adapters out of a multi-adapter checkpoint into a new PEFT directory.

    The adapter named `default` (after renaming) goes to the root, the others to subfolders named
    after them, as PEFT lays them out. Configs and weights are copied byte for byte.
    """
    from adapterctl.ops.hub import resolve
    from adapterctl.ops.select import parse_renames, select_adapters

    renames = parse_renames(rename or [])
    local = resolve(source, kind="adapters", revision=revision, token=token)
    out = Output(json_)
    with out.progress("copying") as advance:
        result = select_adapters(local, output_dir, adapter, renames, force=force, progress=advance)
    out.result(result, render_selection)
