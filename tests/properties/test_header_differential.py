"""Differential test: our safetensors header reader against safetensors' own `deserialize`.

Whole files (u64 header length + header JSON + data) are built from a JSON model that can spell
what `json.dumps` cannot: repeated keys, raw tokens (`NaN`, `-0`, `1e400`, `"\\ud800"`) and any
whitespace. Most inputs start valid and get one targeted mutation. The reader must accept exactly
when safetensors accepts and then report the same tensors, with one documented exception: a key
repeated anywhere in the JSON is always rejected by us (safetensors tolerates an identical repeat of
a tensor entry), so for those inputs we only check that we reject.

The corner cases this test first found (`-0` as a size, lone surrogates, nesting past serde_json's
limit, numbers outside f64's range, all in fields safetensors otherwise ignores) are fixed in the
reader and are now mutations like any other (EDGE_CASES), plus fixed examples at the bottom.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from adapterctl.errors import AdapterFormatError
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.header import read_header, read_header_from

# --- a JSON model that can hold repeated keys and raw tokens ---------------------------------------


@dataclass
class Obj:
    """A JSON object as (key, value) pairs, so that keys can repeat. Keys are str or Raw."""

    pairs: list[tuple[Any, Any]]


@dataclass(frozen=True)
class Raw:
    """A JSON token written exactly as given: `NaN`, `-0`, `1e400`, `"\\ud800"`."""

    text: str


@dataclass(frozen=True)
class Style:
    comma: str  # whitespace after each `,`
    colon: str  # whitespace around each `:`
    inner: str  # whitespace just inside brackets and braces
    lead: str  # before the JSON
    pad: str  # after the JSON (safetensors itself pads with spaces)
    ascii: bool  # escape every non-ASCII character (non-BMP ones as surrogate pairs)


def emit(v: Any, s: Style) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Obj):
        items = [f"{emit(k, s)}{s.colon}:{s.colon}{emit(x, s)}" for k, x in v.pairs]
        return "{" + s.inner + ("," + s.comma).join(items) + s.inner + "}"
    if isinstance(v, list):
        return "[" + s.inner + ("," + s.comma).join(emit(x, s) for x in v) + s.inner + "]"
    return json.dumps(v, ensure_ascii=s.ascii)


def get(o: Obj, key: str) -> Any:
    return next(v for k, v in o.pairs if k == key)


def put(o: Obj, key: str, value: Any) -> None:
    for i, (k, _) in enumerate(o.pairs):
        if k == key:
            o.pairs[i] = (k, value)
            return
    o.pairs.append((key, value))


def drop(o: Obj, key: str) -> None:
    o.pairs = [(k, v) for k, v in o.pairs if k != key]


def escaped(s: str) -> Raw:
    """`s` as a JSON string with every character written as a \\u escape (surrogate pairs too)."""
    units = s.encode("utf-16-le")
    return Raw(
        '"' + "".join(f"\\u{units[i + 1]:02x}{units[i]:02x}" for i in range(0, len(units), 2)) + '"'
    )


# --- strategies ------------------------------------------------------------------------------------

CODES = sorted(DTYPES)
FIELDS = ("dtype", "shape", "data_offsets")
WS = st.text(alphabet=" \t\n\r", max_size=3)
STYLES = st.builds(
    Style,
    comma=WS,
    colon=WS,
    inner=WS,
    lead=WS,
    pad=st.text(alphabet=" \t\n\r", max_size=9),
    ascii=st.booleans(),
)
# Any text except surrogates (the default alphabet): unicode, control characters, empty names.
NAMES = st.text(max_size=10).filter(lambda s: s != "__metadata__")
SHAPES = st.lists(st.integers(0, 4), max_size=3) | st.lists(st.integers(0, 40), max_size=1)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)


KEYS = st.text(max_size=5)


def objects(values: st.SearchStrategy[Any], keys: st.SearchStrategy[str] = KEYS):
    return st.lists(st.tuples(keys, values), max_size=3, unique_by=lambda p: p[0]).map(Obj)


JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | objects(c), max_leaves=6)
ABSENT = object()
METADATA = st.sampled_from([ABSENT, None]) | objects(st.text(max_size=8), st.text(max_size=6))
# Shapes whose element count (or count * bits) overflows u64 when folded from the left, as
# safetensors does. A zero after the overflow is what makes it observable: the exact product is 0.
OVERFLOWING = [
    [2**32, 2**32],
    [2**32, 2**31],
    [2**31, 2**31, 2],
    [2**63, 2],
    [2**62, 4],
    [2**40, 2**40],
    [2**64 - 1, 2**64 - 1],
    [2**64 - 1, 2],
    [2**61],
    [2**60],
    [2**64 - 1],
    [2**31, 2**31],
]


@st.composite
def overflow_shapes(draw) -> list[int]:
    shape = list(draw(st.sampled_from(OVERFLOWING)))
    where = draw(st.integers(-1, len(shape)))  # -1: no zero dim
    if where >= 0:
        shape.insert(where, 0)
    return shape


BAD_INTS = st.sampled_from(
    [
        -1,
        -(2**63),
        2**63,
        2**64 - 1,
        2**64,
        2**64 + 1,
        2**70,
        1.0,
        0.5,
        True,
        False,
        None,
        "4",
        [],
        Raw("1e0"),
        Raw("4.0"),
        Raw("0e0"),
        Raw("1E2"),
        Raw("1" + "0" * 30),
        Raw("-1" + "0" * 30),
        Raw("01"),
        Raw("+1"),
        Raw("0x10"),
        Raw(".5"),
    ]
) | st.integers(-(2**70), 2**70)
NON_FINITE = st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("-NaN")])
# Lone or reversed surrogate escapes (invalid as UTF-8) and one valid pair.
LONE_SURROGATES = [
    Raw('"\\ud800"'),
    Raw('"x\\udfff"'),
    Raw('"\\udc00\\ud800"'),
    Raw('"\\ud800\\u0041"'),
    Raw('"\\uDBFF"'),
]
SURROGATES = st.sampled_from([*LONE_SURROGATES, Raw('"\\ud83d\\ude00"')])
BAD_UTF8 = st.sampled_from(
    [b"\xff", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"]
)
# Replacement bytes for a random byte edit. `-` is left out on purpose: turning `10` into `-0` hits
# known disagreement K1, which is pinned separately below.
EDIT_BYTES = st.sampled_from(list(b'{}[]":, 0123456789aeEF.\\\t\x00\x7f\xff'))


@dataclass
class Draft:
    tensors: list[tuple[Any, Any]]  # (name, entry) in header order
    meta: Any  # ABSENT, None, Obj or anything else
    data: bytes
    top: Any = ABSENT  # replaces the whole header when set
    edit_raw: Callable[[bytes], bytes] | None = None
    edit_length: Callable[[int], int] | None = None
    edit_file: Callable[[bytes], bytes] | None = None
    extra_pairs: list[tuple[Any, Any]] = field(default_factory=list)  # appended at top level

    def entries(self) -> list[Obj]:
        return [e for _, e in self.tensors if isinstance(e, Obj)]

    def end(self) -> int:
        return len(self.data)


def nbytes(code: str, shape: list[int]) -> int:
    bits = DTYPES[code].bits * math.prod(shape)
    assert bits % 8 == 0
    return bits // 8


@st.composite
def tensor_sets(draw, min_size: int = 0) -> tuple[list[tuple[Any, Any]], bytes]:
    """Valid tensor entries with contiguous offsets, in a random data order and key order."""
    names = draw(st.lists(NAMES, min_size=min_size, max_size=5, unique=True))
    specs = []
    for name in names:
        code = draw(st.sampled_from(CODES))
        shape = draw(SHAPES)
        if DTYPES[code].bits * math.prod(shape) % 8:  # keep F4/F6 byte-aligned here
            shape = [*shape, 4]
        specs.append((name, code, shape))
    offsets: list[list[int]] = [[] for _ in specs]
    pos = 0
    for i in draw(st.permutations(range(len(specs)))):
        size = nbytes(specs[i][1], specs[i][2])
        offsets[i] = [pos, pos + size]
        pos += size
    tensors = []
    for (name, code, shape), off in zip(specs, offsets, strict=True):
        fields: list[tuple[Any, Any]] = [("dtype", code), ("shape", shape), ("data_offsets", off)]
        if draw(st.integers(0, 3)) == 0:  # an extra field, which safetensors ignores
            key = fresh(draw(st.text(max_size=6)), FIELDS)
            fields.append((key, draw(JSON_VALUES)))
        tensors.append((name, Obj(draw(st.permutations(fields)))))
    return tensors, bytes(i % 251 for i in range(pos))


def _pick(draw, items: list[Any]) -> Any:
    return items[draw(st.integers(0, len(items) - 1))]


def fresh(key: str, taken: Any) -> str:
    """`key`, made unique among `taken` (instead of a filter, which can give up)."""
    while key in taken or key == "__metadata__":
        key += "_"
    return key


def _fresh_name(draw, d: Draft) -> str:
    return fresh(draw(NAMES), {n for n, _ in d.tensors})


def _int_slot(draw, d: Draft) -> tuple[list[Any], int]:
    """A list holding an integer of some tensor entry (a shape dim or an offset) and its index."""
    e = _pick(draw, d.entries())
    shape, offsets = get(e, "shape"), get(e, "data_offsets")
    if shape and draw(st.booleans()):
        return shape, draw(st.integers(0, len(shape) - 1))
    return offsets, draw(st.integers(0, 1))


# --- mutations: each edits a Draft built from a valid header --------------------------------------


def m_gap(draw, d: Draft) -> None:
    start = get(_pick(draw, d.entries()), "data_offsets")[0]
    k = draw(st.integers(1, 16))
    for e in d.entries():
        off = get(e, "data_offsets")
        if off[0] >= start:
            off[0] += k
            off[1] += k
    d.data += bytes(k)


def m_overlap(draw, d: Draft) -> None:
    off = get(_pick(draw, d.entries()), "data_offsets")
    if off[0] == 0:
        off[1] += draw(st.integers(1, 8))  # longer than its shape needs: runs into the next one
        return
    k = draw(st.integers(1, off[0]))
    off[0] -= k
    if draw(st.booleans()):
        off[1] -= k


def m_reversed(draw, d: Draft) -> None:
    off = get(_pick(draw, d.entries()), "data_offsets")
    off.reverse()


def m_past_end(draw, d: Draft) -> None:
    k = draw(st.integers(1, 16))
    if d.data and draw(st.booleans()):
        d.data = d.data[: -min(k, len(d.data))]
        return
    last = max(d.entries(), key=lambda e: get(e, "data_offsets"))
    get(last, "data_offsets")[1] += k


def m_trailing(draw, d: Draft) -> None:
    d.data += draw(st.binary(min_size=1, max_size=9))


def m_reshape(draw, d: Draft) -> None:
    put(_pick(draw, d.entries()), "shape", draw(SHAPES))


def m_dtype(draw, d: Draft) -> None:
    bad = st.one_of(
        st.sampled_from([c.lower() for c in CODES]),
        st.sampled_from(CODES),  # a real code, usually with the wrong byte count
        st.sampled_from(
            ["F32 ", " F32", "float32", "BF16\u0000", "", "Q4", "F8", "F8_E4M3FN", "U4"]
        ),
        st.text(max_size=6),
        SCALARS,
        st.lists(st.sampled_from(CODES), max_size=2),
    )
    put(_pick(draw, d.entries()), "dtype", draw(bad))


def m_bad_int(draw, d: Draft) -> None:
    slot, i = _int_slot(draw, d)
    slot[i] = draw(BAD_INTS)


def m_retyped(draw, d: Draft) -> None:
    """A shape dim or offset with its right value in the wrong type: 4.0, 4e0, "4", true, [4]."""
    slot, i = _int_slot(draw, d)
    if draw(st.booleans()):  # make sure 0 and 1 (which JSON can also spell false/true) come up
        e = _pick(draw, d.entries())
        slot, i = get(e, "data_offsets"), 0
        if get(e, "shape") and draw(st.booleans()):
            slot = get(e, "shape")
            slot.insert(0, 1)
            if draw(st.booleans()):
                slot[0] = True
                return
    v = slot[i]
    spellings = [float(v), Raw(f"{v}.0"), Raw(f"{v}e0"), Raw(f"{v}E+0"), str(v), [v], Obj([])]
    if v in (0, 1):
        spellings.append(bool(v))
    slot[i] = draw(st.sampled_from(spellings))


def m_overflow(draw, d: Draft) -> None:
    """A zero-byte tensor at the end whose shape may overflow u64 in safetensors' arithmetic."""
    entry = Obj(
        [
            ("dtype", draw(st.sampled_from(CODES))),
            ("shape", draw(overflow_shapes())),
            ("data_offsets", [d.end(), d.end()]),
        ]
    )
    d.tensors.append((_fresh_name(draw, d), entry))


