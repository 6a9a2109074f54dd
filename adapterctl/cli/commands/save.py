"""`adapterctl save`: create a new adapter on a base model and write it as PEFT would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapterctl.cli import choices
from adapterctl.cli.options import (
    AdapterNameOpt,
    BasePathArg,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
)
from adapterctl.cli.output import Output, render_save
from adapterctl.format.config import TASK_TYPES


def save_cmd(
    base: BasePathArg,
    output_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUTPUT",
            help="The adapter directory to write.",
            show_default=False,
            readable=False,
        ),
    ],
    r: Annotated[int, typer.Option("--r", metavar="N", min=1, help="The rank.")],
    alpha: Annotated[
        float | None, typer.Option("--alpha", metavar="A", help="lora_alpha (default: r).")
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            metavar="NAME",
            help="A module name (repeat, or comma-separated), or all-linear.",
        ),
    ] = None,
    target_regex: Annotated[
        str | None,
        typer.Option(
            "--target-regex", metavar="REGEX", help="Target the modules whose full path matches."
        ),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            metavar="INIT",
            help="default, gaussian, pissa, pissa_niter_K or olora.",
            autocompletion=choices.new_inits,
        ),
    ] = "default",
    residual_out: Annotated[
        Path | None,
        typer.Option(
            "--residual-out",
            metavar="DIR",
            help="Where the residual base goes (pissa/olora).",
            readable=False,
        ),
    ] = None,
    dropout: Annotated[float, typer.Option("--dropout", metavar="P", help="lora_dropout.")] = 0.0,
    bias: Annotated[
        str,
        typer.Option(
            "--bias",
            metavar="BIAS",
            help="none, all or lora_only.",
            autocompletion=choices.biases,
        ),
    ] = "none",
    use_dora: Annotated[bool, typer.Option("--use-dora", help="DoRA.")] = False,
    use_rslora: Annotated[
        bool, typer.Option("--use-rslora", help="Scale by alpha/sqrt(r).")
    ] = False,
    modules_to_save: Annotated[
        list[str] | None,
        typer.Option(
            "--modules-to-save", metavar="NAME", help="Train and save this module in full (repeat)."
        ),
    ] = None,
    rank_pattern: Annotated[
        list[str] | None,
        typer.Option(
            "--rank-pattern", metavar="KEY=R", help="Rank for modules matching KEY (repeat)."
        ),
    ] = None,
    alpha_pattern: Annotated[
        list[str] | None,
        typer.Option(
            "--alpha-pattern", metavar="KEY=A", help="Alpha for modules matching KEY (repeat)."
        ),
    ] = None,
    layers: Annotated[
        list[int] | None,
        typer.Option("--layers", metavar="N", help="Only these layer indices (repeat)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="NAME", help="Never target this module (repeat)."),
    ] = None,
    task_type: Annotated[
        str | None,
        typer.Option(
            "--task-type",
            metavar="TASK",
            help=", ".join(TASK_TYPES),
            autocompletion=choices.task_types,
        ),
    ] = None,
    adapter_name: AdapterNameOpt = "default",
    save_embedding_layers: Annotated[
        str,
        typer.Option(
            "--save-embedding-layers",
            metavar="WHEN",
            help="auto, true or false.",
            autocompletion=choices.embedding_choices,
        ),
    ] = "auto",
    safe_serialization: Annotated[
        bool,
        typer.Option(
            "--safe-serialization/--no-safe-serialization",
            help="safetensors (default) or adapter_model.bin.",
        ),
    ] = True,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    seed: Annotated[
        int, typer.Option("--seed", metavar="N", help="Seed of the random initialisation.")
    ] = 0,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", metavar="ID", help="The Hub id to record as the base model."),
    ] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Create a new adapter on BASE and write it to OUTPUT exactly as PEFT would.

    PiSSA and OLoRA turn the base into a residual model: --residual-out DIR receives it, and the
    adapter is written with `init_lora_weights: true` (PEFT's documented workflow).
    """
    from adapterctl.engine.save import create_adapter
    from adapterctl.format.newconfig import NewAdapter, OptionValueError

    try:
        new = NewAdapter.from_options(
            r=r,
            alpha=alpha,
            targets=target or [],
            target_regex=target_regex,
            init=init,
            dropout=dropout,
            bias=bias,
            use_dora=use_dora,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save or [],
            rank_pattern=rank_pattern or [],
            alpha_pattern=alpha_pattern or [],
            layers=layers or [],
            exclude=exclude or [],
            task_type=task_type,
            base_model=base_model,
            save_embedding_layers=save_embedding_layers,
        )
    except OptionValueError as e:  # shown as Typer shows a bad value (exit 2)
        raise typer.BadParameter(e.message, param_hint=e.option) from e
    out = Output(json_)
    with out.status() as step:
        step(f"creating the adapter on {base}")
        report = create_adapter(
            base,
            output_dir,
            new,
            adapter_name=adapter_name,
            residual_out=residual_out,
            safe_serialization=safe_serialization,
            dtype=dtype,
            device=device,
            seed=seed,
            force=force,
        )
    out.result(report, render_save)
