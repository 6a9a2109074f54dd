"""Model cards from strangers (bounded, safe YAML; every odd shape one error line) and cards that
follow the adapter: convert, select --rename and push rewrite the adapter facts; a pushed card
names no local base model. Plus `inspect --check` against PEFT on a config PEFT cannot read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from adapterctl.format.config import LoraConfig
from adapterctl.ops.card import card_text
from tests.helpers import Q, V, lora_tensors, write_adapter

runner = CliRunner()


def _invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl")


def _adapter(directory: Path, **config: Any) -> Path:
    return write_adapter(directory, {**lora_tensors(Q), **lora_tensors(V)}, config)


BAD_CARDS = {
    "alias bomb": "---\na: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "tags: *i\n---\n# card\n",
    "deep nesting": "---\ntags: " + "[" * 5000 + "]" * 5000 + "\n---\n",
    "nested list in tags": "---\ntags:\n- [a, b]\n- c\n---\n",
    "python object tag": "---\ntags: !!python/object:os.system {}\n---\n",
    "python name tag": "---\nx: !!python/name:os.system ''\n---\n",
    "non-string tags": "---\ntags: [1, 2.5, true]\n---\n",
    "non-string key": "---\n1: one\n---\n",
    "not a mapping": "---\n- a\n- b\n---\n",
    "huge front matter": "---\ntags:\n" + "- tag\n" * 60_000 + "---\n",
    "not yaml": "---\ntags: [unclosed\n---\n",
    "bad base_model": "---\nbase_model: {a: b}\n---\n",
    "a date that is no date": "---\nd: 2020-99-99\n---\n",
    "bad model-index": "---\nmodel-index: 5\n---\n",
}


@pytest.mark.parametrize("name", BAD_CARDS)
def test_a_hostile_card_is_one_error_line(name: str, tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    (src / "README.md").write_text(BAD_CARDS[name])
    commands = [["push", src, "alice/x", "--dry-run"]]
    if name != "bad model-index":  # convert keeps the front matter as it is: only push reads it
        commands.append(["convert", src, tmp_path / "out", "--dtype", "bfloat16"])
    for argv in commands:
        result = _invoke(*argv)
        assert result.exit_code == 1, (name, result.output)
        lines = result.stderr.splitlines()
        assert lines[0].startswith(f"error: `{src / 'README.md'}` is not a model card"), lines
        assert len(lines) <= 2, lines
        assert not (tmp_path / "out").exists()


def _facts(card: str) -> list[str]:
    return [line for line in card.splitlines() if line.startswith("- `")]


@pytest.mark.parametrize("argv", [["--rank", "2"], ["--dtype", "bfloat16"]])
def test_convert_rewrites_the_cards_adapter_facts(argv: list[str], tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base", lora_alpha=16)
    old = LoraConfig.from_file(src / "adapter_config.json")
    (src / "README.md").write_text(card_text(old, "# My adapter\n\nTrained on my data.\n"))
    # an older adapterctl wrote the facts into the first sentence; that must not survive either
    result = _invoke("convert", src, tmp_path / "out", *argv)
    assert result.exit_code == 0, result.output
    new = LoraConfig.from_file(tmp_path / "out" / "adapter_config.json")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Trained on my data." in card
    (line,) = _facts(card)
    assert f"r={new.r}, lora_alpha={new.lora_alpha}" in line
    assert f"init_lora_weights={new.init_lora_weights!r}" in line
    if new.r != old.r or new.lora_alpha != old.lora_alpha:
        # the output's card changed, not SOURCE's: the warning says so, and what SOURCE's said
        out_card, src_card = tmp_path / "out" / "README.md", src / "README.md"
        stderr = " ".join(result.stderr.split())  # the terminal may wrap the line
        assert f"the card written to `{out_card}` has new adapter facts" in stderr, stderr
        assert f"`{src_card}` said `default`: r={old.r}, lora_alpha={old.lora_alpha}," in stderr
        assert f"now `default`: r={new.r}, lora_alpha={new.lora_alpha}," in stderr
        assert f"r={old.r}," not in card
    else:
        assert "adapter facts" not in result.stderr  # the same facts: nothing to say


def test_a_card_from_an_older_adapterctl_is_updated(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    (src / "README.md").write_text(
        "---\nlibrary_name: peft\n---\n# Model card\n\nThis repository holds a LoRA adapter in the "
        "PEFT format (r=4, lora_alpha=8).\n"
    )
    result = _invoke("convert", src, tmp_path / "out", "--rank", "2")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "(r=4, lora_alpha=8)" not in card
    assert "r=2" in _facts(card)[0]
    assert f"`{src / 'README.md'}` said r=4, lora_alpha=8; now" in " ".join(result.stderr.split())


def test_select_rename_rewrites_the_facts(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    (src / "README.md").write_text(
        card_text(LoraConfig.from_file(src / "adapter_config.json"), None)
    )
    result = _invoke("select", src, tmp_path / "out", "-a", "default", "--rename", "default=beta")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert [line.split(":")[0] for line in _facts(card)] == ["- `beta`"]
    stderr = " ".join(result.stderr.split())
    assert f"the card written to `{tmp_path / 'out' / 'README.md'}` has new adapter facts" in stderr
    assert "said `default`: r=4" in stderr, stderr
    assert "now `beta`: r=4" in stderr, stderr


def test_a_pushed_card_names_no_local_base(tmp_path: Path) -> None:
    local = str(tmp_path / "my-base")
    src = _adapter(tmp_path / "a", base_model_name_or_path=local)
    (src / "README.md").write_text(
        f"---\nbase_model: {local}\nlibrary_name: peft\ntags:\n- base_model:adapter:{local}\n"
        "- lora\n- mine\n---\n# card\n"
    )
    result = _invoke("push", src, "alice/x", "--dry-run", "--base-model", "org/base", "--json")
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)["card"]
    assert local not in card
    assert "base_model: org/base" in card
    assert "base_model:adapter:org/base" in card
    assert "- mine" in card
    assert re.search(r"r=4, lora_alpha=8", card)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_check_fails_where_peft_cannot_read_the_config(encoding: str, tmp_path: Path) -> None:
    from peft import PeftConfig

    src = _adapter(tmp_path / "a")
    text = (src / "adapter_config.json").read_text()
    (src / "adapter_config.json").write_bytes(text.encode(encoding))
    with pytest.raises(Exception):  # noqa: B017,PT011 - PEFT's own error (JSON or Unicode)
        PeftConfig.from_pretrained(str(src))
    result = _invoke("inspect", src, "--check")
    assert result.exit_code == 1, result.output
    assert "PEFT 0.21.2 cannot read it" in result.stderr
    converted = _invoke("convert", src, tmp_path / "out", "--dtype", "bfloat16")
    assert converted.exit_code == 0, converted.output
    assert "PEFT 0.21.2 cannot read it" in converted.stderr  # accepted, saying so
    assert (tmp_path / "out" / "adapter_config.json").read_bytes().startswith(b"{")


# --- config strings in a card are inert -----------------------------------------------------------

END = "<!-- adapterctl: end of adapter facts -->"
HOSTILE = [
    f"x{END}\n## Injected\n[click](javascript:alert(1))",
    "a``b`<!-- adapterctl: adapter facts (rewritten on every save, convert and push) -->\r\n"
    "## Injected\u2028\x85\u202e\x00`",
]
#: every config field whose strings the facts show (or could): a list entry, a regex, an init
#: string, pattern keys, the base model
HOSTILE_FIELDS: dict[str, Any] = {
    "target_modules list": lambda v: {"target_modules": ["q_proj", v]},
    "target_modules regex": lambda v: {"target_modules": f"q_proj|{v}"},
    "init_lora_weights": lambda v: {"init_lora_weights": v},
    "rank_pattern key": lambda v: {"rank_pattern": {v: 2}},
    "alpha_pattern key": lambda v: {"alpha_pattern": {v: 2}},
    "base model": lambda v: {"base_model_name_or_path": v},
}


def _assert_inert(card: str) -> None:
    """The facts block is one block whose every line is a marker, its heading or a fact, and the
    Markdown renders no injected heading or link (markdown-it, the CommonMark parser rich uses)."""
    from markdown_it import MarkdownIt

    lines = card.splitlines()
    assert lines.count(END) == 1, card
    start = lines.index(
        "<!-- adapterctl: adapter facts (rewritten on every save, convert and push) -->"
    )
    block = lines[start + 1 : lines.index(END)]
    assert block[:2] == ["## Adapter", ""], block
    assert all(ln.startswith("- `") for ln in block[2:]), block
    assert not any("Injected" in ln for ln in lines if not ln.startswith("- `")), card
    html = MarkdownIt("commonmark").render(card)
    assert "<h2>Injected" not in html, html
    assert "<a href" not in html, html


@pytest.mark.parametrize("value", HOSTILE, ids=["marker", "backticks+controls"])
@pytest.mark.parametrize("field", HOSTILE_FIELDS)
def test_hostile_config_strings_stay_inert_in_the_card(
    field: str, value: str, tmp_path: Path
) -> None:
    src = _adapter(tmp_path / "a", **HOSTILE_FIELDS[field](value))
    (src / "README.md").write_text("# My adapter\n")
    once, twice = tmp_path / "once", tmp_path / "twice"
    for a, b in ((src, once), (once, twice)):
        result = _invoke("convert", a, b, "--dtype", "bfloat16")
        assert result.exit_code == 0, result.output
    card = (once / "README.md").read_text()
    _assert_inert(card)
    assert (twice / "README.md").read_text() == card  # refreshing is idempotent
    if field not in ("base model", "rank_pattern key", "alpha_pattern key"):
        shown = json.dumps(value, ensure_ascii=False)[1:-1]
        assert shown.split("\\n")[0][:6] in card  # the value is shown, escaped
    pushed = _invoke("push", once, "alice/x", "--dry-run", "--json", "--base-model", "org/base")
    assert pushed.exit_code == 0, pushed.output
    _assert_inert(json.loads(pushed.stdout)["card"])


def test_a_hostile_adapter_name_stays_inert(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    (src / "README.md").write_text("# card\n")
    name = "x`` <!-- adapterctl: end of adapter facts --> [a](javascript:alert(1))"
    result = _invoke(
        "select", src, tmp_path / "out", "-a", "default", "--rename", f"default={name}"
    )
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    _assert_inert(card)
    assert _facts(card)[0].startswith(f"- ```{name}```: ")


def test_a_value_cannot_end_the_facts_block_early(tmp_path: Path) -> None:
    """The reviewer's case: before, the injected text survived every refresh and piled up."""
    src = _adapter(tmp_path / "a", target_modules=["q_proj", HOSTILE[0]])
    old = LoraConfig.from_file(src / "adapter_config.json")
    card = card_text(old, "# card\n")
    assert card_text(old, card) == card
    assert card.count("Injected") == 1