def m_misaligned(draw, d: Draft) -> None:
    """A sub-byte tensor at the end, often with an element count that does not fill its bytes."""
    code = draw(st.sampled_from(["F4", "F6_E2M3", "F6_E3M2"]))
    shape = draw(st.lists(st.integers(0, 5), max_size=2))
    k = draw(st.integers(0, 4))
    entry = Obj([("dtype", code), ("shape", shape), ("data_offsets", [d.end(), d.end() + k])])
    d.tensors.append((_fresh_name(draw, d), entry))
    d.data += bytes(k)


def m_not_object(draw, d: Draft) -> None:
    d.top = draw(st.lists(JSON_VALUES, max_size=3) | SCALARS | st.just(Raw("")))


def m_entry_not_object(draw, d: Draft) -> None:
    i = draw(st.integers(0, len(d.tensors) - 1))
    d.tensors[i] = (d.tensors[i][0], draw(st.lists(JSON_VALUES, max_size=3) | SCALARS))


def m_bad_metadata(draw, d: Draft) -> None:
    base = draw(objects(st.text(max_size=4), st.text(max_size=4)))
    bad_value = draw(
        st.integers()
        | st.none()
        | st.booleans()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.lists(st.text(max_size=2), max_size=2)
    )
    choice = draw(st.integers(0, 3))
    if choice == 0:  # one value that is not a string
        base.pairs.append((fresh(draw(st.text(max_size=4)), [k for k, _ in base.pairs]), bad_value))
        d.meta = base
    elif choice == 1:  # not an object at all
        d.meta = draw(
            st.lists(st.text(max_size=3), max_size=2)
            | st.integers()
            | st.text(max_size=3)
            | st.booleans()
        )
    elif choice == 2:  # a nested object as a value
        base.pairs.append(("\u0000nested", Obj([("k", "v")])))
        d.meta = base
    else:  # the key spelled in upper case is just a tensor name, and this is no tensor entry
        d.extra_pairs.append(("__METADATA__", base))


