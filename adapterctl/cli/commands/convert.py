"""`adapterctl convert`: PiSSA/OLoRA/CorDA to plain LoRA, dtype, .bin to safetensors, rank."""

from __future__ import annotations

from typing import Annotated

import typer

from adapterctl.cli import choices
from adapterctl.cli.options import (
    ForceOpt,
    JsonOpt,
    OutputArg,
    RevisionOpt,
    SubfolderOpt,
    TokenOpt,
)
from adapterctl.cli.output import Output, render_conversion


def convert_cmd(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="The (trained) adapter: a directory or its .safetensors/.bin file.",
            show_default=False,
        ),
    ],
    output_dir: OutputArg,
    initial: Annotated[
        str | None,
        typer.Option(
            "--initial",
            metavar="INIT",
            help="The initial PiSSA/OLoRA/CorDA adapter saved before training: write plain LoRA.",
            show_default=False,
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="BASE",
            help="The original base model: rebuild the initial adapter from it (pissa, olora).",
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            metavar="METHOD",
            help="With --base: pissa or olora, when the config's init_lora_weights is true.",
            show_default=False,
            autocompletion=choices.rebuilt_inits,
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="Cast every tensor: float32, bfloat16 or float16 (round to nearest even).",
            show_default=False,
            autocompletion=choices.cast_dtypes,
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", metavar="N", help="Reduce every module to rank N.", show_default=False
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            metavar="E",
            help="Reduce each module to the smallest rank keeping fraction E of its energy.",
            show_default=False,
        ),
    ] = None,
    portable: Annotated[
        bool,
        typer.Option(
            "--portable",
            help="Fold each module's scaling into B and pad all to one rank (lora_alpha = r): "
            "what every serving engine computes as PEFT does.",
        ),
    ] = False,
    dora_to_lora: Annotated[
        bool,
        typer.Option(
            "--dora-to-lora",
            help="With --base: write each DoRA module's weight change as plain LoRA factors "
            "(full rank unless --rank/--energy).",
        ),
    ] = False,
    embeddings_to_lora: Annotated[
        bool,
        typer.Option(
            "--embeddings-to-lora",
            help="With --base: write full embed_tokens/lm_head copies (modules_to_save) and "
            "trainable tokens as LoRA of their change (exact unless --rank/--energy).",
        ),
    ] = False,
    peft_version: Annotated[
        str | None,
        typer.Option(
            "--peft-version",
            metavar="X.Y",
            help="Write a config that PEFT X.Y (0.6 to 0.21) reads with the same meaning.",
            show_default=False,
            autocompletion=choices.peft_releases,
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Check the written files against SOURCE before renaming."),
    ] = False,
    revision: RevisionOpt = None,
    subfolder: SubfolderOpt = None,
    token: TokenOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Rewrite an adapter: PiSSA/OLoRA/CorDA to plain LoRA, dtype, .bin to safetensors, rank.

    One streaming pass over the adapter files; no base model is loaded (--base reads only the
    targeted weights) and torch is not imported unless SOURCE is a .bin file.
    """
    from adapterctl.ops.convert import VerificationFailed, convert_adapter

    out = Output(json_)
    with (
        out.failure_document(VerificationFailed, lambda e: e.result.to_dict()),
        out.progress("converting") as advance,
    ):
        result = convert_adapter(
            source,
            output_dir,
            initial=initial,
            base=base,
            init=init,
            dtype=dtype,
            rank=rank,
            energy=energy,
            portable=portable,
            dora_to_lora=dora_to_lora,
            embeddings_to_lora=embeddings_to_lora,
            peft_version=peft_version,
            verify_output=verify,
            force=force,
            revision=revision,
            subfolder=subfolder,
            token=token,
            progress=advance,
        )
    out.result(result, render_conversion)
