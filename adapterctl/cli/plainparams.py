"""Direct coercion for plain parameters, so that running a command never imports pydantic.

Typer 0.29 converts every parameter value (even the `--help` flag, whose value is None when it is
not given) through a pydantic TypeAdapter; importing pydantic and building the adapters costs
about 0.18 s per run, half of `adapterctl inspect --json`. Our parameters are all plain (`bool`,
`str`, `Path`, lists of `str`), and for those Typer's own result is simply the value, `Path(value)`
or `list(value)`. The command and group classes below give such parameters that direct
conversion; any other type, or a Typer whose internals differ, keeps Typer's own coercion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.core import TyperCommand, TyperGroup

try:  # Typer 0.29 internals; without them, Typer's own coercion is used
    from typer._coercion import RuntimeParam
except ImportError:  # pragma: no cover
    RuntimeParam = None  # type: ignore[assignment,misc]

_PLAIN = (bool, str, Path, list[str])


def _convert(annotation: Any, value: Any) -> Any:
    if annotation is Path:
        return Path(value)
    if annotation == list[str]:
        return [str(v) for v in value]
    if annotation is str:
        return str(value)
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
            and any(desc.annotation == t for t in _PLAIN)
            and not desc.parameter_info.parser
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