def m_missing_field(draw, d: Draft) -> None:
    drop(_pick(draw, d.entries()), draw(st.sampled_from(FIELDS)))


def m_field_type(draw, d: Draft) -> None:
    e = _pick(draw, d.entries())
    s, t = get(e, "data_offsets")
    if draw(st.booleans()):
        bad = draw(
            st.sampled_from(
                [[s], [s, t, t], [], None, f"{s},{t}", Obj([("0", s), ("1", t)]), [[s, t]]]
            )
        )
        put(e, "data_offsets", bad)
    else:
        shape = get(e, "shape")
        put(
            e, "shape", draw(st.sampled_from([None, 3, "3", Obj([]), [shape], [[]], [*shape, 0.0]]))
        )


def m_extra_field(draw, d: Draft) -> None:
    e = _pick(draw, d.entries())
    keys = [k for k, _ in e.pairs]
    key = fresh(draw(st.text(max_size=6)), keys)
    e.pairs.insert(draw(st.integers(0, len(e.pairs))), (key, draw(JSON_VALUES)))


def m_escapes(draw, d: Draft) -> None:
    """Names, dtypes and metadata written with \\u escapes, some of them lone surrogates."""
    where = draw(st.integers(0, 3))
    if where == 0:  # a tensor name fully escaped (valid)
        i = draw(st.integers(0, len(d.tensors) - 1))
        d.tensors[i] = (escaped(d.tensors[i][0]), d.tensors[i][1])
    elif where == 1:  # the dtype fully escaped (valid)
        e = _pick(draw, d.entries())
        put(e, "dtype", escaped(get(e, "dtype")))
    elif where == 2:  # a tensor name with surrogate escapes
        i = draw(st.integers(0, len(d.tensors) - 1))
        d.tensors[i] = (draw(SURROGATES), d.tensors[i][1])
    else:  # a metadata key or value with surrogate escapes
        meta = d.meta if isinstance(d.meta, Obj) else Obj([])
        if draw(st.booleans()):
            meta.pairs.append((draw(SURROGATES), "v"))
        else:
            meta.pairs.append(("\u0001k", draw(SURROGATES)))
        d.meta = meta


