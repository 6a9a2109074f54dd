"""Plain-text layout for a terminal width: tables, middle-shortened names, wrapped lines.

Nothing here writes: output.py turns these lines into output. Every cell is made visible
(safe.visible) before it is measured, so an escaped control character costs its real width.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence

from adapterctl.cli.safe import visible

#: the narrowest a shortened name column gets, however little room the others leave
MIN_NAME = 16
_DIGITS = re.compile(r"([0-9]+)")


def width() -> int | None:
    """The columns to lay out for: COLUMNS if set, else the terminal's width; None (no limit)
    when stdout is not a terminal, so that piped output keeps full names for grep."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    try:
        if sys.stdout.isatty():
            return shutil.get_terminal_size().columns
    except (AttributeError, ValueError):  # a closed or unusual stream
        pass
    return None


def _number(digits: str) -> tuple[int, str]:
    """A run of digits as a key in numeric order, without int() (no limit on its length)."""
    digits = digits.lstrip("0") or "0"
    return len(digits), digits


def natural_key(text: str) -> tuple[str | tuple[int, str], ...]:
    """Sort key with runs of digits compared as numbers: layers 0, 1, 2, ..., 10, not 0, 1, 10."""
    parts = _DIGITS.split(text)
    return tuple(_number(p) if i % 2 else p for i, p in enumerate(parts))


def natural_keyer(*, memo: bool = True) -> Callable[[str], tuple[str | tuple[int, str], ...]]:
    """`natural_key`, with equal parts of its keys one object each (and, with `memo`, each
    text's key made once): 50k module paths hold a few distinct words and numbers, so their
    keys cost about a tuple each, not 30 MB."""
    words: dict[str, str] = {}
    numbers: dict[str, tuple[int, str]] = {}
    keys: dict[str, tuple[str | tuple[int, str], ...]] = {}

    def key(text: str) -> tuple[str | tuple[int, str], ...]:
        found = keys.get(text)
        if found is None:
            found = tuple(
                numbers.get(p) or numbers.setdefault(p, _number(p))
                if i % 2
                else words.setdefault(p, p)
                for i, p in enumerate(_DIGITS.split(text))
            )
            if memo:
                keys[text] = found
        return found

    return key


def natural_sorted(texts: Iterable[str]) -> list[str]:
    """`sorted(texts, key=natural_key)`, its keys made by one `natural_keyer`."""
    return sorted(texts, key=natural_keyer(memo=False))  # each text once: nothing to reuse


def shorten(name: str, room: int, ellipsis: str = "…") -> str:
    """`name` in at most `room` columns, shortened in the middle: the end that tells modules apart
    (`layers.10.self_attn.q_proj`) is kept whole from a dot on, and as much of the start as fits."""
    if len(name) <= room:
        return name
    keep = room - len(ellipsis)
    if keep <= 0:
        return name[:room]
    tail = ""
    for i, ch in enumerate(name):
        if ch == "." and len(name) - i - 1 <= keep:
            tail = name[i + 1 :]
            break
    if not tail:  # the last part alone is too long: keep its end
        tail = name[-keep:]
    return name[: keep - len(tail)] + ellipsis + tail


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    justify: str,
    *,
    columns: int | None = None,
    name_col: int = 0,
    ellipsis: str = "…",
) -> list[str]:
    """Aligned columns, two spaces apart; `justify` holds "l" or "r" per column. Where the lines
    would be wider than `columns`, column `name_col` is shortened in the middle to fit."""
    return list(
        table_lines(header, rows, justify, columns=columns, name_col=name_col, ellipsis=ellipsis)
    )


def table_lines(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    justify: str,
    *,
    columns: int | None = None,
    name_col: int = 0,
    ellipsis: str = "…",
) -> Iterator[str]:
    """`table`'s lines, each made as it is taken (a 50k-row table is not held twice)."""
    cells: list[Sequence[str]]
    if all(" ".join(row).isprintable() for row in rows):  # every cell shown as it is
        cells = list(rows)
    else:
        cells = [[visible(c) for c in row] for row in rows]
    widths = [max(map(len, column)) for column in zip(header, *cells, strict=True)]
    total = sum(widths) + 2 * (len(widths) - 1)
    if columns is not None and total > columns:
        room = max(MIN_NAME, widths[name_col] - (total - columns), len(header[name_col]))
        cells = [
            [*r[:name_col], shorten(r[name_col], room, ellipsis), *r[name_col + 1 :]] for r in cells
        ]
        widths[name_col] = max(len(r[name_col]) for r in [list(header), *cells])
    # one format per table: "{:<12}  {:>4}..." (str.format pads as ljust/rjust do)
    template = "  ".join(
        f"{{:{'<' if j == 'l' else '>'}{w}}}" for w, j in zip(widths, justify, strict=True)
    )
    yield template.format(*header).rstrip()
    for row in cells:
        yield template.format(*row).rstrip()


def wrap(text: str, columns: int | None, indent: int = 2, first: str = "") -> list[str]:
    """`first` + `text` (made visible) broken at spaces to `columns`, continuation lines
    indented; one line when there is no width. Words are never split."""
    line = first + visible(text)
    if columns is None or len(line) <= columns:
        return [line]
    return textwrap.wrap(
        line,
        max(columns, indent + 20),
        subsequent_indent=" " * indent,
        break_long_words=False,
        break_on_hyphens=False,
    )
