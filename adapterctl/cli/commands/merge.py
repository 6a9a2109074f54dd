"""`adapterctl merge`: a base model with adapters merged in, written one tensor at a time."""

from __future__ import annotations

from typing import Annotated

import typer

from adapterctl.cli import choices
from adapterctl.cli.options import (
    BasePathArg,
    ForceOpt,
    JsonOpt,
    OutputArg,
    RevisionOpt,
    SubfolderOpt,
    TokenOpt,
)
from adapterctl.cli.output import Output, render_merge


def merge_cmd(
    base: BasePathArg,
    adapter: Annotated[
        str,
        typer.Argument(
            metavar="ADAPTER",
            help="The adapter directory (or a multi-adapter directory), or a Hub repo id.",
            show_default=False,
        ),
    ],
    output_dir: OutputArg,
    adapter_names: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            metavar="NAME",
            help="An adapter of a multi-adapter directory; repeat to merge several, in order.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="auto (keep each tensor's dtype), float32, bfloat16 or float16.",
            show_default=False,
            autocompletion=choices.merge_dtypes,
        ),
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size",
            metavar="SIZE",
            help='The largest output shard, e.g. "5GB" or "500MB" (default: 50GB).',
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Check every merged tensor in float64 before renaming."),
    ] = False,
    revision: RevisionOpt = None,
    subfolder: SubfolderOpt = None,
    token: TokenOpt = None,
    base_revision: Annotated[
        str | None,
        typer.Option(
            "--base-revision",
            metavar="REV",
            help="For a Hub BASE: the branch, tag or commit (default: main).",
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Merge adapters into their base model and write the merged model.

    The result is PEFT's merge_and_unload(). The base's safetensors are read one tensor at a
    time and the output shards written as they go: memory stays a few tensors, whatever the
    model's size, and torch is not imported for a safetensors base.
    """
    from adapterctl.ops.merge import VerificationFailed, merge

    out = Output(json_)
    with (
        out.failure_document(
            VerificationFailed, lambda e: {"verification": e.verification.to_dict()}
        ),
        out.progress("merging") as advance,
    ):
        result = merge(
            base,
            adapter,
            output_dir,
            adapter_names=adapter_names or None,
            dtype=dtype,
            max_shard_size=max_shard_size,
            verify=verify,
            force=force,
            revision=revision,
            subfolder=subfolder,
            token=token,
            base_revision=base_revision,
            progress=advance,
        )
    out.result(result, render_merge)