def m_non_finite(draw, d: Draft) -> None:
    where = draw(st.integers(0, 2))
    if where == 0:
        slot, i = _int_slot(draw, d)
        slot[i] = draw(NON_FINITE)
    elif where == 1:
        e = _pick(draw, d.entries())
        keys = [k for k, _ in e.pairs]
        e.pairs.append((fresh(draw(st.text(max_size=4)), keys), draw(NON_FINITE)))
    else:
        d.meta = Obj([("k", draw(NON_FINITE))])


def m_repeated_key(draw, d: Draft) -> None:
    """A key repeated at some level; we must reject (safetensors sometimes accepts)."""
    where = draw(st.integers(0, 5))
    if where == 0:  # an identical repeat of a tensor entry
        name, entry = _pick(draw, d.tensors)
        d.tensors.insert(draw(st.integers(0, len(d.tensors))), (name, entry))
    elif where == 1:  # the same tensor name with another entry
        name, _ = _pick(draw, d.tensors)
        other = Obj([("dtype", "U8"), ("shape", [0]), ("data_offsets", [d.end(), d.end()])])
        d.tensors.append((name, other))
    elif where == 2:  # a field repeated inside an entry, same or different value
        e = _pick(draw, d.entries())
        k, v = _pick(draw, e.pairs)
        e.pairs.insert(draw(st.integers(0, len(e.pairs))), (k, v if draw(st.booleans()) else [0]))
    elif where == 3:  # a metadata key repeated
        d.meta = Obj([("k", "v"), ("k", draw(st.sampled_from(["v", "w"])))])
    elif where == 4:  # __metadata__ itself twice
        d.meta = Obj([("k", "v")])
        d.extra_pairs.append(("__metadata__", draw(st.none() | st.just(Obj([("k", "v")])))))
    else:  # inside an ignored extra field
        e = _pick(draw, d.entries())
        e.pairs.append(("\u00e9xtra", Obj([("a", 1), ("b", 2), ("a", draw(st.integers(1, 2)))])))


