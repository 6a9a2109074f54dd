"""The model card (README.md) written with an adapter (peft-format.md section 9), and kept by push.

Front matter as PEFT writes it (`library_name: peft`, `base_model`, tags, `pipeline_tag` for causal
LMs; adapterctl also tags the other task types), with two differences: `base_model` is written only when it is a Hub id (a local path means
nothing on the Hub), and tags already in an existing card are kept (PEFT replaces them: Trap T15).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterctl.format.config import LoraConfig

_FRAMEWORK = "### Framework versions"
#: the Hub's pipeline tag for each PEFT task type
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id (bare names too) and not a local path; else None."""
    from adapterctl.ops.hub import is_repo_id

    return name if name and is_repo_id(name, bare=True) else None


def _default_text(config: LoraConfig, base: str | None) -> str:
    about = (
        f"a LoRA adapter for [{base}](https://huggingface.co/{base})" if base else "a LoRA adapter"
    )
    return (
        f"# Model card\n\nThis repository holds {about} in the PEFT format "
        f"(r={config.r}, lora_alpha={config.lora_alpha}).\n"
    )


def card_text(
    config: LoraConfig,
    existing: str | None,
    model_tags: list[str] | None = None,
    base_model: str | None = None,
) -> str:
    """The README.md to write: `existing` (a card already there) updated, or a new one. The base
    model is `base_model` (a Hub id already checked), else the config's when it is a Hub id."""
    from huggingface_hub import ModelCard

    base = base_model or hub_id(config.base_model_name_or_path)
    body = existing if existing is not None else _default_text(config, base)
    if not body.startswith("---"):  # no front matter yet: start one
        body = f"---\nlibrary_name: peft\n---\n{body}"
    card = ModelCard(body)
    data: Any = card.data  # a CardData: fields are plain attributes
    data.library_name = "peft"
    if base:
        data.base_model = base
    tags = set(data.tags or []) | set(model_tags or []) | {"lora", "transformers"}
    if base:
        tags.add(f"base_model:adapter:{base}")
    data.tags = sorted(tags)
    pipeline = PIPELINE_TAGS.get(config.task_type or "")
    if pipeline and not getattr(data, "pipeline_tag", None):
        data.pipeline_tag = pipeline
    text = str(card)
    if _FRAMEWORK not in text:
        from adapterctl.format.config import PEFT_VERSION
        from adapterctl.version import __version__

        text = (
            text.rstrip("\n")
            + f"\n{_FRAMEWORK}\n\n- PEFT {PEFT_VERSION} (format)\n- adapterctl {__version__}\n"
        )
    return text


def read_card(directory: Path) -> str | None:
    path = directory / "README.md"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def card_tags(text: str | None) -> list[str]:
    """The tags in a card's front matter (none for no card or no front matter)."""
    if not text or not text.startswith("---"):
        return []
    from huggingface_hub import ModelCard

    tags: Any = getattr(ModelCard(text).data, "tags", None)
    return [str(t) for t in tags or []]
