"""Regular expressions that come from files: one bounded matcher for all of them.

A config's `target_modules` (as a string), `exclude_modules`, `modules_to_save`, `layers_pattern`
and the keys of `rank_pattern`/`alpha_pattern` are regexes written by strangers. PEFT runs them with
`re`; a pattern such as `([a-z_.0-9]+)+X` then backtracks for minutes. Here every such pattern is

- checked with `re.compile` (so exactly the patterns PEFT accepts are accepted, and a malformed
  one is a ConfigError naming the field and the pattern);
- matched with the `regex` package (the same syntax and semantics as `re` for every pattern `re`
  accepts, in its default VERSION0 mode), which takes a `timeout`. Each pattern has a budget over
  all its matches in one run (one `PatternSet`, which a LoraConfig owns): BUDGET_S seconds, plus
  PER_MATCH_S for every match made, so that a pattern that is fine on each name stays fine on a
  100k-tensor adapter, while one that backtracks on a single name, or is slow on every name, spends
  it soon. A pattern that spends it is a ConfigError naming the field, never a hang.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from typing import Any

from adapterctl.errors import ConfigError

#: seconds one pattern may spend matching in one run, beyond PER_MATCH_S for each match it makes
BUDGET_S = 0.5
#: what a plain pattern needs for one module name, many times over (they take microseconds)
PER_MATCH_S = 0.0002
#: the longest pattern accepted (PEFT users write module names and short alternations)
MAX_CHARS = 20_000
_SHOWN_CHARS = 60

#: match calls made so far in this process (tests count them: matching must stay linear)
match_calls = 0


def shown(text: str) -> str:
    """A pattern as messages show it: JSON-quoted (controls and non-ASCII escaped), cut short."""
    quoted = json.dumps(text, ensure_ascii=True)
    if len(quoted) <= _SHOWN_CHARS:
        return quoted
    return quoted[: _SHOWN_CHARS - 4] + '..."'


class Pattern:
    """One compiled untrusted regex; `match`/`fullmatch` behave as `re`'s, within the budget."""

    __slots__ = ("_compiled", "_left", "field", "label", "text")

    def __init__(self, text: str, compiled: Any, field: str, label: str) -> None:
        self.text, self.field, self.label = text, field, label
        self._compiled = compiled
        self._left = BUDGET_S

    def match(self, s: str) -> Any:
        """`re.match(pattern, s)` (a match object or None)."""
        return self._run(self._compiled.match, s)

    def fullmatch(self, s: str) -> Any:
        """`re.fullmatch(pattern, s)` (a match object or None)."""
        return self._run(self._compiled.fullmatch, s)

    def _run(self, fn: Any, s: str) -> Any:
        global match_calls
        match_calls += 1
        self._left += PER_MATCH_S
        if self._left <= 0:
            raise self._too_slow()
        start = time.perf_counter()
        try:
            return fn(s, timeout=self._left)
        except TimeoutError:
            self._left = 0.0
            raise self._too_slow() from None
        finally:
            self._left -= time.perf_counter() - start

    def _too_slow(self) -> ConfigError:
        return ConfigError(
            f"`{self.label}`: {self.field} {shown(self.text)} takes too long to match "
            "(its time budget is spent): a pattern with nested repetition can take exponential time",
            hint="simplify the pattern (PEFT itself would hang on it)",
        )


def compile_pattern(regex: str, field: str, label: str, *, source: str | None = None) -> Pattern:
    """Compile `regex` (PEFT's full pattern) for `field` of the file `label`; `source` is what
    the file holds, when PEFT wraps it (a rank_pattern key, a modules_to_save name)."""
    import regex as regex_module

    text = regex if source is None else source
    if len(regex) > MAX_CHARS:
        raise ConfigError(
            f"`{label}`: {field} {shown(text)} is {len(text)} characters long; adapterctl accepts "
            f"patterns up to {MAX_CHARS}"
        )
    try:
        with warnings.catch_warnings():  # re warns on e.g. "[[" (possible nested set)
            warnings.simplefilter("ignore")
            re.compile(regex)  # PEFT's syntax: what `re` refuses is refused
            compiled = regex_module.compile(regex, regex_module.VERSION0)
    except (re.error, regex_module.error, RecursionError, OverflowError, ValueError) as e:
        # a position counts in PEFT's wrapped regex, not in the text shown: keep only the problem
        problem = getattr(e, "msg", None) if source is not None else None
        raise ConfigError(
            f"`{label}`: {field} {shown(text)} is not a valid regular expression: {problem or e}"
        ) from None
    return Pattern(text, compiled, field, label)


