"""`adapterctl save`: create a new adapter on a base model and write it as PEFT would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from adapterctl.cli import output
from adapterctl.cli.options import (
    AdapterNameOpt,
    BasePathArg,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
)
from adapterctl.errors import InvalidOptionError

_TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", "QUESTION_ANS")


def _pairs(values: list[str], flag: str, cast: Any) -> dict[str, Any]:
    out = {}
    for item in values:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=flag)
        try:
            out[key] = cast(value)
        except ValueError as e:
            raise typer.BadParameter(f"{item!r}: {value!r} is not a number", param_hint=flag) from e
    return out


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def save_cmd(
    base: BasePathArg,
    output_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUTPUT", help="The adapter directory to write.", show_default=False
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
            "--init", metavar="INIT", help="default, gaussian, pissa, pissa_niter_K or olora."
        ),
    ] = "default",
    residual_out: Annotated[
        Path | None,
        typer.Option(
            "--residual-out", metavar="DIR", help="Where the residual base goes (pissa/olora)."
        ),
    ] = None,
    dropout: Annotated[float, typer.Option("--dropout", metavar="P", help="lora_dropout.")] = 0.0,
    bias: Annotated[
        str, typer.Option("--bias", metavar="BIAS", help="none, all or lora_only.")
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
        str | None, typer.Option("--task-type", metavar="TASK", help=", ".join(_TASKS))
    ] = None,
    adapter_name: AdapterNameOpt = "default",
    save_embedding_layers: Annotated[
        str, typer.Option("--save-embedding-layers", metavar="WHEN", help="auto, true or false.")
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
    from adapterctl.engine.create import create_adapter

    names = [n.strip() for item in target or [] for n in item.split(",") if n.strip()]
    if bool(names) == bool(target_regex):
        raise typer.BadParameter(
            "pass --target NAME ... or --target-regex REGEX (one of them)", param_hint="--target"
        )
    if task_type is not None and task_type not in _TASKS:
        raise typer.BadParameter(
            f"{task_type!r} is not one of {', '.join(_TASKS)}", param_hint="--task-type"
        )
    if any(n < 0 for n in layers or []):
        raise InvalidOptionError(
            f"--layers takes layer indices (0, 1, ...), not {min(layers or [])}"
        )
    if save_embedding_layers not in ("auto", "true", "false"):
        raise typer.BadParameter("auto, true or false", param_hint="--save-embedding-layers")
    inits: dict[str, Any] = {
        "default": True,
        "gaussian": "gaussian",
        "pissa": "pissa",
        "olora": "olora",
    }
    if init not in inits and not (init.startswith("pissa_niter_") and init[12:].isdigit()):
        raise typer.BadParameter(
            f"{init!r}: default, gaussian, pissa, pissa_niter_K or olora", param_hint="--init"
        )
    fields: dict[str, Any] = {
        "r": r,
        "lora_alpha": _number(str(alpha)) if alpha is not None else r,
        "target_modules": target_regex
        if target_regex
        else ("all-linear" if names == ["all-linear"] else names),
        "init_lora_weights": inits.get(init, init),
        "lora_dropout": dropout,
        "bias": bias,
        "use_dora": use_dora,
        "use_rslora": use_rslora,
        "modules_to_save": modules_to_save or None,
        "rank_pattern": _pairs(rank_pattern or [], "--rank-pattern", int),
        "alpha_pattern": _pairs(alpha_pattern or [], "--alpha-pattern", _number),
        "layers_to_transform": layers or None,
        "exclude_modules": exclude or None,
        "task_type": task_type,
    }
    if base_model is not None:
        fields["base_model_name_or_path"] = base_model
    embeddings: str | bool = (
        "auto" if save_embedding_layers == "auto" else save_embedding_layers == "true"
    )
    with output.status() as step:
        step(f"creating the adapter on {base}")
        report = create_adapter(
            base,
            output_dir,
            fields,
            adapter_name=adapter_name,
            residual_out=residual_out,
            save_embedding_layers=embeddings,
            safe_serialization=safe_serialization,
            dtype=dtype,
            device=device,
            seed=seed,
            force=force,
        )
    if json_:
        output.emit_json(report.to_dict())
        return
    output.done(
        f"{report.adapter_name}: {report.modules} modules, {report.parameters:,} parameters -> {report.output}"
    )
    for message in report.warnings:
        output.warning(message)
    if report.residual_out:
        output.done(f"residual base -> {report.residual_out}")
        output.result_line(
            "next: train on the residual base with this adapter, then "
            f"`adapterctl convert TRAINED OUT --initial {report.output}`"
        )
