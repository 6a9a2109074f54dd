"""LoRA variants adapterctl does not compute (issue 11, section 7): the field table against PEFT's
LoraConfig, refusals by name in the library, inspect naming them, and Git LFS pointers."""

from __future__ import annotations

import dataclasses
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from adapterctl.errors import AdapterFormatError, UnsupportedVariantError
from adapterctl.format.config import DEFAULTS, LoraConfig
from adapterctl.format.header import read_header
from adapterctl.format.tensors import load_bin
from adapterctl.format.variants import (
    BY_FIELD,
    COMPUTED,
    FIELDS,
    INERT,
    INIT_VARIANTS,
    VARIANT,
    refuse_variants,
    variants_in,
)
from adapterctl.ops.convert import convert_adapter
from adapterctl.ops.inspect import inspect_adapter
from adapterctl.ops.select import select_adapters
from tests.fixtures import tiny_llama
from tests.helpers import write_adapter
from tests.variant_adapters import ON_VALUES, PEFT_CASES, lfs_pointer, peft_variants, refusal

__all__ = ["peft_variants"]  # the session fixture, used below

VARIANT_FIELDS = sorted(r.field for r in FIELDS if r.kind == VARIANT)


def _peft_fields() -> dict[str, dataclasses.Field[Any]]:
    from peft import LoraConfig as PeftLoraConfig

    return {f.name: f for f in dataclasses.fields(PeftLoraConfig)}


# --- the table is PEFT's LoraConfig, field for field ------------------------------------------


def test_the_table_covers_exactly_the_installed_lora_config_fields() -> None:
    assert len(FIELDS) == len(BY_FIELD)  # no field twice
    assert set(BY_FIELD) == set(_peft_fields())  # fails when PEFT adds or drops a field
    assert {r.kind for r in FIELDS} == {COMPUTED, INERT, VARIANT}
    # what a saved config holds: every field but runtime_config (LoraConfig.to_dict drops it)
    assert set(BY_FIELD) - {"runtime_config"} == set(DEFAULTS)


def test_every_field_peft_marks_as_a_variant_is_computed_or_refused() -> None:
    fields = _peft_fields()
    marked = {n for n, f in fields.items() if f.metadata.get("is_lora_variant")}
    assert marked <= {r.field for r in FIELDS if r.kind == VARIANT} | {"use_dora"}
    assert BY_FIELD["use_dora"].kind == COMPUTED  # DoRA is computed (tests/lib/test_engine.py)
    assert set(fields["init_lora_weights"].metadata["lora_variants"]) <= set(INIT_VARIANTS)
    for rule in FIELDS:
        assert (rule.variant is not None) == (rule.kind == VARIANT), rule.field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (f, v)
        for f in VARIANT_FIELDS
        if f not in ("megatron_config", "target_parameters")  # PEFT needs megatron / a module
        for v in (None, {}, [], False, ON_VALUES[f])
    ],
)
def test_what_is_off_is_off_for_peft_too(field: str, value: Any) -> None:
    """The table's "off" agrees with PEFT's own test of the config it builds from the file."""
    from peft import LoraConfig as PeftLoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            built = PeftLoraConfig(r=4, target_modules=["q_proj"], **{field: value})
        except (TypeError, ValueError):
            return  # PEFT refuses the value outright
    peft_on = (
        getattr(built, field) is not None
        if field == "trainable_token_indices"
        else bool(getattr(built, field))
    )
    assert BY_FIELD[field].is_on(value) == peft_on


def test_on_values_cover_every_variant_field() -> None:
    assert sorted(ON_VALUES) == VARIANT_FIELDS


# --- every variant field and init value is refused by name ------------------------------------


def _variant_config(field: str) -> dict[str, Any]:
    if field.startswith("init:"):
        return {"init_lora_weights": field.removeprefix("init:")}
    return {field: ON_VALUES[field]}


ALL_VARIANTS = VARIANT_FIELDS + [f"init:{v}" for v in INIT_VARIANTS]


def _name(field: str) -> str:
    if field.startswith("init:"):
        value = field.removeprefix("init:")
        return f'{INIT_VARIANTS[value]} (`init_lora_weights: "{value}"`)'
    return f"{BY_FIELD[field].variant} (`{field}`)"


@pytest.mark.parametrize("field", ALL_VARIANTS)
def test_config_level_refusal_names_the_variant(field: str) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], **_variant_config(field))
    assert [str(v) for v in variants_in(config)] == [_name(field)]
    with pytest.raises(UnsupportedVariantError) as e:
        refuse_variants(config, "dir")
    assert e.value.message == f"`dir`: {refusal(_name(field))}"
    assert e.value.hint is not None
    assert "PEFT" in e.value.hint


@pytest.mark.parametrize("field", ALL_VARIANTS)
def test_inspect_names_it_and_convert_refuses_it(field: str, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "a", config=_variant_config(field))
    (report,) = inspect_adapter(src).adapters
    assert report.errors == []
    assert [p.message for p in report.problems] == [refusal(_name(field))]
    with pytest.raises(UnsupportedVariantError, match=re.escape(refusal(_name(field)))):
        convert_adapter(src, tmp_path / "out", dtype="bfloat16")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("field", ALL_VARIANTS)
def test_the_engine_refuses_to_build_it(field: str) -> None:
    from adapterctl.engine.model import get_adapter_model

    config = LoraConfig(r=4, target_modules=["q_proj"], **_variant_config(field))
    with pytest.raises(UnsupportedVariantError, match="which adapterctl does not compute"):
        get_adapter_model(tiny_llama(), config)


