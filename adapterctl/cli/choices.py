"""Shell completion for the options whose values are choices (`--dtype`, `--init`, ...).

Each list comes from the layer that checks the value, imported only when the shell asks, so
neither `--help` nor a run pays for it. The options stay plain `str` rather than Typer choices: a
choice would take them off plainparams' fast path (Typer then imports pydantic on every run) and
replace the library's messages (`--device: unknown device 'x'`, with its hint) by Typer's.
"""

from __future__ import annotations


def dtypes() -> list[str]:
    """--dtype of `load` and `save`: the base model's dtype."""
    from adapterctl.engine.base import DTYPES

    return list(DTYPES)


def cast_dtypes() -> list[str]:
    """--dtype of `convert`: what every tensor is cast to."""
    from adapterctl.format.rawtensor import CAST_TARGETS

    return list(CAST_TARGETS)


def merge_dtypes() -> list[str]:
    """--dtype of `merge`: auto keeps each tensor's dtype."""
    from adapterctl.ops.merge import DTYPE_CHOICES

    return list(DTYPE_CHOICES)


def devices() -> list[str]:
    """--device: the documented spellings (cuda:N and the rest are accepted too)."""
    return ["auto", "cpu", "cuda"]


def device_maps() -> list[str]:
    return ["auto"]


def model_classes() -> list[str]:
    from adapterctl.engine.base import MODEL_CLASSES

    return ["auto", *MODEL_CLASSES]


def new_inits() -> list[str]:
    """--init of `save` (pissa_niter_K with K the iterations: pissa_niter_4 as an example)."""
    from adapterctl.format.newconfig import INITS

    return [*INITS, "pissa_niter_4"]


def rebuilt_inits() -> list[str]:
    """--init of `convert --base`: the methods it can rebuild."""
    from adapterctl.ops.convert import REBUILDABLE

    return list(REBUILDABLE)


def biases() -> list[str]:
    from adapterctl.format.config import BIAS_VALUES

    return list(BIAS_VALUES)


def task_types() -> list[str]:
    from adapterctl.format.config import TASK_TYPES

    return list(TASK_TYPES)


def embedding_choices() -> list[str]:
    from adapterctl.format.newconfig import EMBEDDING_CHOICES

    return list(EMBEDDING_CHOICES)


def engines() -> list[str]:
    """--engine of `inspect`: the engines, each vLLM release with rules, each older PEFT."""
    from adapterctl.format.peftversions import RELEASES
    from adapterctl.ops.engines import ENGINES, TABLES

    vllm = [f"vllm@{release}" for release in TABLES["vllm"].releases]
    return [*ENGINES, *vllm, *(f"peft@{release}" for release in RELEASES)]


def peft_releases() -> list[str]:
    """--peft-version of `convert`: the PEFT releases whose configs adapterctl knows."""
    from adapterctl.format.peftversions import RELEASES

    return list(RELEASES)
