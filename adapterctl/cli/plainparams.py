"""Direct coercion for plain parameters, so that running a command never imports pydantic.

Typer 0.29 converts every parameter value (even the `--help` flag, whose value is None when it is
not given) through a pydantic TypeAdapter; importing pydantic and building the adapters costs
about 0.18 s per run, half of `adapterctl inspect --json`. For a plain parameter (`bool`, `str`,
`int`, `float`, `Path`, a list of `str`, or one of those or None) with nothing for Typer to check,
Typer's own result is simply the value, `int(value)`, `float(value)`, `Path(value)` (through
Typer's own path check, which needs no pydantic for a Path) or `list(value)`. The command and group
classes below give exactly those parameters that direct conversion; every other parameter (any
other type, choices, bounds, a custom parser, or path checks such as `exists=True`) keeps Typer's
own handling.

This works through Typer internals (`typer._coercion.RuntimeParam` and its `_coerce_value`,
`typer._param_types.coerce_cli_path`, a parameter's `_runtime_param` and `type_descriptor`). If a
Typer release moves them, importing this module raises RuntimeError: it never falls back in
silence (tests/cli/test_plainparams.py fails too).
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from typer import BadParameter
from typer.core import TyperCommand, TyperGroup

try:
    from typer._coercion import RuntimeParam
    from typer._param_types import coerce_cli_path
    from typer.core import _TyperParameter
except ImportError as e:  # pragma: no cover - a Typer that moved its internals
    raise RuntimeError(
        f"adapterctl.cli.plainparams needs Typer 0.29's internals ({e}): pin typer to the "
        "version in constraints.txt, or update plainparams for this one"
    ) from e

_BASES = (bool, str, int, float, Path, list[str])
#: ParameterInfo attributes whose defaults ask Typer for no check; any other value is a check
#: (a path that must exist, a file and not a folder, bounds, a parser...) that Typer makes.
#: (`readable` is not here: the fast path makes that check with Typer's own function.)
_NO_CHECKS: dict[str, Any] = {
    "parser": None, "click_type": None, "min": None, "max": None, "clamp": False,
    "formats": None, "mode": None, "exists": False, "file_okay": True, "dir_okay": True,
    "writable": False, "resolve_path": False, "allow_dash": False, "path_type": None,
}  # fmt: skip


def check_internals() -> None:
    """RuntimeError unless Typer still works as this module relies on."""
    missing = [
        name
        for owner, name in (
            (RuntimeParam, "_coerce_value"),
            (RuntimeParam, "coerce"),
            (_TyperParameter, "get_runtime_param"),
            (_TyperParameter, "process_value"),
        )
        if not callable(getattr(owner, name, None))
    ]
    if "_runtime_param" not in getattr(_TyperParameter, "__annotations__", {}):
        missing.append("_TyperParameter._runtime_param")
    if missing:
        raise RuntimeError(
            f"adapterctl.cli.plainparams: Typer's internals changed (missing: {', '.join(missing)})"
        )


def _optional_of(annotation: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_plain(annotation: Any) -> bool:
    return any(_optional_of(annotation) == t for t in _BASES)


def is_fast(param: Any) -> bool:
    """Whether `param` gets the direct conversion: plain, and nothing for Typer to check."""
    desc = param.type_descriptor
    info = desc.parameter_info
    return (
        _is_plain(desc.annotation)
        and not desc.is_choice
        and desc.file_annotation is None
        and all(getattr(info, k, v) == v for k, v in _NO_CHECKS.items())
    )


def _convert(annotation: Any, value: Any, param: Any, ctx: Any) -> Any:
    annotation = _optional_of(annotation)
    if value is None:
        return None
    if annotation is Path:  # Typer's own check (readable unless told not), on a Path: no pydantic
        info = param.type_descriptor.parameter_info
        return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
    if annotation == list[str]:
        return [str(v) for v in value]
    if annotation is str:
        return str(value)
    if annotation in (int, float) and not isinstance(value, annotation):
        try:
            return annotation(value)
        except ValueError as e:
            kind = "an integer" if annotation is int else "a number"
            raise BadParameter(f"{value!r} is not {kind}") from e
    return value


class _PlainParam(RuntimeParam):
    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        return _convert(self.annotation, value, param, ctx)


def _make_plain(params: list[Any]) -> list[Any]:
    for p in params:
        if not isinstance(p, _TyperParameter):  # a plain Click parameter: no pydantic
            continue
        if not hasattr(p, "_runtime_param") or not hasattr(p, "type_descriptor"):
            raise RuntimeError(
                f"adapterctl.cli.plainparams: Typer's parameter {p.name!r} has no "
                "_runtime_param/type_descriptor (its internals changed)"
            )
        if p._runtime_param is None and is_fast(p):
            desc = p.type_descriptor
            p._runtime_param = _PlainParam(
                parameter_info=desc.parameter_info, annotation=desc.annotation
            )
    return params


check_internals()


class PlainCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _make_plain(super().get_params(ctx))


class PlainGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _make_plain(super().get_params(ctx))

    def main(self, args: Any = None, *pargs: Any, **kwargs: Any) -> Any:
        """Typer's main, with a usage error under --json as the documented JSON error object."""
        from adapterctl.cli.errors import run_with_usage_errors

        if not kwargs.get("standalone_mode", True):
            return super().main(args, *pargs, **kwargs)
        argv = list(sys.argv[1:] if args is None else args)
        kwargs["standalone_mode"] = False
        return run_with_usage_errors(
            lambda: super(PlainGroup, self).main(argv, *pargs, **kwargs), argv
        )