def m_invalid_utf8(draw, d: Draft) -> None:
    seq = draw(BAD_UTF8)
    frac = draw(st.floats(0, 1))

    def edit(raw: bytes) -> bytes:
        quotes = [i + 1 for i, b in enumerate(raw) if b == ord('"')] or [0]
        at = quotes[min(int(frac * len(quotes)), len(quotes) - 1)]  # just inside some string
        return raw[:at] + seq + raw[at:]

    d.edit_raw = edit


def m_json_edit(draw, d: Draft) -> None:
    how = draw(st.integers(0, 2))
    suffix = draw(st.sampled_from([b"x", b"}", b",", b"{}", b"\x00", b"\x0c", b"\xc2\xa0", b"0"]))
    k = draw(st.integers(1, 8))
    frac = draw(st.floats(0, 1))
    byte = draw(EDIT_BYTES)

    def edit(raw: bytes) -> bytes:
        if how == 0:
            return raw.rstrip() + suffix + raw[len(raw.rstrip()) :]
        if how == 1:
            return raw[: max(0, len(raw) - k)]
        at = min(int(frac * len(raw)), len(raw) - 1)
        return raw[:at] + bytes([byte]) + raw[at + 1 :] if raw else raw

    d.edit_raw = edit


def m_header_length(draw, d: Draft) -> None:
    k = draw(st.integers(1, 24))
    how = draw(st.integers(0, 2))
    huge = draw(st.sampled_from([2**64 - 1, 2**63, 2**32, 100_000_000, 100_000_001]))
    whole = draw(st.booleans())
    if how == 0:  # runs past the end, or swallows the data (which is then no JSON)
        d.edit_length = (lambda n: n + len(d.data)) if whole and d.data else (lambda n: n + k)
    elif how == 1:  # too short: the JSON is cut and the rest counts as data
        d.edit_length = lambda n: max(0, n - k)
    else:
        d.edit_length = lambda n: huge