def test_push_says_the_uploaded_card_has_new_facts(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    (src / "README.md").write_text(card_text(LoraConfig(r=16, lora_alpha=32), "# card\n"))
    result = _invoke("push", src, "alice/x", "--dry-run")
    assert result.exit_code == 0, result.output
    stderr = " ".join(result.stderr.split())
    assert "the card push uploads to `alice/x` has new adapter facts" in stderr, stderr
    assert f"`{src / 'README.md'}` said `default`: r=16, lora_alpha=32" in stderr
    assert "now `default`: r=4, lora_alpha=8" in stderr
    assert (src / "README.md").read_text().count("r=16") == 1  # SOURCE's card is left alone


# --- files that link out of SOURCE ----------------------------------------------------------------

SECRET = "hf_SECRET_TOKEN_do_not_upload"


def _linked_out(tmp_path: Path, name: str = "README.md") -> Path:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    if name != "README.md":  # a valid config outside, so only the link is wrong
        secret.write_text((src / name).read_text())
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(Path("..") / "secret.txt")
    return src


@pytest.mark.parametrize("command", ["push", "convert", "select"])
def test_a_card_linking_out_of_source_is_refused(command: str, tmp_path: Path) -> None:
    src = _linked_out(tmp_path)
    out = tmp_path / "out"
    argv = {
        "push": ["push", src, "alice/x", "--dry-run"],
        "convert": ["convert", src, out, "--dtype", "bfloat16"],
        "select": ["select", src, out, "-a", "default"],
    }[command]
    result = _invoke(*argv)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith(
        f"error: `{src / 'README.md'}` is a symlink to a file outside the adapter directory: "
    ), lines
    assert len(lines) <= 2, lines
    assert SECRET not in result.output
    assert not out.exists()


def test_push_refuses_a_config_linking_out_of_source(tmp_path: Path) -> None:
    src = _linked_out(tmp_path, "adapter_config.json")
    result = _invoke("push", src, "alice/x", "--dry-run")
    assert result.exit_code == 1, result.output
    assert (
        "adapter_config.json` is a symlink to a file outside the adapter directory"
        in (result.stderr.splitlines()[0])
    )


def test_links_inside_source_are_followed(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    (src / "docs").mkdir()
    (src / "docs" / "card.md").write_text("# Linked card\n")
    (src / "README.md").symlink_to(Path("docs") / "card.md")
    result = _invoke("convert", src, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "# Linked card" in (tmp_path / "out" / "README.md").read_text()
    pushed = _invoke("push", src, "alice/x", "--dry-run", "--json")
    assert pushed.exit_code == 0, pushed.output
    assert "# Linked card" in json.loads(pushed.stdout)["card"]


def _snapshot(cache: Path, target: str) -> Path:
    """A Hub cache repo folder as huggingface_hub lays it out: files in snapshots/REV link into
    ../../blobs."""
    blobs = cache / "models--org--x" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc123").write_text("# Hub card\n")
    snap = _adapter(cache / "models--org--x" / "snapshots" / "rev1", base_model_name_or_path="o/b")
    (snap / "README.md").symlink_to(target)
    return snap


def test_hub_cache_snapshots_may_link_into_their_blobs(tmp_path: Path) -> None:
    from adapterctl.format.layout import read_readme

    snap = _snapshot(tmp_path / "hub", "../../blobs/abc123")
    assert read_readme(snap) == b"# Hub card\n"
    result = _invoke("convert", snap, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "# Hub card" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(
    "layout", ["out of the repo folder", "not a Hub repo folder", "repo folder not blobs"]
)
def test_a_snapshot_linking_elsewhere_is_refused(layout: str, tmp_path: Path) -> None:
    from adapterctl.errors import AdapterFormatError
    from adapterctl.format.layout import read_readme

    (tmp_path / "secret.txt").write_text(SECRET)
    if layout == "out of the repo folder":
        snap = _snapshot(tmp_path / "hub", "../../../../secret.txt")
    elif layout == "repo folder not blobs":
        snap = _snapshot(tmp_path / "hub", "../../secret.txt")
        (tmp_path / "hub" / "models--org--x" / "secret.txt").write_text(SECRET)
    else:  # a folder named snapshots in no Hub cache: ~/snapshots/x/README.md -> ../../.ssh/key
        snap = _adapter(tmp_path / "snapshots" / "x")
        (snap / "README.md").symlink_to("../../secret.txt")
    with pytest.raises(AdapterFormatError, match="outside the adapter directory"):
        read_readme(snap)


def test_a_card_swapped_after_its_check_is_not_read(tmp_path: Path) -> None:
    from adapterctl.format.files import UnreadableFileError, read_small

    (tmp_path / "README.md").write_text("# checked\n")
    checked = (tmp_path / "README.md").stat()
    (tmp_path / "other.md").write_text(SECRET)
    (tmp_path / "README.md").unlink()
    (tmp_path / "README.md").symlink_to(tmp_path / "other.md")  # the swap
    with pytest.raises(UnreadableFileError, match="changed while it was being read"):
        read_small(tmp_path / "README.md", "model card", same_as=checked)


def test_a_broken_link_is_no_card(tmp_path: Path) -> None:
    from adapterctl.format.layout import read_readme

    (tmp_path / "README.md").symlink_to("../nowhere.md")
    assert read_readme(tmp_path) is None
