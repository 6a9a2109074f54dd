"""`adapterctl extract`: a plain LoRA adapter from a full fine-tune (TUNED - BASE), read one module
at a time."""

from __future__ import annotations

from typing import Annotated

import typer

from adapterctl.cli import choices
from adapterctl.cli.options import BasePathArg, ForceOpt, JsonOpt, OutputArg, TokenOpt
from adapterctl.cli.output import Output, render_extract


def extract_cmd(
    base: BasePathArg,
    tuned: Annotated[
        str,
        typer.Argument(
            metavar="TUNED",
            help="The fine-tuned model directory (same architecture as BASE), or a Hub repo id.",
            show_default=False,
        ),
    ],
    output_dir: OutputArg,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            metavar="N",
            help="Write every module at rank N (its full rank at most).",
            show_default=False,
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            metavar="E",
            help="Write each module at the smallest rank keeping fraction E of its change.",
            show_default=False,
        ),
    ] = None,
    max_rank: Annotated[
        int | None,
        typer.Option(
            "--max-rank", metavar="N", help="With --energy: at most rank N.", show_default=False
        ),
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            metavar="NAME",
            help="Only these modules (names as in target_modules; repeat, or a comma list). "
            "Default: every linear layer whose weight changed.",
            show_default=False,
        ),
    ] = None,
    modules_to_save: Annotated[
        list[str] | None,
        typer.Option(
            "--modules-to-save",
            metavar="NAME",
            help="Store these modules' TUNED tensors whole (repeat, or a comma list).",
            show_default=False,
        ),
    ] = None,
    bias: Annotated[
        str,
        typer.Option(
            "--bias",
            metavar="none|all",
            help="all: store every bias of TUNED (PEFT's bias='all').",
        ),
    ] = "none",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="The factors' dtype: float32, bfloat16 or float16 (default: TUNED's).",
            show_default=False,
            autocompletion=choices.cast_dtypes,
        ),
    ] = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Always LAPACK's full SVD (no randomized SVD).")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", metavar="S", help="The randomized SVD's seed.")
    ] = 0,
    portable: Annotated[
        bool,
        typer.Option(
            "--portable",
            help="One rank for every module (zero-padded to the largest), r = lora_alpha, no "
            "patterns: what vLLM, TGI, LoRAX and llama.cpp scale as PEFT does.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Check the written factors against TUNED - BASE first."),
    ] = False,
    token: TokenOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Extract a LoRA adapter from a full fine-tune: TUNED - BASE as plain LoRA factors.

    Each targeted module's change is factored (an SVD, exact at the change's full rank) with
    scaling 1; the checkpoints are read one module at a time, whatever their shard layouts,
    and torch is not imported.
    """
    from adapterctl.ops.extract import VerificationFailed, extract

    out = Output(json_)
    with (
        out.failure_document(VerificationFailed, lambda e: e.result.to_dict()),
        out.progress("extracting") as advance,
    ):
        result = extract(
            base,
            tuned,
            output_dir,
            rank=rank,
            energy=energy,
            max_rank=max_rank,
            targets=targets or (),
            modules_to_save=modules_to_save or (),
            bias=bias,
            dtype=dtype,
            exact=exact,
            seed=seed,
            portable=portable,
            verify=verify,
            force=force,
            token=token,
            progress=advance,
        )
    out.result(result, render_extract)
