"""cli/plainparams.py: the Typer internals it relies on are there, and it takes the fast path only
where Typer would check nothing (stock Typer's checks and exit codes otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer
from typer.testing import CliRunner

from adapterctl.cli import plainparams
from adapterctl.cli.plainparams import PlainCommand, PlainGroup

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_typer_internals_are_where_plainparams_expects_them() -> None:
    """Fails (never skips) when a Typer release moves what plainparams replaces."""
    from typer._coercion import RuntimeParam
    from typer._param_types import coerce_cli_path
    from typer.core import _TyperParameter

    assert callable(RuntimeParam._coerce_value)
    assert callable(coerce_cli_path)
    assert "_runtime_param" in _TyperParameter.__annotations__
    assert "type_descriptor" in _TyperParameter.__annotations__
    plainparams.check_internals()


def test_missing_internals_raise_instead_of_falling_back() -> None:
    """Without `RuntimeParam`, importing plainparams raises RuntimeError (no silent pydantic)."""
    code = (
        "import typer._coercion\n"
        "del typer._coercion.RuntimeParam\n"
        "try:\n"
        "    import adapterctl.cli.plainparams\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("RuntimeError: adapterctl.cli.plainparams needs Typer"), (
        proc.stdout
    )


def test_a_moved_runtime_param_attribute_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.core import _TyperParameter

    monkeypatch.delitem(_TyperParameter.__annotations__, "_runtime_param")
    with pytest.raises(RuntimeError, match="internals changed"):
        plainparams.check_internals()


def _app(command: object, *, cls: type = PlainCommand) -> typer.Typer:
    app = typer.Typer(cls=PlainGroup)
    app.command("cmd", cls=cls)(command)

    @app.command("other")
    def other() -> None:  # two commands, so "cmd" is a subcommand as in adapterctl
        """Nothing."""

    return app


def _exists(path: Annotated[Path, typer.Argument(exists=True)]) -> None:
    typer.echo(f"got {path}")


@pytest.mark.parametrize("cls", [PlainCommand, typer.core.TyperCommand], ids=["plain", "stock"])
def test_argument_exists_on_a_missing_path_exits_2_like_stock_typer(
    tmp_path: Path, cls: type
) -> None:
    missing = tmp_path / "missing"
    result = runner.invoke(_app(_exists, cls=cls), ["cmd", str(missing)])
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output
    ok = runner.invoke(_app(_exists, cls=cls), ["cmd", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == f"got {tmp_path}\n"


def _params(command: object) -> dict[str, object]:
    group = typer.main.get_command(_app(command))
    assert isinstance(group, typer.core.TyperGroup)
    cmd = group.commands["cmd"]
    ctx = typer.Context(cmd)
    return {p.name or "": p for p in cmd.get_params(ctx)}


def test_the_fast_path_is_refused_for_anything_typer_checks() -> None:
    def command(
        plain: Annotated[str, typer.Option()] = "",
        path: Annotated[Path | None, typer.Option()] = None,
        unread: Annotated[Path | None, typer.Option(readable=False)] = None,
        count: Annotated[int, typer.Option()] = 0,
        exists: Annotated[Path | None, typer.Option(exists=True)] = None,
        folder: Annotated[Path | None, typer.Option(file_okay=False)] = None,
        resolved: Annotated[Path | None, typer.Option(resolve_path=True)] = None,
        bounded: Annotated[int, typer.Option(min=1)] = 1,
        top: Annotated[float, typer.Option(max=1.0)] = 0.0,
        choice: Annotated[Literal["a", "b"], typer.Option()] = "a",
        parsed: Annotated[str, typer.Option(parser=str.upper)] = "",
        numbers: Annotated[list[int] | None, typer.Option()] = None,
    ) -> None:
        """Many kinds of parameter."""

    params = _params(command)
    fast = {n for n, p in params.items() if isinstance(getattr(p, "_runtime_param", None), plainparams._PlainParam)}  # fmt: skip
    assert fast == {"plain", "path", "unread", "count", "help"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bounded", "0"], "greater than or equal to 1"),
        (["--choice", "c"], "'c'"),
        (["--folder", "{file}"], "is a file"),
    ],
)
def test_refused_parameters_keep_typers_checks(
    tmp_path: Path, args: list[str], message: str
) -> None:
    def command(
        bounded: Annotated[int, typer.Option(min=1)] = 1,
        choice: Annotated[Literal["a", "b"], typer.Option()] = "a",
        folder: Annotated[Path | None, typer.Option(file_okay=False)] = None,
    ) -> None:
        """Checked parameters."""

    (tmp_path / "f").write_text("x")
    filled = [a.format(file=tmp_path / "f") for a in args]
    result = runner.invoke(_app(command), ["cmd", *filled])
    stock = runner.invoke(_app(command, cls=typer.core.TyperCommand), ["cmd", *filled])
    assert result.exit_code == 2, result.output
    assert result.output == stock.output
    assert message in " ".join(result.output.split())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_a_plain_path_gets_typers_readable_check(tmp_path: Path) -> None:
    def command(out: Annotated[Path, typer.Argument()]) -> None:
        typer.echo(f"got {out}")

    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    try:
        plain = runner.invoke(_app(command), ["cmd", str(locked)])
        stock = runner.invoke(_app(command, cls=typer.core.TyperCommand), ["cmd", str(locked)])
    finally:
        locked.chmod(0o700)
    assert (plain.exit_code, plain.output) == (stock.exit_code, stock.output)
    assert plain.exit_code == 2
    assert "is not readable" in plain.output


def test_plain_values_convert_as_typer_converts_them(tmp_path: Path) -> None:
    def command(
        name: Annotated[str, typer.Option()] = "",
        n: Annotated[int | None, typer.Option()] = None,
        x: Annotated[float, typer.Option()] = 0.0,
        out: Annotated[Path | None, typer.Option()] = None,
        item: Annotated[list[str] | None, typer.Option()] = None,
    ) -> None:
        typer.echo(repr((name, n, x, out, item)))

    args = ["--name", "a", "--n", "3", "--x", "0.5", "--out", str(tmp_path), "--item", "p"]
    args += ["--item", "q"]
    plain = runner.invoke(_app(command), ["cmd", *args])
    stock = runner.invoke(_app(command, cls=typer.core.TyperCommand), ["cmd", *args])
    assert plain.exit_code == stock.exit_code == 0, plain.output + stock.output
    assert plain.stdout == stock.stdout
    bad = runner.invoke(_app(command), ["cmd", "--n", "three"])
    assert bad.exit_code == 2
    assert "'three' is not an integer" in bad.output
