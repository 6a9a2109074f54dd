"""`adapterctl load`: a base model with an adapter, reported; optionally generate or merge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from adapterctl.cli import choices
from adapterctl.cli.options import (
    AdapterNameOpt,
    BasePathArg,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    RevisionOpt,
    SubfolderOpt,
    TokenOpt,
)
from adapterctl.cli.output import Output, render_load
from adapterctl.errors import InvalidOptionError


def load_cmd(
    base: BasePathArg,
    adapter: Annotated[
        str,
        typer.Argument(
            metavar="ADAPTER",
            help="An adapter directory or Hub repo id (OWNER/NAME).",
            show_default=False,
        ),
    ],
    adapter_name: AdapterNameOpt = "default",
    model_class: Annotated[
        str,
        typer.Option(
            "--model-class",
            metavar="CLASS",
            help="auto, causal-lm, seq-cls, token-cls, seq2seq-lm, question-ans or "
            "feature-extraction (auto: the adapter's task_type, then the base's architectures).",
            autocompletion=choices.model_classes,
        ),
    ] = "auto",
    device: DeviceOpt = "auto",
    device_map: Annotated[
        Optional[str],  # noqa: UP045 - Typer reads this annotation at run time
        typer.Option(
            "--device-map",
            metavar="MAP",
            help="auto: spread the base over the devices (accelerate).",
            autocompletion=choices.device_maps,
        ),
    ] = None,
    dtype: DtypeOpt = "auto",
    trainable: Annotated[
        bool, typer.Option("--trainable", help="Leave the adapter trainable (train mode).")
    ] = False,
    autocast: Annotated[
        bool,
        typer.Option(
            "--autocast-adapter-dtype/--no-autocast-adapter-dtype",
            help="Keep adapter weights in float32 on a half-precision base, as PEFT does.",
        ),
    ] = True,
    low_cpu_mem_usage: Annotated[
        bool,
        typer.Option(
            "--low-cpu-mem-usage", help="Create adapter tensors on the meta device first."
        ),
    ] = False,
    prompt: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--prompt", metavar="TEXT", help="Generate from this prompt with the adapter."
        ),
    ] = None,
    max_new_tokens: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--max-new-tokens",
            metavar="N",
            min=1,
            help="With --prompt: tokens to generate (default: 20).",
            show_default=False,
        ),
    ] = None,
    compare_base: Annotated[
        bool,
        typer.Option(
            "--compare-base", help="With --prompt: also generate with the adapter disabled."
        ),
    ] = False,
    merge_to: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--merge-to",
            metavar="DIR",
            help="Write the merged model here (transformers format).",
            readable=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="With --merge-to: replace DIR if it exists (swapped in only once complete).",
        ),
    ] = False,
    revision: RevisionOpt = None,
    subfolder: SubfolderOpt = None,
    token: TokenOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Load a base model with an adapter and report what was injected and loaded.

    Any adapter key missing from the file, or any key in the file that matches nothing in the
    model, is an error: an adapter never loads and silently does nothing.
    """
    from adapterctl.engine.load import load_session

    needs = {"--compare-base": (compare_base, prompt, "--prompt"),
             "--max-new-tokens": (max_new_tokens is not None, prompt, "--prompt"),
             "--force": (force, merge_to, "--merge-to")}  # fmt: skip
    for flag, (given, other, other_flag) in needs.items():
        if given and other is None:
            raise InvalidOptionError(f"{flag} does nothing without {other_flag}")
    if device_map is not None and device != "auto":
        raise InvalidOptionError(
            f"--device {device} and --device-map {device_map} conflict",
            hint="--device-map places the model itself: pass one of them",
        )
    out = Output(json_)
    with out.status() as step:
        report = load_session(
            base,
            adapter,
            adapter_name=adapter_name,
            model_class=model_class,
            device=device,
            device_map=device_map,
            dtype=dtype,
            is_trainable=trainable,
            autocast_adapter_dtype=autocast,
            low_cpu_mem_usage=low_cpu_mem_usage,
            prompt=prompt,
            max_new_tokens=20 if max_new_tokens is None else max_new_tokens,
            compare_base=compare_base,
            merge_to=merge_to,
            force=force,
            on_step=step,
            revision=revision,
            subfolder=subfolder,
            token=token,
        )
    out.result(report, render_load)
