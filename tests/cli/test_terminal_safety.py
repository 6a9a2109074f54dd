"""What reaches the terminal from untrusted files is shown, never interpreted (issue 11, section 1).

Hostile adapters carry every dangerous character class (C0/C1 controls, DEL, bidi controls,
zero-width and other format characters, line separators) plus escape sequences that clear the
screen or set the window title, lines forged with newlines, and rich markup, in tensor names,
adapter names, config strings, pattern keys and README.md. Every command that can print them is
run, and no raw dangerous character, no forged line and no interpreted markup may come out.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterctl.cli import output
from adapterctl.cli.main import app
from adapterctl.cli.safe import json_visible, visible
from tests.helpers import P, write_adapter

runner = CliRunner()

#: one of each kind a terminal acts on instead of showing
DANGEROUS = [
    *[chr(c) for c in range(0x20)],
    "\x7f",
    *[chr(c) for c in range(0x80, 0xA0)],
    "\u061c", "\u200e", "\u200f", *[chr(c) for c in range(0x202A, 0x202F)],
    *[chr(c) for c in range(0x2066, 0x206A)],
    "\u00ad", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u2028", "\u2029",
    "\U000e0041", "\U000e0001",
]  # fmt: skip
SEQUENCES = [
    "\x1b]0;pwned\x07",  # OSC: set the window title
    "\x1b]8;;file:///etc/passwd\x07x\x1b]8;;\x07",  # OSC 8 hyperlink (BEL-terminated: the
    # names are pattern keys too, and a backslash would make them invalid regexes)
    "\x1b[2J\x1b[H",  # CSI: clear the screen, cursor home
    "\x1b[31m",  # colour
    "\x9b2J",  # C1 CSI
]
MARKUP = ["[/bold]", "[link=file:///etc/passwd]x[/link]", "[red]r[/red]", ":smile:"]
FORGED = "\nerror: forged line\r"
#: a name part holding all of it (no `.` or NUL: it names a module)
HOSTILE = (
    "q"
    + "".join(SEQUENCES)
    + FORGED
    + "\u202e"
    + "".join(MARKUP)
    + "".join(c for c in DANGEROUS if c != "\x00")
)
#: as a folder name: no `/`, and short enough for a file system (255 bytes)
HOSTILE_DIR = ("a" + "".join(SEQUENCES) + FORGED + "\u202e\u2066\x85[_bold]\x7fz").replace("/", "_")


def dangerous_in(text: str) -> list[str]:
    """Every character a terminal would interpret (newline between lines excepted)."""
    return sorted({c for c in text if not c.isprintable() and c not in "\n "})


def assert_safe(result: Any) -> None:
    """No raw dangerous character, no forged line, no crash; markup shown literally."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code not in (2, 3), result.stderr
    for text in (result.stdout, result.stderr):
        assert dangerous_in(text) == [], repr(text[:2000])
        assert not any(line.startswith("error: forged") for line in text.splitlines())


def shown(result: Any) -> str:
    """Both streams, lines that wrapping broke joined again."""
    return " ".join((result.stdout + result.stderr).split())


def invoke(*args: str | Path, env: dict[str, str | None] | None = None) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl", env=env)


def factors(r: int = 4, n: int = 8) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((r, n)).astype(np.float32)
    return a, rng.standard_normal((n, r)).astype(np.float32)


def hostile_adapter(directory: Path, name: str = HOSTILE, **config: Any) -> Path:
    a, b = factors()
    module = f"model.layers.0.{name}"
    tensors = {f"{P}{module}.lora_A.weight": a, f"{P}{module}.lora_B.weight": b}
    cfg = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [name],
        "base_model_name_or_path": name, "task_type": "CAUSAL_LM",
        "rank_pattern": {name: 4}, "alpha_pattern": {name: 8},
        **config,
    }  # fmt: skip
    write_adapter(directory, tensors, raw_config=json.dumps(cfg))
    readme = f"---\nlicense: mit\n---\n# card {name}\n{FORGED}\n\ttabbed {''.join(SEQUENCES)}\n"
    (directory / "README.md").write_text(readme, encoding="utf-8")
    return directory


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    return hostile_adapter(tmp_path / "hostile")


