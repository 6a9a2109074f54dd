"""Regular expressions that come from files: one bounded matcher for all of them.

A config's `target_modules` (as a string), `exclude_modules`, `modules_to_save`, `layers_pattern`
and the keys of `rank_pattern`/`alpha_pattern` are regexes written by strangers. PEFT runs them with
`re`; a pattern such as `([a-z_.0-9]+)+X` then backtracks for minutes. Here every such pattern is

- checked with `re.compile` (so exactly the patterns PEFT accepts are accepted, and a malformed
  one is a ConfigError naming the field and the pattern);
- matched with the `regex` package (the same syntax and semantics as `re` for every pattern `re`
  accepts, in its default VERSION0 mode), which takes a `timeout`. All the patterns of one config
  share one `Budget` for the run (one `PatternSet`, which a LoraConfig owns): BUDGET_S seconds,
  plus PER_NAME_S for every distinct name matched, so that patterns that are fine on each name
  stay fine on a 100k-tensor adapter, while ones that backtrack on a single name, or are slow on
  every name, spend it soon, however many of them the config holds: the time spent matching is
  bounded by the number of names, never by the number of patterns times names. The pattern that
  spends it is a ConfigError naming the field and that pattern, never a hang.

Plain rank/alpha keys (letters, digits, `_`, `-`, dots) are no regex run at all: `PlainIndex`, a
trie of the keys read backwards, finds the keys that match a name in one walk over that name.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Iterable
from typing import Any

from adapterctl.errors import ConfigError

#: seconds all the patterns of one config may spend matching in one run, beyond PER_NAME_S a name
BUDGET_S = 1.0
#: what the patterns of a config need for one name, many times over (a match takes microseconds)
PER_NAME_S = 0.001
#: trie steps a PlainIndex may take in one run, beyond INDEX_STEPS_PER_CHAR per character walked
#: (a walk branches only where a key has `.` and another a character at the same place)
INDEX_STEPS = 2_000_000
INDEX_STEPS_PER_CHAR = 16
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


class Budget:
    """The seconds the patterns of one config have left in this run: BUDGET_S, plus PER_NAME_S
    the first time any of them is matched against a name (so the total is bounded by the number
    of distinct names, whatever the number of patterns)."""

    __slots__ = ("_names", "left", "spent")

    def __init__(self) -> None:
        self.left = BUDGET_S
        self.spent = False  # once spent, spent for the run: a new name does not revive it
        self._names: set[str] = set()

    def grant(self, name: str) -> None:
        if name not in self._names:
            self._names.add(name)
            if not self.spent:
                self.left += PER_NAME_S

    def spend_all(self) -> None:
        self.left, self.spent = 0.0, True


class Pattern:
    """One compiled untrusted regex; `match`/`fullmatch` behave as `re`'s, within the budget it
    shares with the other patterns of its config."""

    __slots__ = ("_budget", "_compiled", "field", "label", "text")

    def __init__(
        self, text: str, compiled: Any, field: str, label: str, budget: Budget | None = None
    ) -> None:
        self.text, self.field, self.label = text, field, label
        self._compiled = compiled
        self._budget = budget if budget is not None else Budget()

    def match(self, s: str) -> Any:
        """`re.match(pattern, s)` (a match object or None)."""
        return self._run(self._compiled.match, s)

    def fullmatch(self, s: str) -> Any:
        """`re.fullmatch(pattern, s)` (a match object or None)."""
        return self._run(self._compiled.fullmatch, s)

    def _run(self, fn: Any, s: str) -> Any:
        global match_calls
        match_calls += 1
        budget = self._budget
        budget.grant(s)
        if budget.spent or budget.left <= 0:
            budget.spend_all()
            raise self._too_slow()
        start = time.perf_counter()
        try:
            return fn(s, timeout=budget.left)
        except TimeoutError as e:
            budget.spend_all()
            raise self._too_slow() from e
        finally:
            budget.left -= time.perf_counter() - start

    def _too_slow(self) -> ConfigError:
        return ConfigError(
            f"`{self.label}`: {self.field} {shown(self.text)} takes too long to match "
            "(the time budget of the config's patterns is spent): a pattern with nested repetition "
            "can take exponential time",
            hint="simplify the pattern (PEFT itself would hang on it)",
        )


def compile_pattern(
    regex: str, field: str, label: str, *, source: str | None = None, budget: Budget | None = None
) -> Pattern:
    """Compile `regex` (PEFT's full pattern) for `field` of the file `label`; `source` is what
    the file holds, when PEFT wraps it (a rank_pattern key, a modules_to_save name); `budget`: the
    one it shares with the other patterns of its config (its own when None)."""
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
        ) from e
    return Pattern(text, compiled, field, label, budget)


class PatternSet:
    """The patterns of one config, compiled once each, sharing one budget for the run."""

    __slots__ = ("_keys", "_label", "_memos", "_patterns", "_shared", "budget")

    def __init__(self, label: str) -> None:
        self._label = label
        self.budget = Budget()
        self._patterns: dict[tuple[str, str], Pattern] = {}
        self._memos: dict[str, dict[str, tuple[str, ...]]] = {}
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._keys: dict[str, KeyLookup] = {}

    def keys_matching(self, field: str, keys: Iterable[str], module: str) -> tuple[str, ...]:
        """The rank/alpha pattern `keys` of `field` that match `module` (PEFT's
        `re.match(pattern_regex(key), module)`), in their order: plain keys through one
        PlainIndex, the others each within the budget. `keys` are the same on every call (read on the
        first: the time taken is the module name's, not the number of keys)."""
        lookup = self._keys.get(field)
        if lookup is None:
            lookup = self._keys[field] = KeyLookup(keys, f"`{field}` key", self._label)
        hits = lookup.index.lookup(module)
        for position, key in lookup.others:
            regex = self.get(pattern_regex(key), f"`{field}` key", source=key)
            if regex.match(module) is not None:
                hits.append(position)
        if lookup.others:
            hits.sort()
        return tuple(lookup.keys[p] for p in hits)

    def check_key(self, field: str, key: str) -> None:
        """Refuse a rank/alpha pattern `key` of `field` PEFT's `re` would refuse (compiling it for
        later; a plain key is valid as it is, and is matched by a PlainIndex)."""
        regex = pattern_regex(key)
        if len(regex) > MAX_CHARS or not PlainKey.applies(key):
            self.get(regex, f"`{field}` key", source=key)

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
            found = self._patterns[key] = compile_pattern(
                regex, field, self._label, source=source, budget=self.budget
            )
        return found


class KeyLookup:
    """The keys of one rank/alpha pattern field, split: the plain ones indexed, the others (with
    their positions) to be matched one by one."""

    __slots__ = ("index", "keys", "others")

    def __init__(self, keys: Iterable[str], field: str, label: str) -> None:
        self.keys = list(keys)
        self.index = PlainIndex(field, label)
        self.others: list[tuple[int, str]] = []
        for position, key in enumerate(self.keys):
            if PlainKey.applies(key):
                self.index.add(position, key)
            else:
                self.others.append((position, key))


# --- the regexes PEFT builds from config fields (docs/peft-format.md §3.1, §4.4) --------------


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


#: the first / last numbered segment of a module path (ours, not from a file: plain `re`)
_FIRST_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")
_LAST_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")


def layer_index(module: str, *, first: bool = True) -> int | None:
    """The layer index PEFT's `layers_to_transform` reads from a module path when no
    `layers_pattern` is set: the first numbered segment (PEFT 0.20 on: not an expert index
    further in), or the last one (`first=False`, PEFT before 0.20)."""
    m = (_FIRST_INDEX if first else _LAST_INDEX).match(module)
    if m is None:
        return None
    digits = m.group(1).lstrip("0") or "0"
    # a file's index of thousands of digits is past int()'s limit: beyond any layer a list names
    return int(digits) if len(digits) <= 18 else 10**18


class _Node:
    __slots__ = ("any", "chars", "keys")

    def __init__(self) -> None:
        self.chars: dict[str, _Node] = {}
        self.any: _Node | None = None  # a `.` of a key: any character but a newline
        self.keys: list[tuple[int, PlainKey]] = []  # the keys that end here (read backwards)


class PlainIndex:
    r"""Plain rank/alpha keys, found for a name in one walk over that name, whatever their number.

    A trie of the keys read backwards (`\.` a literal dot, `.` an edge for any character but a
    newline); a name is walked backwards from its end (and from before a final newline, as `$`
    allows), following every edge its characters take; a key ending on the walk matches where the
    name's start or a `.` (with no newline before it) comes next, which is what PEFT's `(.*\.)?`
    can consume. Each key found is checked once more with its PlainKey, so the answers are
    exactly `re.match(pattern_regex(key), name)`'s; keys come back as positions, in order.

    A walk branches only where one key has `.` and another a character at the same place from the
    end; keys written to make it branch at every step could make it visit every key for each
    name, so the steps are counted: INDEX_STEPS, plus INDEX_STEPS_PER_CHAR for every character
    walked, and a ConfigError naming the field once spent (never a quadratic hang).
    """

    __slots__ = ("_field", "_label", "_left", "_root", "_size", "steps")

    def __init__(self, field: str, label: str) -> None:
        self._field, self._label = field, label
        self._root = _Node()
        self._size = 0
        self._left = INDEX_STEPS
        #: trie steps taken so far (tests count them)
        self.steps = 0

    def __len__(self) -> int:
        return self._size

    def add(self, position: int, key: str) -> None:
        """Index `key` (a plain key: PlainKey.applies) found at `position` in its field."""
        tokens: list[str | None] = []  # None: `.`, any character
        i = 0
        while i < len(key):
            if key[i] == "\\":
                tokens.append(key[i + 1])
                i += 2
            else:
                tokens.append(None if key[i] == "." else key[i])
                i += 1
        node = self._root
        for token in reversed(tokens):
            if token is None:
                if node.any is None:
                    node.any = _Node()
                node = node.any
            else:
                node = node.chars.setdefault(token, _Node())
        node.keys.append((position, PlainKey(key)))
        self._size += 1

    def lookup(self, name: str) -> list[int]:
        """The positions of the keys that match `name`, in order."""
        if not self._size:
            return []
        found: set[int] = set()
        ends = (len(name), len(name) - 1) if name.endswith("\n") else (len(name),)
        for end in ends:
            self._walk(name, end, found)
        return sorted(found)

    def _walk(self, name: str, end: int, found: set[int]) -> None:
        newline = name.find("\n")
        self._left += INDEX_STEPS_PER_CHAR * end
        active = [self._root]
        position = end
        while active:
            self.steps += len(active)
            self._left -= len(active)
            if self._left < 0:
                raise self._too_slow()
            # a key ending here matches if the name starts here, or a `.` comes before, with no
            # newline before that dot (`(.*\.)?` cannot cross one)
            if position == 0 or (
                name[position - 1] == "." and (newline == -1 or newline >= position - 1)
            ):
                for node in active:
                    for index, key in node.keys:
                        if index not in found and key.matches(name):
                            found.add(index)
            if position == 0:
                return
            char = name[position - 1]
            following = []
            for node in active:
                step = node.chars.get(char)
                if step is not None:
                    following.append(step)
                if node.any is not None and char != "\n":
                    following.append(node.any)
            active = following
            position -= 1

    def _too_slow(self) -> ConfigError:
        return ConfigError(
            f"`{self._label}`: the {self._field}s take too long to match (their budget of steps "
            "is spent): many keys with `.` where others have a character make every name "
            "match many of them almost to the end",
            hint="escape the dots that stand for a dot (`\\.`), or use fewer keys",
        )