def test_several_variants_are_named_together() -> None:
    config = LoraConfig(r=4, kasa_config={}, use_bdlora={}, init_lora_weights="loftq")
    # in PEFT's field order, the init value last
    message = refusal(
        'BD-LoRA (`use_bdlora`), KaSA (`kasa_config`) and LoftQ (`init_lora_weights: "loftq"`)'
    )
    with pytest.raises(UnsupportedVariantError, match=f"^{re.escape(message)}$"):
        refuse_variants(config)


def test_off_values_are_plain_lora(tmp_path: Path) -> None:
    config = LoraConfig(
        r=4,
        alora_invocation_tokens=[],
        layer_replication=None,
        use_qalora=False,
        ensure_weight_tying=False,
        target_parameters=[],
        megatron_config={},
        eva_config={"rho": 2.0},  # initialisation only
        loftq_config={"loftq_bits": 4},  # ignored unless init_lora_weights is "loftq"
    )
    assert variants_in(config) == []
    refuse_variants(config)


# --- adapters PEFT wrote ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_variant_adapters(case: str, peft_variants: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    from adapterctl.engine.model import AdapterModel

    src = peft_variants[case]
    message = refusal(PEFT_CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(tiny_llama(), str(src))  # the oracle loads it...
    # ... so `inspect --check` passes, naming the variant, with no error for its own tensors
    (report,) = inspect_adapter(src).adapters
    assert report.errors == []
    assert [p.message for p in report.problems] == [message]
    assert not any(".lora_" in m.path for m in report.modules)  # lora_diag belongs to its module
    # ... and adapterctl refuses to compute it, by name
    with pytest.raises(UnsupportedVariantError) as e:
        AdapterModel.from_pretrained(tiny_llama(), src)
    assert e.value.message == f"`{src}`: {message}"
    with pytest.raises(UnsupportedVariantError, match="does not compute"):
        convert_adapter(src, tmp_path / "out", dtype="bfloat16")
    # a copy is exact for any variant
    select_adapters(src, tmp_path / "copy", ["default"])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "copy" / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.slow
def test_load_adapter_refuses_a_variant_next_to_a_plain_one(
    peft_variants: dict[str, Path], peft_adapters: dict[str, Path]
) -> None:
    from adapterctl.engine.model import AdapterModel

    model = AdapterModel.from_pretrained(tiny_llama(), peft_adapters["llama_basic"])
    with pytest.raises(UnsupportedVariantError, match=r"KaSA \(`kasa_config`\)"):
        model.load_adapter(peft_variants["kasa"], "kasa")
    assert list(model.peft_config) == ["default"]


def test_bdlora_shapes_still_checked_otherwise(tmp_path: Path) -> None:
    """Only the rank dimension is the variant's own: a missing factor is still an error."""
    import numpy as np

    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 8), "f4")
    }
    src = write_adapter(tmp_path / "a", tensors, {"use_bdlora": {"nblocks": 2}})
    (report,) = inspect_adapter(src).adapters
    assert any("has lora_A but no lora_B" in p.message for p in report.errors)


# --- Git LFS pointers ----------------------------------------------------------------------------

LFS_MESSAGE = "is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"


def test_a_safetensors_pointer_is_named(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(lfs_pointer())
    with pytest.raises(AdapterFormatError) as e:
        read_header(path)
    assert e.value.message == f"`{path}` {LFS_MESSAGE}"
    assert "header length" not in e.value.message


def test_a_bin_pointer_is_named(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(lfs_pointer())
    with pytest.raises(AdapterFormatError, match="Git LFS pointer"):
        load_bin(path)


def test_text_that_only_starts_like_a_pointer_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\nnot a pointer\n")
    with pytest.raises(AdapterFormatError) as e:
        read_header(path)
    assert "Git LFS" not in e.value.message
    assert "header length" in e.value.message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_every_file_command_names_the_pointer(fmt: str, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "a")
    (src / "adapter_model.safetensors").unlink()
    (src / f"adapter_model.{fmt}").write_bytes(lfs_pointer())
    match = "Git LFS pointer, not the weights"
    with pytest.raises(AdapterFormatError, match=match):
        inspect_adapter(src)
    with pytest.raises(AdapterFormatError, match=match):
        select_adapters(src, tmp_path / "s", ["default"])
    with pytest.raises(AdapterFormatError, match=match):
        convert_adapter(src, tmp_path / "c", dtype="bfloat16")
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_from_pretrained_names_the_pointer(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    from adapterctl.engine.model import AdapterModel

    src = tmp_path / "a"
    shutil.copytree(peft_adapters["llama_basic"], src)
    (src / "adapter_model.safetensors").write_bytes(lfs_pointer())
    with pytest.raises(AdapterFormatError, match="Git LFS pointer"):
        AdapterModel.from_pretrained(tiny_llama(), src)


def test_a_base_checkpoint_pointer_is_named(tmp_path: Path) -> None:
    """`convert --base` reads the base's shards through the same header reader."""
    from adapterctl.format.checkpoint import BaseCheckpoint

    (tmp_path / "model.safetensors").write_bytes(lfs_pointer(10**9))
    with pytest.raises(AdapterFormatError, match="Git LFS pointer, not the weights"):
        BaseCheckpoint(tmp_path)
