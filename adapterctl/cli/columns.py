"""Plain-text layout for a terminal width: tables, middle-shortened names, wrapped lines.

Nothing here writes: output.py turns these lines into output. Every cell is put in the form
the terminal will show (safe.visible, then the stream's encoding fallback safe.for_stream) before
it is measured, in terminal columns (East Asian wide characters count 2), so an escaped control
character or a CJK name costs its real width.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
import textwrap
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TextIO

from adapterctl.cli.safe import for_stream, visible

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


def cells(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide and fullwidth characters count 2,
    combining marks 0, everything else 1 (text already made visible)."""
    if text.isascii():
        return len(text)
    return sum(_char_cells(ch) for ch in text)


def _char_cells(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _head(text: str, room: int) -> str:
    """The longest start of `text` that fits in `room` columns."""
    used = 0
    for i, ch in enumerate(text):
        used += _char_cells(ch)
        if used > room:
            return text[:i]
    return text


def _tail(text: str, room: int) -> str:
    """The longest end of `text` that fits in `room` columns."""
    return _head(text[::-1], room)[::-1]


def pad(text: str, w: int, justify: str = "l") -> str:
    """`text` padded with spaces to `w` columns, left ("l") or right ("r") aligned."""
    fill = " " * max(0, w - cells(text))
    return text + fill if justify == "l" else fill + text


def shown(text: str, stream: TextIO | None = None) -> str:
    """`text` as the terminal will show it: made visible, then spelled in what `stream`'s
    encoding can write (stdout by default), so that widths are measured on what is shown."""
    if _plain(text):
        return text
    return for_stream(stream or sys.stdout, visible(text))


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
    if cells(name) <= room:
        return name
    keep = room - cells(ellipsis)
    if keep <= 0:
        return _head(name, room)
    start, used = None, 0
    for i in range(len(name) - 1, -1, -1):
        if name[i] == "." and used <= keep:
            start = i + 1
        used += _char_cells(name[i])
        if used > keep:
            break
    tail = name[start:] if start is not None else _tail(name, keep)
    return _head(name, keep - cells(tail)) + ellipsis + tail


def common_prefix(names: Sequence[str]) -> str:
    """The dotted segments every one of two or more distinct `names` starts with, less the last
    of them (kept as the context of what follows: `layers.` before a layer number), dot included;
    "" when there is none or when every name would be left empty."""
    distinct = sorted(set(names))
    if len(distinct) < 2:
        return ""
    first, last = distinct[0].split("."), distinct[-1].split(".")  # sorted: these differ most
    n = 0
    while n < min(len(first), len(last)) - 1 and first[n] == last[n]:
        n += 1
    return "".join(s + "." for s in first[: n - 1]) if n > 1 else ""


def _lcp(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _next_lower(values: list[int], order: range) -> dict[int, int]:
    """For each index in `order`, the next index in `order` whose value is lower (or -1)."""
    found: dict[int, int] = {}
    stack: list[int] = []
    for j in order:
        while stack and values[j] < values[stack[-1]]:
            found[stack.pop()] = j
        stack.append(j)
    return found


def _key_segments(names: list[list[str]]) -> list[set[int]]:
    """Per name (sorted), the segments where it first differs from each of the others: keeping
    them keeps it apart from every other name. The common length with a name further away is
    the lowest one on the way, so the walk jumps from one lower value to the next."""
    adjacent = [_lcp(a, b) for a, b in itertools.pairwise(names)]
    ahead = _next_lower(adjacent, range(len(adjacent)))
    behind = _next_lower(adjacent, range(len(adjacent) - 1, -1, -1))
    keys: list[set[int]] = []
    for i, segs in enumerate(names):
        found: set[int] = set()
        for j, jumps in ((i - 1, behind), (i, ahead)):
            while 0 <= j < len(adjacent):
                found.add(min(adjacent[j], len(segs) - 1))
                j = jumps.get(j, -1)
        keys.append(found)
    return keys


def _render(segs: list[str], keep: set[int], ellipsis: str) -> str:
    out = "" if 0 in keep else ellipsis
    previous = None
    for k in sorted(keep):
        if previous is not None:
            out += "." if k == previous + 1 else ellipsis
        out += segs[k]
        previous = k
    return out


def _middle(text: str, room: int, ellipsis: str) -> str:
    """`text` in `room` columns, cut in its middle: its start and its end kept."""
    keep = room - cells(ellipsis)
    return _head(text, keep - keep // 2) + ellipsis + _tail(text, keep // 2)


def _squeeze(segs: list[str], keep: set[int], room: int, ellipsis: str) -> str:
    """The kept segments, the longest cut in the middle until they fit (none below 8 columns)."""
    segs = list(segs)
    while True:
        text = _render(segs, keep, ellipsis)
        over = cells(text) - room
        k = max(sorted(keep), key=lambda k: cells(segs[k]))
        if over <= 0 or cells(segs[k]) <= 8:
            return text
        segs[k] = _middle(segs[k], max(8, cells(segs[k]) - over), ellipsis)


def _fit_segments(segs: list[str], keys: set[int], room: int, ellipsis: str) -> str:
    """`segs` shown by the segments in `keys`, the word before each of them that is a number
    (`layers` before `11`) and the last one, then as many more as fit, from the end back and
    then from the start on."""
    last = len(segs) - 1
    keep = {*keys, last, *(k - 1 for k in keys if k > 0 and segs[k].isdigit())}
    if cells(_render(segs, keep, ellipsis)) > room:
        keep = {*keys, last}
        return _squeeze(segs, keep, room, ellipsis)
    for order in (range(last - 1, -1, -1), range(last)):
        for k in order:
            if k not in keep and cells(_render(segs, keep | {k}, ellipsis)) > room:
                break
            keep.add(k)
    return _render(segs, keep, ellipsis)


def distinct_names(names: Sequence[str], room: int, ellipsis: str = "…") -> list[str]:
    """`names` shortened in the middle to `room` columns where they can be, so that names that
    differ still differ: each keeps the segments where it parts from the others and its end.
    A name that cannot be told apart in `room` columns is shown wider, never made equal to
    another one."""
    if all(cells(n) <= room for n in names):
        return list(names)
    distinct = sorted(set(names), key=natural_key)
    split = [n.split(".") for n in distinct]
    order = sorted(range(len(split)), key=lambda i: split[i])
    keys_sorted = _key_segments([split[i] for i in order])
    keys = {order[pos]: k for pos, k in enumerate(keys_sorted)}
    short = {}
    for i, name in enumerate(distinct):
        short[name] = (
            name if cells(name) <= room else _fit_segments(split[i], keys[i], room, ellipsis)
        )
    cut = {n: shorten(s, room, ellipsis) for n, s in short.items()}
    if len(set(cut.values())) == len(cut):
        short = cut  # still all different when cut to the room: take it
    for fallback in (
        _windows(distinct, room, ellipsis),
        dict(zip(distinct, distinct, strict=True)),
    ):
        clashing = _clashes(short)
        if not clashing:
            break
        short |= {n: fallback[n] for n in clashing}  # a collision the segments did not prevent
    return [short[n] for n in names]


def _clashes(short: dict[str, str]) -> set[str]:
    """The names whose short form is another name's too."""
    seen: dict[str, list[str]] = {}
    for n, s in short.items():
        seen.setdefault(s, []).append(n)
    return {n for group in seen.values() if len(group) > 1 for n in group}


def _windows(names: list[str], room: int, ellipsis: str) -> dict[str, str]:
    """Each name in `room` columns as its start, the characters around where it first parts
    from the name nearest to it, and its end: for names that differ inside one long segment."""
    order = sorted(names)
    common = [0] * len(order)
    for i, (a, b) in enumerate(itertools.pairwise(order)):
        n = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        common[i], common[i + 1] = max(common[i], n), max(common[i + 1], n)
    return {n: _window(n, d, room, ellipsis) for n, d in zip(order, common, strict=True)}


def _window(name: str, at: int, room: int, ellipsis: str) -> str:
    if cells(name) <= room:
        return name
    budget = max(3, room - 2 * cells(ellipsis))
    left = _tail(name[:at], budget // 6)
    middle = left + _head(name[at:], budget // 2 - cells(left))
    before, after = name[: at - len(left)], name[at - len(left) + len(middle) :]
    end = _tail(after, (budget - cells(middle)) // 2)
    start = _head(before, budget - cells(middle) - cells(end))
    out = start + ("" if start == before else ellipsis) + middle
    return out + ("" if end == after else ellipsis) + end


def table_lines(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    justify: str,
    *,
    columns: int | None = None,
    name_col: int = 0,
    ellipsis: str = "…",
    stream: TextIO | None = None,
) -> Iterator[str]:
    """Aligned columns, two spaces apart; `justify` holds "l" or "r" per column. Where the lines
    would be wider than `columns`, the prefix every name of column `name_col` shares is said once
    above the table and left out of the rows, and names still too long are shortened in the
    middle (distinct_names: names that differ stay different). Each line is made as it is taken
    (a 50k-row table is not held twice)."""
    head = [shown(c, stream) for c in header]
    plain = all(_plain(" ".join(row)) for row in rows)  # every cell shown as it is, 1 col/char
    cells_: list[Sequence[str]] = (
        list(rows) if plain else [[shown(c, stream) for c in row] for row in rows]
    )
    measure = len if plain and all(map(_plain, head)) else cells
    widths = [max(map(measure, column)) for column in zip(head, *cells_, strict=True)]
    total = sum(widths) + 2 * (len(widths) - 1)
    if columns is not None and total > columns and cells_:
        names = [r[name_col] for r in cells_]
        prefix = common_prefix(names)
        if prefix:
            names = [n[len(prefix) :] for n in names]
            yield shorten(
                f"{head[name_col]}: {prefix}{ellipsis} in every row below", columns, ellipsis
            )
        others = total - widths[name_col]
        room = max(MIN_NAME, columns - others, cells(head[name_col]))
        cells_ = [
            [*r[:name_col], name, *r[name_col + 1 :]]
            for r, name in zip(cells_, distinct_names(names, room, ellipsis), strict=True)
        ]
        widths[name_col] = max(cells(r[name_col]) for r in [head, *cells_])
        measure = cells
    if measure is len:  # one format per table: "{:<12}  {:>4}..." (pads as ljust/rjust do)
        template = "  ".join(
            f"{{:{'<' if j == 'l' else '>'}{w}}}" for w, j in zip(widths, justify, strict=True)
        )
        yield template.format(*head).rstrip()
        for row in cells_:
            yield template.format(*row).rstrip()
        return
    for row in [head, *cells_]:
        parts = [pad(c, w, j) for c, w, j in zip(row, widths, justify, strict=True)]
        yield "  ".join(parts).rstrip()


def _plain(text: str) -> bool:
    """Shown as it is, one column a character: printable ASCII (`shown` is the identity)."""
    return text.isascii() and text.isprintable()


def wrap(text: str, columns: int | None, indent: int = 2, first: str = "") -> list[str]:
    """`first` + `text` (made visible) broken at spaces to `columns`, continuation lines
    indented; one line when there is no width. Words are never split."""
    line = first + shown(text)
    if columns is None or cells(line) <= columns:
        return [line]
    return textwrap.wrap(
        line,
        max(columns, indent + 20),
        subsequent_indent=" " * indent,
        break_long_words=False,
        break_on_hyphens=False,
    )
