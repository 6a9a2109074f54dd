"""The model card (README.md) written with an adapter (docs/peft-format.md §9), and kept by push.

Front matter as PEFT writes it (`library_name: peft`, `base_model`, tags, `pipeline_tag` for causal
LMs; adapterctl also tags the other task types), with these differences: `base_model` is written only
when it is a Hub id (a local path means nothing on the Hub, so a `base_model` or
`base_model:adapter:...` tag naming one is dropped), tags already in an existing card are kept (PEFT
replaces them: docs/peft-format.md, Trap T15), and the card holds an "adapter facts" block (r,
alpha, init, targets per adapter) that every writer (save, convert, select --rename, push)
rewrites, so a copied card never describes the adapter it was copied from.

Cards are untrusted: the front matter is YAML, parsed only after a bounded scan (size, nesting,
node count; no anchors or aliases, so no alias bomb; only the standard tags, so no
`!!python/object`), and every odd shape is one error naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from adapterctl.errors import AdapterctlError
from adapterctl.format.config import LoraConfig, residual_init
from adapterctl.format.layout import README_NAME, read_readme
from adapterctl.ops.checks import target_summary

_FRAMEWORK = "### Framework versions"
#: the framework heading counts only as a whole line (a label or config value in the text, inert
#: but possibly holding the same words, never splits the card)
_FRAMEWORK_LINE = re.compile("^" + re.escape(_FRAMEWORK) + r"[ \t]*\r?$", re.MULTILINE)
#: the Hub's pipeline tag for each PEFT task type
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_FACTS_START = "<!-- adapterctl: adapter facts (rewritten on every save, convert and push) -->"
_FACTS_END = "<!-- adapterctl: end of adapter facts -->"
#: the facts block: its markers count only as whole lines (a value in it is never a whole line)
_FACTS = re.compile(
    "^" + re.escape(_FACTS_START) + r"\r?\n.*?^" + re.escape(_FACTS_END) + r"[ \t]*(?:\r?\n|\Z)",
    re.DOTALL | re.MULTILINE,
)
#: the facts sentence older adapterctl versions wrote into a new card's first paragraph
_OLD_FACTS = re.compile(r" \(r=\d+, lora_alpha=[-+0-9.eE]+\)\.")
#: huggingface_hub's front matter block (repocard.REGEX_YAML_BLOCK)
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
MAX_FRONT_MATTER = 256 * 1024
_MAX_DEPTH = 32
_MAX_NODES = 20_000
_STANDARD_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")
)


class CardError(AdapterctlError):
    """A model card adapterctl cannot read or update."""


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id (bare names too) and not a local path; else None."""
    from adapterctl.ops.hub import is_repo_id

    return name if name and is_repo_id(name, bare=True) else None


# --- reading a card -----------------------------------------------------------------------------


def _bad(label: str, problem: str) -> CardError:
    return CardError(
        f"{label} is not a model card adapterctl can update: {problem}",
        hint="fix its front matter (YAML between --- lines) or remove it",
    )