# the rule itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("ch", DANGEROUS, ids=lambda c: f"U+{ord(c):04X}")
def test_every_dangerous_character_is_escaped(ch: str) -> None:
    shown_text = visible(f"a{ch}b")
    assert ch not in shown_text
    assert shown_text.startswith("a\\")
    assert shown_text.endswith("b")
    assert dangerous_in(shown_text) == []
    doc = json_visible(json.dumps({"k": f"a{ch}b"}, ensure_ascii=False))
    assert ch not in doc
    assert json.loads(doc) == {"k": f"a{ch}b"}  # lossless


def test_the_rule_covers_whole_unicode_categories() -> None:
    """Every control, format, separator (line/paragraph) and surrogate code point is escaped;
    ordinary letters, digits, punctuation and symbols are left as they are."""
    escaped = {"Cc", "Cf", "Cs", "Zl", "Zp"}
    kept = {"Lu", "Ll", "Nd", "Po", "Sm", "So"}
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        category = unicodedata.category(ch)
        if category in escaped:
            assert visible(ch) != ch, f"U+{code:04X} ({category}) is not escaped"
        elif category in kept:
            assert visible(ch) == ch, f"U+{code:04X} ({category}) is escaped"


def test_escapes_are_readable() -> None:
    assert visible("a\x1b[2Jb\nc\rd\te\u202ef\U000e0041") == (
        "a\\x1b[2Jb\\nc\\rd\\te\\u202ef\\U000e0041"
    )
    assert visible("model.layers.0.q_proj é ✓ ×") == "model.layers.0.q_proj é ✓ ×"


# every command on a hostile adapter ------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="inspect"),
        pytest.param(["--check"], id="check"),
        pytest.param(["--tensors"], id="tensors"),
    ],
)
def test_inspect(hostile: Path, args: list[str]) -> None:
    result = invoke("inspect", hostile, *args)
    assert_safe(result)
    text = shown(result)
    assert "\\x1b]0;pwned\\x07" in text
    assert "\\x1b[2J" in text
    assert "\\u202e" in text
    assert "\\nerror: forged line\\r" in text
    for markup in MARKUP:  # shown as written, never interpreted (`[/bold]` crashed rich)
        assert markup in text


def test_inspect_json_is_lossless_and_safe(hostile: Path) -> None:
    result = invoke("inspect", hostile, "--json")
    assert_safe(result)
    doc = json.loads(result.stdout)
    (a,) = doc["adapters"]
    assert a["config"]["base_model_name_or_path"] == HOSTILE
    assert a["config"]["rank_pattern"] == {HOSTILE: 4}
    assert {t["name"] for t in a["tensors"]} == {
        f"{P}model.layers.0.{HOSTILE}.lora_A.weight",
        f"{P}model.layers.0.{HOSTILE}.lora_B.weight",
    }


def test_inspect_of_a_name_that_breaks_a_check(tmp_path: Path) -> None:
    """An error that quotes the name (lora_A without lora_B) in the report and on `error:`."""
    a, _ = factors()
    src = write_adapter(tmp_path / "a", {f"{P}model.layers.0.{HOSTILE}.lora_A.weight": a})
    for json_args in ([], ["--json"]):
        result = invoke("inspect", src, "--check", *json_args)
        assert result.exit_code == 1
        assert_safe(result)
    result = invoke("convert", src, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 1
    assert_safe(result)
    assert result.stderr.count("\n") <= 2
    assert "\\nerror: forged line" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--dtype", "bfloat16", "--verify"], id="dtype-verify"),
        pytest.param(["--rank", "2"], id="rank"),
        pytest.param(["--dtype", "float16", "--json"], id="json"),
    ],
)
def test_convert(hostile: Path, tmp_path: Path, args: list[str]) -> None:
    result = invoke("convert", hostile, tmp_path / "out", *args)
    assert result.exit_code == 0, result.stderr
    assert_safe(result)
    if "--json" in args:
        doc = json.loads(result.stdout)
        assert doc["modules"][0]["module"] == f"model.layers.0.{HOSTILE}"
    else:  # the name's end is kept where it is shortened to fit
        assert "\\U000e0001" in result.stdout


