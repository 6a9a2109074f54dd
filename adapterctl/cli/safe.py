"""The one rule for untrusted text on a terminal, and what a stream's encoding can show.

Tensor names, config strings, model cards and error messages that quote them come from files that
strangers wrote. Before any of it reaches a terminal, every character that a terminal would act on
instead of showing (C0/C1 controls with ESC, CR, LF and TAB among them, DEL, bidi controls such as
U+202E, zero-width and other format characters, line/paragraph separators, unpaired surrogates
from undecodable file names) is written as a visible escape: `\\x1b`, `\\n`, `\\u202e`. The test is
Python's own `str.isprintable()` (ordinary space excepted), so it follows the Unicode database
rather than a hand-kept list. Markup is never interpreted: output.py writes plain text, and the
few rich renderables (progress bar, spinner) get `Text` objects with markup, emoji and
highlighting off.
"""

from __future__ import annotations

import re
from typing import TextIO

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# anything outside printable ASCII may need a look (the fast path skips plain ASCII text)
_SUSPECT = re.compile(r"[^\x20-\x7e]")

#: symbols we print, and what a stream that cannot encode them gets instead
SYMBOLS = {"✓": "ok", "×": "x", "…": "...", "→": "->"}


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _visible_char(match: re.Match[str]) -> str:
    ch = match.group()
    return ch if ch.isprintable() else _escape(ch)


def visible(text: str) -> str:
    """`text` with every character a terminal would interpret shown as an escape; one line."""
    if text.isascii() and text.isprintable():
        return text
    return _SUSPECT.sub(_visible_char, text)


def _json_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a JSON string spells astral characters as a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


_JSON_SUSPECT = re.compile(r"[^\x20-\x7e\n]")


def json_visible(text: str) -> str:
    """A JSON text (from `json.dumps(ensure_ascii=False)`) with the characters that `visible`
    escapes written as JSON `\\u` escapes: the same document, safe on a terminal. Outside strings
    a JSON text holds only ASCII, so every character replaced lies inside a string."""
    return _JSON_SUSPECT.sub(_json_char, text)  # in ASCII text only DEL is left to escape


def can_encode(stream: TextIO, text: str) -> bool:
    """Whether `stream`'s encoding can write `text` (a stream without one is taken as UTF-8)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def symbol(stream: TextIO, sym: str) -> str:
    """One of our SYMBOLS, or its ASCII spelling where `stream` cannot encode it."""
    return sym if can_encode(stream, sym) else SYMBOLS[sym]


def for_stream(stream: TextIO, text: str) -> str:
    """`text` as `stream` can write it: a character its encoding lacks is written as a
    backslash escape (`\\xe9`), never a crash."""
    if text.isascii() or can_encode(stream, text):
        return text
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # pragma: no cover - an encoding Python does not know
        return text.encode("ascii", "backslashreplace").decode("ascii")