class PatternSet:
    """The patterns of one config, compiled once each, each with its own budget for the run."""

    __slots__ = ("_label", "_memos", "_patterns", "_plain", "_shared")

    def __init__(self, label: str) -> None:
        self._label = label
        self._patterns: dict[tuple[str, str], Pattern] = {}
        self._memos: dict[str, dict[str, tuple[str, ...]]] = {}
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._plain: dict[str, PlainKey | None] = {}

    def plain(self, key: str) -> PlainKey | None:
        """The linear matcher for a plain rank/alpha pattern key (None: it is no plain key)."""
        if key not in self._plain:
            self._plain[key] = PlainKey(key) if PlainKey.applies(key) else None
        return self._plain[key]

    def memo(self, name: str) -> dict[str, tuple[str, ...]]:
        """A cache of results by module name, for the caller's own use (one per `name`)."""
        return self._memos.setdefault(name, {})

    def shared(self, value: tuple[str, ...]) -> tuple[str, ...]:
        """`value`, as one shared object for all equal results (a memo of 100k modules holds a
        few distinct results)."""
        return self._shared.setdefault(value, value)

    def get(self, regex: str, field: str, *, source: str | None = None) -> Pattern:
        key = (field, regex)
        found = self._patterns.get(key)
        if found is None:
            found = self._patterns[key] = compile_pattern(regex, field, self._label, source=source)
        return found


# --- the regexes PEFT builds from config fields (peft-format.md 3.1, 4.4) -----------------------


def pattern_regex(key: str) -> str:
    """rank_pattern/alpha_pattern key -> PEFT's regex: a dot-aligned suffix match (`re.match`)."""
    return r"(.*\.)?(" + key + r")$"


#: a key made of single characters only (letters, digits, `_`, `-`, `.` as any character, `\.`):
#: it matches a fixed number of characters, so no backtracking can blow up on it
_PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9_-]|\\\.|\.)+")


class PlainKey:
    r"""`re.match(pattern_regex(key), name) is not None` for a plain key, in time linear in the key
    (PEFT's regex backtracks over every dot of the name): the name's suffix of the key's length
    (before a final newline too, as `$` allows) must match the key and start the name or follow a
    `.` with no newline before it (what `(.*\.)?` can consume)."""

    __slots__ = ("_compiled", "_width")

    def __init__(self, key: str) -> None:
        self._width = len(key) - key.count("\\")
        self._compiled = re.compile(key)

    @staticmethod
    def applies(key: str) -> bool:
        return _PLAIN_KEY.fullmatch(key) is not None

    def matches(self, name: str) -> bool:
        global match_calls
        match_calls += 1
        ends = (len(name), len(name) - 1) if name.endswith("\n") else (len(name),)
        for end in ends:
            start = end - self._width
            if start < 0:
                continue
            if start > 0 and (name[start - 1] != "." or name.find("\n", 0, start - 1) != -1):
                continue
            if self._compiled.fullmatch(name, start, end) is not None:
                return True
        return False


def modules_to_save_regex(name: str) -> str:
    """modules_to_save name -> PEFT's regex for "inside that module" (`re.match`)."""
    return rf"(^|.*\.){name}($|\..*)"


def layers_pattern_regex(name: str) -> str:
    """layers_pattern entry -> PEFT's regex whose group `idx` is the layer index (`re.match`)."""
    return rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\."