@pytest.mark.parametrize("json_args", [[], ["--json"]], ids=["human", "json"])
def test_select_of_a_hostile_adapter_name(tmp_path: Path, json_args: list[str]) -> None:
    """An adapter named by its folder: the name reaches select's result lines and errors."""
    src = tmp_path / "src"
    write_adapter(src)
    write_adapter(src / HOSTILE_DIR)
    result = invoke("select", src, tmp_path / "out", "-a", HOSTILE_DIR, *json_args)
    assert result.exit_code == 0, result.stderr
    assert_safe(result)
    listing = invoke("inspect", src)
    assert_safe(listing)
    assert "\\x1b]0;pwned" in listing.stdout
    missing = invoke("select", src, tmp_path / "o2", "-a", "nope", *json_args)
    assert missing.exit_code == 1
    assert_safe(missing)


@pytest.mark.parametrize("name", [HOSTILE_DIR, HOSTILE.replace("/", "_")], ids=["short", "long"])
def test_hostile_path_in_an_error_line(tmp_path: Path, name: str) -> None:
    """A missing path (the long one is also too long for the file system: ENAMETOOLONG)."""
    result = invoke("inspect", tmp_path / name)
    assert result.exit_code == 1
    assert_safe(result)
    assert len(result.stderr.splitlines()) <= 2


@pytest.mark.parametrize("json_args", [[], ["--json"]], ids=["human", "json"])
def test_push_dry_run_card_and_warnings(hostile: Path, json_args: list[str]) -> None:
    """README.md's body is printed by `push --dry-run`: escaped, and indented under a heading so
    no line of it passes for one of ours. The local base name becomes a warning."""
    result = invoke("push", hostile, "alice/x", "--dry-run", "--base-model", "alice/b", *json_args)
    assert result.exit_code == 0, result.stderr
    assert_safe(result)
    if json_args:
        card = json.loads(result.stdout)["card"]
        assert "\x1b]0;pwned\x07" in card
        assert "\nerror: forged line" in card
        for line in result.stderr.splitlines():
            assert set(json.loads(line)) == {"warning"}
    else:
        assert "\\ttabbed" not in result.stdout  # tabs in a card are layout: expanded
        card = result.stdout.split("model card (README.md):\n")[1].splitlines()[:-1]
        assert card
        assert all(line.startswith("  ") or not line for line in card)
        assert "\\x1b[2J" in result.stdout
        assert result.stderr.startswith("warning: ")


