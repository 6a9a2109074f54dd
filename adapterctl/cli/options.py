"""Option and argument types shared by the commands (one alias per concept)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapterctl.cli import choices

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout (errors as JSON on stderr)."),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Replace OUTPUT if it exists (swapped in only once complete)."),
]
# SOURCE and BASE stay text: `./x` must reach the one rule of what is a local path as typed
# (a Path would drop the `./`)
SourceArg = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE",
        help="An adapter directory, a multi-adapter directory, or a .safetensors/.bin file.",
        show_default=False,
    ),
]
# an output's checks are the library's (it may exist, to be replaced): readable=False asks
# Typer for none
OutputArg = Annotated[
    Path,
    typer.Argument(
        metavar="OUTPUT",
        help="The directory to write (must not exist unless --force).",
        show_default=False,
        readable=False,
    ),
]
AdapterNameOpt = Annotated[
    str, typer.Option("--adapter-name", metavar="NAME", help="The adapter's name in the model.")
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="auto (the GPU when there is one), cpu, cuda or cuda:N.",
        autocompletion=choices.devices,
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="The base's dtype: auto, float32, bfloat16 or float16.",
        autocompletion=choices.dtypes,
    ),
]
BasePathArg = Annotated[
    str,
    typer.Argument(
        metavar="BASE",
        help="A transformers model directory, or a Hub repo id.",
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        metavar="REV",
        help="For a Hub repo id: the branch, tag or commit (default: main).",
        show_default=False,
    ),
]
SubfolderOpt = Annotated[
    str | None,
    typer.Option(
        "--subfolder",
        metavar="DIR",
        help="The adapter's folder inside the directory or Hub repo.",
        show_default=False,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        metavar="TOKEN",
        help="Hub token (default: HF_TOKEN, then the stored login). Never printed.",
        show_default=False,
    ),
]