def m_short_file(draw, d: Draft) -> None:
    k = draw(st.integers(0, 7))
    d.edit_file = lambda blob: blob[:k]


MUTATIONS: dict[str, Callable[[Any, Draft], None]] = {
    "gap": m_gap,
    "overlap": m_overlap,
    "reversed offsets": m_reversed,
    "past end": m_past_end,
    "trailing bytes": m_trailing,
    "reshape": m_reshape,
    "bad dtype": m_dtype,
    "bad int": m_bad_int,
    "retyped int": m_retyped,
    "shape overflow": m_overflow,
    "misaligned sub-byte": m_misaligned,
    "not an object": m_not_object,
    "entry not an object": m_entry_not_object,
    "bad metadata": m_bad_metadata,
    "missing field": m_missing_field,
    "field type": m_field_type,
    "extra field": m_extra_field,
    "escapes": m_escapes,
    "non-finite": m_non_finite,
    "repeated key": m_repeated_key,
    "invalid utf-8": m_invalid_utf8,
    "json edit": m_json_edit,
    "header length": m_header_length,
    "short file": m_short_file,
}
NEEDS_NO_TENSOR = {
    "not an object",
    "trailing bytes",
    "header length",
    "short file",
    "shape overflow",
    "misaligned sub-byte",
    "bad metadata",
    "json edit",
    "invalid utf-8",
}


# --- known disagreements: we accept, safetensors 0.8.0 rejects -------------------------------------


def k_negative_zero(draw, d: Draft) -> None:
    """K1: `-0` as a shape dim or offset (serde_json reads it as the float -0.0)."""
    zero_dims = [
        (s, i) for e in d.entries() for s in [get(e, "shape")] for i, v in enumerate(s) if v == 0
    ]
    if zero_dims and draw(st.booleans()):
        slot, i = _pick(draw, zero_dims)
    else:
        slot, i = min(get(e, "data_offsets") for e in d.entries()), 0
    slot[i] = Raw("-0")


def k_surrogate_in_extra(draw, d: Draft) -> None:
    """K2: a lone surrogate escape inside an extra (ignored) field of a tensor entry."""
    bad = draw(st.sampled_from(LONE_SURROGATES))
    value = draw(st.sampled_from([bad, ["a", bad], Obj([(bad, 1)]), Obj([("k", [bad])])]))
    e = _pick(draw, d.entries())
    e.pairs.append(("\u00e9xtra", value))