def _scan(block: str, label: str) -> None:
    """Refuse, before any YAML object is built, what could blow up or run code."""
    import yaml

    if len(block) > MAX_FRONT_MATTER:
        raise _bad(label, f"its front matter is over {MAX_FRONT_MATTER // 1024} KiB")
    depth = nodes = 0
    try:
        for event in yaml.parse(block, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise _bad(label, "its front matter uses YAML anchors or aliases (`&`, `*`)")
            tag = getattr(event, "tag", None)
            if tag not in (None, "!") and tag not in _STANDARD_TAGS:
                raise _bad(label, f"its front matter uses the YAML tag {tag[:60]!r}")
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > _MAX_DEPTH:
                    raise _bad(label, f"its front matter nests deeper than {_MAX_DEPTH} levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent):
                nodes += 1
                if nodes > _MAX_NODES:
                    raise _bad(label, f"its front matter holds over {_MAX_NODES} values")
    except yaml.YAMLError as e:
        raise _bad(label, (str(e).strip().splitlines() or [type(e).__name__])[0]) from e
    except RecursionError as e:
        raise _bad(label, "its front matter nests too deeply") from e


def _check_shapes(data: Any, label: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise _bad(label, "its front matter is not a mapping of fields")
    for key in data:
        if not isinstance(key, str):
            raise _bad(label, f"its front matter has a field named {str(key)[:40]!r}, not a string")
    for field in ("tags", "base_model", "datasets", "language"):
        value = data.get(field)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(label, f"its `{field}` must be a string or a list of strings")


def check_front_matter(block: str, label: str) -> None:
    """The bounded scan, then the YAML (safe_load: now bounded) and the shapes of its fields."""
    import yaml

    _scan(block, label)
    try:
        _check_shapes(yaml.safe_load(block), label)
    except (ValueError, TypeError, RecursionError, yaml.YAMLError) as e:  # a date that is no date
        raise _bad(label, (str(e).strip().splitlines() or [type(e).__name__])[0]) from e


def refresh_card(existing: str, adapters: dict[str, LoraConfig], label: str) -> str:
    """`existing` with only its adapter facts rewritten (front matter checked, kept byte for byte):
    what convert and select write, without huggingface_hub."""
    match = _YAML_BLOCK.search(existing)
    if match:
        check_front_matter(match.group(2), label)
    head, body = (existing[: match.end()], existing[match.end() :]) if match else ("", existing)
    return head + _with_facts(body, facts_block(adapters))


def load_card(text: str, label: str) -> Any:
    """huggingface_hub's ModelCard for `text`, parsed only once the front matter has passed the
    bounded scan; `label` names the card in errors (a path in backticks, or a phrase)."""
    import yaml
    from huggingface_hub import ModelCard

    match = _YAML_BLOCK.search(text)
    if match:
        check_front_matter(match.group(2), label)
    try:
        return ModelCard(text)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, yaml.YAMLError) as e:
        # a constructor's error (a date that is no date, say) or a CardData field it refuses
        raise _bad(label, (str(e).strip().splitlines() or [type(e).__name__])[0]) from e


def read_card(directory: Path) -> str | None:
    """SOURCE/README.md (a regular file of at most 4 MiB inside SOURCE, UTF-8), or None when
    there is none (layout.read_readme)."""
    data = read_readme(directory)
    return None if data is None else decode_card(data, f"`{directory / README_NAME}`")


def decode_card(data: bytes, label: str) -> str:
    """A card's bytes as text: UTF-8, or an error naming the card (`label`)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(label, f"it is not UTF-8 ({e.reason} at byte {e.start})") from e


def card_tags(text: str | None, label: str = "the card") -> list[str]:
    """The tags in a card's front matter (none for no card or no front matter)."""
    if not text or not text.startswith("---"):
        return []
    tags: Any = getattr(load_card(text, label).data, "tags", None)
    return [str(t) for t in tags or []]


# --- writing a card -----------------------------------------------------------------------------


_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _visible(text: str) -> str:
    """`text` with every invisible or line-breaking character (controls, bidi overrides, U+2028)
    written as a \\uXXXX escape."""
    import unicodedata

    return "".join(
        (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        if unicodedata.category(c) in _HIDDEN
        else c
        for c in text
    )


def _escaped(value: str) -> str:
    """`value` on one line: JSON string escapes (newlines, quotes, backslashes), then `_visible`."""
    return _visible(json.dumps(value, ensure_ascii=False)[1:-1])


def inert(value: str) -> str:
    """A config string as a Markdown code span nothing in it can leave: escaped onto one line
    (`_escaped`), fenced with more backticks than its longest run of them."""
    text = _escaped(value) or '""'
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    if text[0] in "` " or text[-1] in "` ":
        text = f" {text} "  # CommonMark strips one space each side
    return f"{fence}{text}{fence}"


def _targets(config: LoraConfig) -> str:
    return target_summary(config, inert)


def _fact_line(name: str, config: LoraConfig) -> str:
    """One adapter's facts: numbers and flags as they are, every string through `inert`."""
    init = config.init_lora_weights
    parts = [f"r={config.r}", f"lora_alpha={config.lora_alpha}"]
    if config.rank_pattern:
        parts.append(f"rank_pattern for {len(config.rank_pattern)} pattern(s)")
    if config.alpha_pattern:
        parts.append(f"alpha_pattern for {len(config.alpha_pattern)} pattern(s)")
    for flag in ("use_rslora", "use_dora"):
        if getattr(config, flag):
            parts.append(flag)
    shown = inert(init) if isinstance(init, str) else str(init)
    parts.append(f"init_lora_weights={shown}" + (" (residual)" if residual_init(init) else ""))
    parts.append(f"target_modules: {_targets(config)}")
    return f"- {inert(name)}: " + ", ".join(parts)


def facts_block(adapters: dict[str, LoraConfig]) -> str:
    """The card's adapter facts: one line per adapter, between markers adapterctl rewrites."""
    lines = [_fact_line(name, config) for name, config in adapters.items()]
    return "\n".join([_FACTS_START, "## Adapter", "", *lines, _FACTS_END]) + "\n"


def _with_facts(body: str, block: str) -> str:
    body = _OLD_FACTS.sub(".", body, count=1)
    if _FACTS.search(body):
        return _FACTS.sub(lambda _: block, body, count=1)
    heading = _FRAMEWORK_LINE.search(body)
    if heading is not None:
        head, tail = body[: heading.start()], body[heading.start() :]
        return f"{head.rstrip()}\n\n{block}\n{tail}"
    return f"{body.rstrip()}\n\n{block}"


def _default_text(base: str | None) -> str:
    about = (
        f"a LoRA adapter for [{base}](https://huggingface.co/{base})" if base else "a LoRA adapter"
    )
    return f"# Model card\n\nThis repository holds {about} in the PEFT format.\n"


def _local_base_tag(tag: str, base: str | None) -> bool:
    """A `base_model:...:NAME` tag that names a local path, or another base than the card's."""
    kind, sep, name = tag.rpartition(":")
    if not sep or not kind.startswith("base_model"):
        return False
    return hub_id(name) is None or (base is not None and name != base)


def card_text(
    config: LoraConfig,
    existing: str | None,
    model_tags: list[str] | None = None,
    base_model: str | None = None,
    *,
    adapters: dict[str, LoraConfig] | None = None,
    label: str = "the card",
) -> str:
    """The README.md to write: `existing` (a card already there) updated, or a new one. The base
    model is `base_model` (a Hub id already checked), else the config's when it is a Hub id.
    `adapters` (name -> config; default: `config` as `default`) fill the adapter facts."""
    base = base_model or hub_id(config.base_model_name_or_path)
    body = existing if existing is not None else _default_text(base)
    if not body.startswith("---"):  # no front matter yet: start one
        body = f"---\nlibrary_name: peft\n---\n{body}"
    card = load_card(body, label)
    data: Any = card.data  # a CardData: fields are plain attributes
    data.library_name = "peft"
    old_base = getattr(data, "base_model", None)
    if base:
        data.base_model = base
    elif old_base is not None and not all(
        hub_id(b) for b in ([old_base] if isinstance(old_base, str) else old_base)
    ):
        data.base_model = None  # a local path means nothing on the Hub
    data.tags = _tags({*(data.tags or []), *(model_tags or [])}, base)
    pipeline = PIPELINE_TAGS.get(config.task_type or "")
    if pipeline and not getattr(data, "pipeline_tag", None):
        data.pipeline_tag = pipeline
    card.text = _with_facts(card.text, facts_block(adapters or {"default": config}))
    return _with_framework(str(card))


def new_card_text(
    config: LoraConfig,
    text: str | None = None,
    base_model: str | None = None,
    *,
    adapters: dict[str, LoraConfig] | None = None,
) -> str:
    """A new card whose body is `text` (Markdown without front matter, `\\n` line ends; None:
    the default body): what `card_text(config, text, base_model, adapters=adapters)` writes,
    without huggingface_hub (the front matter in its ModelCard's field order), for a command
    that needs no other part of it. Every untrusted string in `text` must have gone through
    `inert`."""
    import yaml

    base = base_model or hub_id(config.base_model_name_or_path)
    fields = {
        "library_name": "peft",
        "base_model": base,
        "pipeline_tag": PIPELINE_TAGS.get(config.task_type or ""),
        "tags": _tags(set(), base),
    }
    front = yaml.safe_dump(
        {k: v for k, v in fields.items() if v is not None}, allow_unicode=True, sort_keys=False
    ).strip()
    body = text if text is not None else _default_text(base)
    body = _with_facts(body, facts_block(adapters or {"default": config}))
    return _with_framework(f"---\n{front}\n---\n{body}")


def _tags(tags: set[str], base: str | None) -> list[str]:
    """A card's tags: `tags` (those it had, the model's) with PEFT's own, none naming a local
    path or another base, and the base's adapter tag."""
    tags = {t for t in tags | {"lora", "transformers"} if not _local_base_tag(str(t), base)}
    if base:
        tags.add(f"base_model:adapter:{base}")
    return sorted(tags)


def _with_framework(text: str) -> str:
    if _FRAMEWORK_LINE.search(text):
        return text
    from adapterctl.format.config import PEFT_VERSION
    from adapterctl.version import __version__

    return (
        text.rstrip("\n")
        + f"\n\n{_FRAMEWORK}\n\n- PEFT {PEFT_VERSION} (format)\n- adapterctl {__version__}\n"
    )


def _stated(existing: str) -> str | None:
    """The adapter facts `existing` states (its facts block's lines, or an older adapterctl's
    "(r=8, lora_alpha=16)."), one line, bounded; None when it states none."""
    block = _FACTS.search(existing)
    if block is not None:
        lines = [ln.strip() for ln in block.group(0).splitlines()[1:-1]]
        said = "; ".join(ln.removeprefix("- ") for ln in lines if ln.startswith("- "))
    else:
        sentence = _OLD_FACTS.search(existing)
        if sentence is None:
            return None
        said = sentence.group(0).strip(" ().")
    said = _visible(said) or "no adapters"
    return said if len(said) <= 300 else said[:300] + "..."


def facts_note(
    existing: str | None, adapters: dict[str, LoraConfig], written: str, source: str
) -> str | None:
    """What to tell the user when the card `written` (a phrase: "the card written to `OUT`")
    states other adapter facts than SOURCE's card (`source`, its path in backticks) did; None
    when SOURCE's card stated none, or the same ones."""
    if existing is None:
        return None
    old = _FACTS.search(existing)
    if old is not None:
        stated = old.group(0).replace("\r\n", "\n").rstrip("\n")
        stale = stated != facts_block(adapters).rstrip("\n")
    else:  # a card written by an older adapterctl: "(r=8, lora_alpha=16)."
        sentence = _OLD_FACTS.search(existing)
        first = next(iter(adapters.values()))
        stale = sentence is not None and sentence.group(0) != (
            f" (r={first.r}, lora_alpha={first.lora_alpha})."
        )
    said = _stated(existing)
    if not stale or said is None:
        return None
    now = "; ".join(_fact_line(n, c).removeprefix("- ") for n, c in adapters.items())
    return f"{written} has new adapter facts: {source} said {said}; now {now}"