def test_push_error_after_warnings_under_json_is_all_json_lines(hostile: Path) -> None:
    """Without --base-model the local base path is an error; stderr stays JSON lines only."""
    result = invoke("push", hostile, "alice/x", "--dry-run", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_safe(result)
    objects = [json.loads(line) for line in result.stderr.splitlines()]
    assert list(objects[-1]) == ["error"]
    assert all(list(o) in (["warning"], ["error"]) for o in objects)


def test_task_type_is_quoted_safely(tmp_path: Path) -> None:
    src = hostile_adapter(tmp_path / "a", task_type=HOSTILE)
    for json_args in ([], ["--json"]):
        result = invoke("inspect", src, *json_args)
        assert result.exit_code == 1
        assert_safe(result)


def test_library_warning_lines_are_escaped(hostile: Path, tmp_path: Path) -> None:
    """A warning logged by the library (a pattern key that matches nothing, via convert)."""
    src = hostile_adapter(tmp_path / "w", rank_pattern={HOSTILE + "zz": 2})
    result = invoke("convert", src, tmp_path / "out", "--dtype", "float16")
    assert result.exit_code == 0, result.stderr
    assert_safe(result)


def test_error_boundary_sanitises_internal_errors(
    hostile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapterctl.ops.inspect as mod

    def boom(*args: object, **kwargs: object) -> None:
        raise ValueError(f"bad {HOSTILE}")

    monkeypatch.setattr(mod, "inspect_adapter", boom)
    result = invoke("inspect", hostile)
    assert result.exit_code == 3
    assert_safe_streams(result)
    assert len(result.stderr.splitlines()) == 2


def assert_safe_streams(result: Any) -> None:
    for text in (result.stdout, result.stderr):
        assert dangerous_in(text) == []


@pytest.mark.slow
def test_load_error_quotes_the_key_safely(tmp_path: Path) -> None:
    """`load` of an adapter whose key matches nothing in the base: the error names the key."""
    from tests.fixtures import tiny_llama

    base = tmp_path / "base"
    tiny_llama().save_pretrained(str(base))
    a, b = factors(4, 32)
    name = "model.layers.0.self_attn.q_proj"
    tensors = {
        f"{P}{name}.lora_A.weight": a,
        f"{P}{name}.lora_B.weight": b,
        f"{P}model.layers.0.{HOSTILE}.lora_A.weight": a,
        f"{P}model.layers.0.{HOSTILE}.lora_B.weight": b,
    }
    src = write_adapter(tmp_path / "a", tensors, {"target_modules": ["q_proj"]})
    for json_args in ([], ["--json"]):
        result = invoke("load", base, src, *json_args)
        assert result.exit_code == 1, result.stderr
        assert_safe(result)
        if json_args:
            assert all(json.loads(line) for line in result.stderr.splitlines())


# JSON: strictly valid ------------------------------------------------------------------------


def _strict(text: str) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_text_has_no_nan_literals() -> None:
    doc = {"a": [float("nan"), float("inf"), -float("inf"), 1.5], "b": {"c": float("nan")}}
    assert _strict(output.json_text(doc)) == {
        "a": ["NaN", "Infinity", "-Infinity", 1.5],
        "b": {"c": "NaN"},
    }
    assert _strict(output.json_text(doc, 2, ascii_only=True))["b"] == {"c": "NaN"}


def test_inspect_json_of_an_infinite_config_value_parses_strictly(tmp_path: Path) -> None:
    """JSON numbers beyond float range (1e400) read as infinity; they are written as strings."""
    src = write_adapter(tmp_path / "a")
    cfg = (src / "adapter_config.json").read_text()
    (src / "adapter_config.json").write_text(
        cfg.replace('"r": 4', '"r": 4, "extra": [1e400, -1e400]')
    )
    result = invoke("inspect", src, "--json")
    assert result.exit_code == 0, result.stderr
    assert _strict(result.stdout)["adapters"][0]["config"]["extra"] == ["Infinity", "-Infinity"]


# progress bars and spinners (drawn by rich, on a terminal only) ---------------------------------


class _Terminal:
    """A stderr that says it is a terminal and keeps what is drawn on it."""

    def __init__(self) -> None:
        import io

        self.buffer = io.StringIO()
        self.encoding = "utf-8"

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self.buffer.write(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("no file descriptor")


@pytest.mark.parametrize("kind", ["status", "progress"])
def test_spinner_and_progress_labels_are_escaped(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`load` names its steps after paths (`loading adapter DIR`): rich draws them as text, with
    no markup, emoji or highlighting, and our rule escapes what a terminal would act on."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "2000")  # rich cuts a label to the width: see all of it
    label = f"loading adapter {HOSTILE}"
    if kind == "status":
        with output.status() as step:
            step(label)
            import time

            time.sleep(0.3)  # the spinner refreshes in its own thread
    else:
        with output.progress(label) as advance:
            advance(10, 100)
    drawn = terminal.buffer.getvalue()
    assert "\\x1b]0;pwned\\x07" in drawn
    for raw in ("\x1b]0;pwned", "\x1b[2J", "\x9b", "\u202e", "\x07", "\r\u202e", "\nerror: forged"):
        assert raw not in drawn
    for markup in MARKUP:
        assert markup in drawn


@pytest.mark.filterwarnings("always::RuntimeWarning")
@pytest.mark.parametrize("json_args", [[], ["--json"]], ids=["human", "json"])
def test_python_warnings_are_our_warning_lines(
    hostile: Path, monkeypatch: pytest.MonkeyPatch, json_args: list[str]
) -> None:
    """A Python warning raised during a command (numpy's overflow, say) is one `warning:` line,
    escaped, or a JSON line under --json: never Python's two-line format on a JSON stderr."""
    import warnings

    import adapterctl.ops.inspect as mod

    real = mod.inspect_adapter

    def noisy(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"overflow in {HOSTILE}", RuntimeWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "inspect_adapter", noisy)
    result = invoke("inspect", hostile, *json_args)
    assert result.exit_code == 0, result.stderr
    assert_safe(result)
    (line,) = result.stderr.splitlines()
    if json_args:
        assert json.loads(line) == {
            "warning": {"message": f"RuntimeWarning: overflow in {HOSTILE}"}
        }
    else:
        assert line.startswith("warning: RuntimeWarning: overflow in q\\x1b]0;pwned")