def k_deep_extra(draw, d: Draft) -> None:
    """K3: an extra field nested so deep that the header's depth reaches serde_json's 128."""
    depth = draw(st.integers(126, 400))
    value = (
        Raw("[" * depth + "]" * depth)
        if draw(st.booleans())
        else Raw('{"a":' * depth + "0" + "}" * depth)
    )
    _pick(draw, d.entries()).pairs.append(("\u00e9xtra", value))


def k_huge_number_in_extra(draw, d: Draft) -> None:
    """K4: an extra-field number outside f64's range (`1e400`, a 310-digit integer)."""
    value = draw(
        st.sampled_from(["1e400", "-1e400", "1.8e308", "1e309", "1" + "0" * 309, "-" + "9" * 400])
    )
    _pick(draw, d.entries()).pairs.append(("\u00e9xtra", Raw(value)))


EDGE_CASES: dict[str, Callable[[Any, Draft], None]] = {
    "K1 -0 integer": k_negative_zero,
    "K2 surrogate in extra field": k_surrogate_in_extra,
    "K3 deep extra field": k_deep_extra,
    "K4 huge number in extra field": k_huge_number_in_extra,
}


@st.composite
def files(draw, mutations: dict[str, Callable[[Any, Draft], None]]) -> tuple[str, bytes]:
    """(what was done, whole file bytes): a valid file with one of `mutations` applied, if any."""
    kind = draw(st.sampled_from(sorted(mutations))) if mutations else "valid"
    needs_tensor = kind != "valid" and kind not in NEEDS_NO_TENSOR
    tensors, data = draw(tensor_sets(min_size=1 if needs_tensor else 0))
    d = Draft(tensors, draw(METADATA), data)
    if kind != "valid":
        mutations[kind](draw, d)
    style = draw(STYLES)
    if d.top is ABSENT:
        pairs = list(d.tensors)
        if d.meta is not ABSENT:
            pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", d.meta))
        for p in d.extra_pairs:
            pairs.insert(draw(st.integers(0, len(pairs))), p)
        d.top = Obj(pairs)
    raw = (style.lead + emit(d.top, style) + style.pad).encode("utf-8")
    if d.edit_raw:
        raw = d.edit_raw(raw)
    n = d.edit_length(len(raw)) if d.edit_length else len(raw)
    blob = struct.pack("<Q", n) + raw + d.data
    if d.edit_file:
        blob = d.edit_file(blob)
    return kind, blob


# --- the two readers -------------------------------------------------------------------------------

Tensors = dict[str, tuple[str, list[int], bytes]]


def theirs(blob: bytes) -> Tensors | None:
    try:
        out = safetensors.deserialize(blob)
    except safetensors.SafetensorError:
        return None
    return {name: (info["dtype"], list(info["shape"]), bytes(info["data"])) for name, info in out}


def ours(blob: bytes) -> Tensors | None:
    try:
        h = read_header_from(io.BytesIO(blob), len(blob), "mem.safetensors")
    except AdapterFormatError:
        return None
    assert h.data_start + h.data_size == len(blob)
    return {
        t.name: (t.dtype.code, list(t.shape), blob[h.data_start + t.start : h.data_start + t.end])
        for t in h.tensors.values()
    }


def has_repeated_key(blob: bytes) -> bool:
    """Whether the header is JSON (per Python) with some key repeated in some object."""
    if len(blob) < 8:
        return False
    raw = blob[8 : 8 + int.from_bytes(blob[:8], "little")]
    repeated = False

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        keys = [k for k, _ in pairs]
        repeated = repeated or len(set(keys)) != len(keys)
        return dict(pairs)

    try:
        json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return False
    return repeated


def check_agreement(kind: str, blob: bytes) -> Tensors | None:
    event(kind)
    note(f"{kind}: {blob[:600]!r}")
    got = ours(blob)
    if has_repeated_key(blob):
        event("repeated key: we reject, not compared")
        assert got is None, "a header with a repeated key must be rejected"
        return None
    expected = theirs(blob)
    event("accepted" if expected is not None else "rejected")
    if expected is None:
        assert got is None, f"we accept what safetensors rejects: {got}"
    else:
        assert got is not None, "we reject what safetensors accepts"
        assert got == expected
    return got


