"""The one error boundary: every command is wrapped in it at registration, told which of its
parameters is the --json flag.

AdapterctlError -> `error:`/`hint:` (or a JSON object under --json) and its exit code (1);
KeyboardInterrupt -> 130; MemoryError -> `error: out of memory` (1); anything else is a bug ->
exit 3 with a hint to rerun with ADAPTERCTL_DEBUG=1, which re-raises so the traceback shows.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

from adapterctl.cli import output
from adapterctl.cli.output import Output
from adapterctl.errors import AdapterctlError, ExitCode, StandardOutputError

F = TypeVar("F", bound=Callable[..., Any])


def _debug() -> bool:
    return os.environ.get("ADAPTERCTL_DEBUG", "") not in ("", "0")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def error_boundary(func: F, *, json_flag: str) -> F:
    """`func` with its failures shown as one `error:` line (or JSON object) and an exit code;
    `json_flag` names its parameter that asks for JSON output."""
    if json_flag not in inspect.signature(func).parameters:
        raise TypeError(f"{func.__name__} has no parameter {json_flag!r} (its --json flag)")

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = Output(bool(kwargs.get(json_flag, False)))
        output.route_library_warnings(out)
        try:
            with warnings.catch_warnings():  # restores showwarning afterwards
                warnings.showwarning = out.python_warning
                result = func(*args, **kwargs)
                output.flush_stdout()  # a write that fails now is the command's failure
                return result
        except (typer.Exit, typer.Abort, typer.BadParameter):  # Typer renders these itself (exit 2)
            raise
        except AdapterctlError as e:
            if _debug():
                raise
            if isinstance(e, StandardOutputError):
                _silence_stdout()  # what is buffered cannot be written at exit either
            out.error(e.message, e.hint, type_name=e.type_name)
            raise typer.Exit(int(e.exit_code)) from e
        except BrokenPipeError as e:
            # the reader went away (`adapterctl inspect --json | head`): nothing left to tell it
            _silence_stdout()
            raise typer.Exit(int(ExitCode.FAILURE)) from e
        except KeyboardInterrupt as e:
            out.error("interrupted", None, type_name="Interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from e
        except MemoryError as e:  # not a bug: the input needs more memory than this process may use
            if _debug():
                raise
            out.error(
                "out of memory",
                "the input needs more memory than is available; free some, or raise the limit",
                type_name="OutOfMemory",
            )
            raise typer.Exit(int(ExitCode.FAILURE)) from e
        except Exception as e:
            if _debug():
                raise
            out.error(
                f"internal error: {type(e).__name__}: {e}",
                "rerun with ADAPTERCTL_DEBUG=1 to see the traceback, and report it",
                type_name="InternalError",
            )
            raise typer.Exit(int(ExitCode.INTERNAL)) from e

    return wrapper  # type: ignore[return-value]


def _json_requested(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def run_with_usage_errors(main: Callable[[], Any], argv: list[str]) -> NoReturn:
    """Run Typer's main (not standalone) and exit as standalone would, except that a usage error
    (a bad or conflicting option, exit 2) under --json is one JSON error object on stderr."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        code = main()
    except ClickException as e:  # Typer's vendored Click: what standalone mode would show
        if (
            isinstance(e, UsageError)
            and not isinstance(e, NoArgsIsHelpError)
            and _json_requested(argv)
        ):
            command = e.ctx.command_path if e.ctx is not None else "adapterctl"
            Output(json_mode=True).error(
                e.format_message(), f"see `{command} --help`", type_name="UsageError"
            )
        else:
            e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        Output(_json_requested(argv)).error("aborted", None, type_name="Aborted")
        sys.exit(int(ExitCode.FAILURE))
    sys.exit(code if isinstance(code, int) else 0)
