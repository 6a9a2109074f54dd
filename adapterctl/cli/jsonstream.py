"""One JSON document written in pieces, the same text `json.dumps` would give for the whole.

`inspect --json` on 100k tensors is a ~15 MB document: built as one string (and its copies on the
way to the stream) it costs more memory than the report itself. Here the outer containers are
walked, long lists are encoded CHUNK items at a time, and a generator stands for a list whose
items are made as they are written (so the report's 100k tensor dicts never exist all at once).
Nothing here writes: output.py does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from types import GeneratorType
from typing import Any

#: items encoded at once in a long list
CHUNK = 2000
#: lists up to this long are walked item by item; longer ones are encoded CHUNK items at a time
_FEW = 64
#: containers this deep are walked; deeper values are encoded whole
_WALK_DEPTH = 3


def json_pieces(obj: Any, indent: int | None, encode: Callable[[Any], str]) -> Iterator[str]:
    """The text of `obj` in pieces; `encode(value)` gives one value's JSON (json.dumps' layout
    for `indent`, at depth 0). Lists, tuples and generators are arrays, as json.dumps writes them."""
    yield from _pieces(obj, indent, encode, 0)


def _pieces(
    obj: Any, indent: int | None, encode: Callable[[Any], str], depth: int
) -> Iterator[str]:
    walk = depth < _WALK_DEPTH
    if isinstance(obj, dict) and walk and obj and all(type(k) is str for k in obj):
        yield from _container(list(obj.items()), True, indent, encode, depth)
    elif isinstance(obj, GeneratorType) or (isinstance(obj, list | tuple) and walk and obj):
        yield from _container(obj, False, indent, encode, depth)
    else:
        yield _at(encode(obj), indent, depth)


def _at(text: str, indent: int | None, depth: int) -> str:
    """A value's text, indented for `depth` (JSON text has no raw newline inside a string)."""
    if indent is None or depth == 0 or "\n" not in text:
        return text
    return text.replace("\n", "\n" + " " * (indent * depth))


def _container(
    items: Any, is_dict: bool, indent: int | None, encode: Callable[[Any], str], depth: int
) -> Iterator[str]:
    open_, close = ("{", "}") if is_dict else ("[", "]")
    if indent is None:
        sep, first, last = ", ", open_, close
    else:
        inner = "\n" + " " * (indent * (depth + 1))
        sep, first, last = "," + inner, open_ + inner, "\n" + " " * (indent * depth) + close
    started = False
    if is_dict:
        for key, value in items:
            yield (sep if started else first) + encode(key) + ": "
            started = True
            yield from _pieces(value, indent, encode, depth + 1)
    elif not isinstance(items, GeneratorType) and len(items) <= _FEW:
        for value in items:  # a short list (of adapters, say) is walked item by item
            yield sep if started else first
            started = True
            yield from _pieces(value, indent, encode, depth + 1)
    else:
        it = iter(items)
        while chunk := list(islice(it, CHUNK)):
            text = encode(chunk)  # "[a, b, c]": the items with json.dumps' own separators
            body = text[1:-1] if indent is None else text[2 + indent : -2]
            yield (sep if started else first) + _at(body, indent, depth)
            started = True
    yield last if started else open_ + close
