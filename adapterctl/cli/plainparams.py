"""Direct coercion for plain parameters, so that running a command never imports pydantic.

Typer 0.29 converts every parameter value (even the `--help` flag, whose value is None when it is
not given) through a pydantic TypeAdapter; importing pydantic and building the adapters costs
about 0.18 s per run, half of `adapterctl inspect --json`. Our parameters are all plain (`bool`,
`str`, `int`, `float`, `Path`, lists of `str`, or one of those or None), and for those Typer's own
result is simply the value, `int(value)`, `float(value)`, `Path(value)` or `list(value)`. The command and group classes below give such parameters that direct
conversion; any other type, or a Typer whose internals differ, keeps Typer's own coercion.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from typer import BadParameter
from typer.core import TyperCommand, TyperGroup

try:  # Typer 0.29 internals; without them, Typer's own coercion is used
    from typer._coercion import RuntimeParam
except ImportError:  # pragma: no cover
    RuntimeParam = None  # type: ignore[assignment,misc]

_BASES = (bool, str, int, float, Path, list[str])


def _optional_of(annotation: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_plain(annotation: Any) -> bool:
    return any(_optional_of(annotation) == t for t in _BASES)


def _convert(annotation: Any, value: Any) -> Any:
    annotation = _optional_of(annotation)
    if value is None:
        return None
    if annotation is Path:
        return Path(value)
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


if RuntimeParam is not None:

    class _PlainParam(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            return _convert(self.annotation, value)


def _make_plain(params: list[Any]) -> list[Any]:
    if RuntimeParam is None:  # pragma: no cover
        return params
    for p in params:
        desc = getattr(p, "type_descriptor", None)
        if (
            getattr(p, "_runtime_param", "absent") is None
            and desc is not None
            and _is_plain(desc.annotation)
            and not desc.parameter_info.parser
            and getattr(desc.parameter_info, "min", None) is None  # Typer checks the bounds
            and getattr(desc.parameter_info, "max", None) is None
        ):
            p._runtime_param = _PlainParam(
                parameter_info=desc.parameter_info, annotation=desc.annotation
            )
    return params


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
