"""The model card a combine writes: the base model where the sources agree on one, and how the
adapter was made (the method and its parameters, each source as it was named with its weight).
Source names are untrusted text: each goes through `ops.card.inert`."""

from __future__ import annotations

from adapterctl.ops.card import hub_id, inert, new_card_text
from adapterctl.ops.combine.methods import METHODS
from adapterctl.ops.combine.plan import Plan


def agreed_base(plan: Plan) -> str | None:
    """The base model every source that names one names (None when they differ or none does)."""
    bases = {s.config.base_model_name_or_path for s in plan.sources} - {None}
    return bases.pop() if len(bases) == 1 else None


def _how(plan: Plan, asked: str) -> str:
    method = plan.method
    needs_density, uses_sign = METHODS[method]
    parts = [f"method `{method}`"]
    if method != asked:
        parts[0] += f" (asked: `{asked}`; one source is combined linearly, as PEFT does)"
    if needs_density:
        parts.append(f"density {plan.options.density!r}")
    if uses_sign:
        parts.append(f"majority sign method `{plan.options.sign_method}`")
    if method.startswith("dare"):
        parts.append(f"seed {plan.options.seed}")
    if method.endswith("svd"):
        parts.append(f"rank {plan.svd_rank}")
    return ", ".join(parts)


def combine_card(plan: Plan, labels: list[str], asked: str) -> str:
    """The README.md of the combined adapter (`labels`: the sources as they were named)."""
    base = hub_id(agreed_base(plan))
    about = (
        f"a LoRA adapter for [{base}](https://huggingface.co/{base})" if base else "a LoRA adapter"
    )
    sources = [
        f"- {inert(label)} with weight {weight!r}"
        for label, weight in zip(labels, plan.options.weights, strict=True)
    ]
    text = "\n".join(
        [
            "# Model card",
            "",
            f"This repository holds {about} in the PEFT format, combined from "
            f"{len(labels)} adapter{'s' if len(labels) != 1 else ''} by `adapterctl combine`.",
            "",
            "## Combination",
            "",
            _how(plan, asked) + ", from:",
            "",
            *sources,
            "",
        ]
    )
    config = plan.config.replace(base_model_name_or_path=agreed_base(plan))
    return new_card_text(config, text, base)