# --- tests -----------------------------------------------------------------------------------------


# Each mutation gets its own share of examples (one random kind per example covers them unevenly).
PER_KIND = settings(max_examples=max(10, settings.default.max_examples // 4))


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
@PER_KIND
@given(data=st.data())
def test_reader_agrees_with_safetensors(kind: str, data: st.DataObject) -> None:
    check_agreement(*data.draw(files({kind: MUTATIONS[kind]}), label="file"))


@given(case=files({}))
def test_valid_headers_are_accepted_by_both(case: tuple[str, bytes]) -> None:
    _, blob = case
    assert theirs(blob) is not None  # the generator itself is right
    assert check_agreement("valid", blob) is not None


@settings(max_examples=30)
@given(case=files(MUTATIONS))
def test_read_header_on_a_file(
    case: tuple[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`read_header` on a real file: same verdict, and AdapterFormatError (naming it) on reject."""
    _, blob = case
    path: Path = tmp_path_factory.mktemp("hdr") / "adapter_model.safetensors"
    path.write_bytes(blob)
    in_memory = ours(blob)
    error: AdapterFormatError | None = None
    try:
        h = read_header(path)
    except AdapterFormatError as e:  # anything else fails the test
        error = e
    if error is not None:
        assert in_memory is None
        assert str(path) in error.message
        return
    assert in_memory is not None
    assert {t.name: (t.dtype.code, list(t.shape)) for t in h.tensors.values()} == {
        k: v[:2] for k, v in in_memory.items()
    }


@pytest.mark.parametrize(
    ("header", "data"),
    [
        (
            '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
            b"",
        ),
        ('{"__metadata__":{"k":"v","k":"v"}}', b""),
        ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":{"k":1,"k":1}}}', b""),
    ],
    ids=["identical tensor entry", "metadata key", "inside extra field"],
)
def test_repeated_keys_rejected_where_safetensors_accepts(header: str, data: bytes) -> None:
    """The one deliberate difference, pinned on inputs safetensors accepts."""
    raw = header.encode()
    blob = struct.pack("<Q", len(raw)) + raw + data
    assert theirs(blob) is not None
    assert ours(blob) is None


_EDGE_EXAMPLES = {
    "-0 in shape": '{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}',
    "-0 in offsets": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[-0,0]}}',
    "lone surrogate in extra value": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":"\\ud800"}}',
    "lone surrogate in extra key": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":{"\\udc00":1}}}',
    "depth 128": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":'
    + "[" * 126
    + "]" * 126
    + "}}",
    "1e400": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":1e400}}',
    "310-digit integer": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":1'
    + "0" * 309
    + "}}",
}
_EDGE_ACCEPTED = {
    "-0 in an extra field": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":-0}}',
    "depth 127": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":'
    + "[" * 125
    + "]" * 125
    + "}}",
    "21-digit integer in an extra field": '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":1'
    + "0" * 20
    + "}}",
}


def _blob(header: str) -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("header", list(_EDGE_EXAMPLES.values()), ids=list(_EDGE_EXAMPLES))
def test_edge_cases_rejected_by_both(header: str) -> None:
    assert theirs(_blob(header)) is None
    assert ours(_blob(header)) is None


@pytest.mark.parametrize("header", list(_EDGE_ACCEPTED.values()), ids=list(_EDGE_ACCEPTED))
def test_edge_cases_accepted_by_both(header: str) -> None:
    assert theirs(_blob(header)) is not None
    assert ours(_blob(header)) == theirs(_blob(header))


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
@PER_KIND
@given(data=st.data())
def test_edge_case_families_agree(name: str, data: st.DataObject) -> None:
    check_agreement(*data.draw(files({name: EDGE_CASES[name]}), label="file"))
