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
        assert "adapter facts were updated" in result.stderr
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
    assert "adapter facts were updated" in result.stderr


def test_select_rename_rewrites_the_facts(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", base_model_name_or_path="org/base")
    (src / "README.md").write_text(
        card_text(LoraConfig.from_file(src / "adapter_config.json"), None)
    )
    result = _invoke("select", src, tmp_path / "out", "-a", "default", "--rename", "default=beta")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert [line.split(":")[0] for line in _facts(card)] == ["- `beta`"]
    assert "adapter facts were updated" in result.stderr


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
