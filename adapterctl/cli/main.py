"""The Typer app: the root callback (--version) and every command, registered in one place."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from adapterctl import __version__
from adapterctl.cli.commands.combine import combine_cmd
from adapterctl.cli.commands.convert import convert_cmd
from adapterctl.cli.commands.extract import extract_cmd
from adapterctl.cli.commands.inspect import inspect_cmd
from adapterctl.cli.commands.load import load_cmd
from adapterctl.cli.commands.merge import merge_cmd
from adapterctl.cli.commands.push import push_cmd
from adapterctl.cli.commands.save import save_cmd
from adapterctl.cli.commands.select import select_cmd
from adapterctl.cli.errors import error_boundary
from adapterctl.cli.plainparams import PlainCommand, PlainGroup

app = typer.Typer(
    name="adapterctl",
    help="Manage LoRA adapters in the Hugging Face PEFT format.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
    cls=PlainGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"adapterctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Manage LoRA adapters in the Hugging Face PEFT format."""


for _name, _command in (
    ("inspect", inspect_cmd),
    ("select", select_cmd),
    ("convert", convert_cmd),
    ("extract", extract_cmd),
    ("load", load_cmd),
    ("merge", merge_cmd),
    ("combine", combine_cmd),
    ("save", save_cmd),
    ("push", push_cmd),
):  # every command's --json flag is its `json_` parameter (options.JsonOpt)
    app.command(_name, cls=PlainCommand)(error_boundary(_command, json_flag="json_"))


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so temp outputs are removed on the way out (exit 130)
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="adapterctl")
