"""PiSSA/OLoRA to plain LoRA from the files alone, against PEFT's own conversion and the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapterctl.format.config import LoraConfig
from adapterctl.format.rawtensor import RawTensor
from adapterctl.format.tensors import SafetensorsReader, TensorSource, write_safetensors
from adapterctl.ops.convert import convert_tensors, converted_config
from tests.fixtures import residual_pair, tiny_llama

pytestmark = pytest.mark.slow


def _read(path: Path) -> dict[str, RawTensor]:
    with SafetensorsReader(path) as f:
        return {k: RawTensor(t.dtype, t.shape, f.array(k)) for k, t in f.tensors.items()}


def _write(directory: Path, tensors: dict[str, RawTensor], config: LoraConfig) -> Path:
    directory.mkdir(parents=True)
    sources = [TensorSource(k, t.dtype, t.shape, t.data.tobytes) for k, t in tensors.items()]
    with open(directory / "adapter_model.safetensors", "wb") as f:
        write_safetensors(f, sources)
    (directory / "adapter_config.json").write_text(config.to_json())
    return directory


def _pissa_pair(tmp_path: Path, **config: Any) -> tuple[Any, Path, Path, Path]:
    model, init, trained, converted = residual_pair(tmp_path, "pissa", **config)
    return model, init, trained, converted or tmp_path / "peft"


def _convert(init: Path, trained: Path, out: Path) -> Path:
    tc = LoraConfig.from_file(trained / "adapter_config.json")
    ic = LoraConfig.from_file(init / "adapter_config.json")
    tensors = convert_tensors(
        _read(trained / "adapter_model.safetensors"),
        _read(init / "adapter_model.safetensors"),
        tc,
        ic,
    )
    return _write(out, tensors, converted_config(tc, ic))


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits


def test_equal_to_peft_and_nothing_lost(tmp_path: Path) -> None:
    from adapterctl.engine.model import AdapterModel

    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
           "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"down_proj": 12}, "modules_to_save": ["lm_head"]}  # fmt: skip
    trained_model, init, trained, peft_dir = _pissa_pair(tmp_path, **cfg)
    ours = _convert(init, trained, tmp_path / "ours")
    theirs = _read(peft_dir / "adapter_model.safetensors")
    mine = _read(ours / "adapter_model.safetensors")
    for key, t in theirs.items():  # every factor PEFT writes, bit for bit
        assert mine[key].shape == t.shape
        assert mine[key].data.tobytes() == t.data.tobytes(), key
    # PEFT drops the lm_head copy (docs/peft-format.md, Trap T7)
    assert set(mine) - set(theirs) == {"base_model.model.lm_head.weight"}
    pc, mc = (
        LoraConfig.from_file(peft_dir / "adapter_config.json"),
        LoraConfig.from_file(ours / "adapter_config.json"),
    )
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert getattr(mc, field) == getattr(pc, field), field
    # the converted adapter on the ORIGINAL base computes what the trained PiSSA model computes
    loaded = AdapterModel.from_pretrained(tiny_llama(), ours)
    assert (_logits(loaded) - _logits(trained_model)).abs().max().item() <= 1e-5


def test_rslora_with_patterns_converts_exactly(tmp_path: Path) -> None:
    from adapterctl.engine.model import AdapterModel

    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True,
           "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"q_proj": 12}}  # fmt: skip
    trained_model, init, trained, _ = _pissa_pair(tmp_path, **cfg)
    ours = _convert(init, trained, tmp_path / "ours")
    loaded = AdapterModel.from_pretrained(tiny_llama(), ours)
    assert (_logits(loaded) - _logits(trained_model)).abs().max().item() <= 1e-5


def test_mismatched_pair_is_refused(tmp_path: Path) -> None:
    from adapterctl.errors import ConversionError

    _, init, trained, _ = _pissa_pair(tmp_path, r=4, target_modules=["q_proj"])
    tc = LoraConfig.from_file(trained / "adapter_config.json")
    t, i = _read(trained / "adapter_model.safetensors"), _read(init / "adapter_model.safetensors")
    i.pop(next(k for k in i if k.endswith("lora_B.weight")))
    with pytest.raises(ConversionError, match="not in the initial one"):
        convert_tensors(t, i, tc, tc)


def test_bf16_round_trip_matches_torch() -> None:
    import numpy as np
    import torch

    from adapterctl.format.dtypes import DTYPES
    from adapterctl.format.rawtensor import from_float, to_float32

    values = torch.randn(4096, dtype=torch.float32) * 10
    values[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    ours = from_float(values.numpy(), "BF16").data
    theirs = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.isnan(to_float32(RawTensor(DTYPES["BF16"], (4096,), ours))[0])
    assert (ours[1:] == theirs[1:]).all()


def test_save_pretrained_converts_with_the_same_function(tmp_path: Path) -> None:
    """The live adapter saved with path_initial_model_for_weight_conversion: the same file as the
    conversion from the two saved adapters, and the original base computes the trained model."""
    import torch

    from adapterctl.engine.model import AdapterModel

    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True}
    trained_model, init, trained, _ = _pissa_pair(tmp_path, **cfg)
    from_files = _convert(init, trained, tmp_path / "from_files")
    # our engine holding the trained PiSSA adapter (it re-decomposes the base, as PEFT does)
    with pytest.warns(UserWarning, match="residual"):
        live = AdapterModel.from_pretrained(tiny_llama(), trained)
    assert (_logits(live) - _logits(trained_model)).abs().max().item() <= 1e-5
    live.save_pretrained(tmp_path / "live", path_initial_model_for_weight_conversion=init)
    a = (tmp_path / "live" / "adapter_model.safetensors").read_bytes()
    b = (from_files / "adapter_model.safetensors").read_bytes()
    assert a == b
    # an initial adapter saved as .bin (PEFT reads both) converts to the same bytes
    import shutil

    from safetensors.torch import load_file

    init_bin = tmp_path / "init_bin"
    init_bin.mkdir()
    shutil.copyfile(init / "adapter_config.json", init_bin / "adapter_config.json")
    torch.save(load_file(str(init / "adapter_model.safetensors")), init_bin / "adapter_model.bin")
    live.save_pretrained(tmp_path / "live_bin", path_initial_model_for_weight_conversion=init_bin)
    assert (tmp_path / "live_bin" / "adapter_model.safetensors").read_bytes() == b
    loaded = AdapterModel.from_pretrained(tiny_llama(), tmp_path / "live")
    with torch.no_grad():
        assert (_logits(loaded) - _logits(trained_model)).abs().max().item() <= 1e-5


def test_convert_tensors_warns_like_convert(caplog: pytest.LogCaptureFixture) -> None:
    """save_pretrained's conversion says what `convert` says, e.g. that the pair names different
    bases (the output keeps the initial adapter's)."""
    import logging

    from adapterctl.format.dtypes import DTYPES
    from tests.helpers import Q, lora_tensors

    tensors = {
        k: RawTensor(DTYPES["F32"], tuple(v.shape), v.reshape(-1))
        for k, v in lora_tensors(Q).items()
    }
    trained = LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="pissa",
        base_model_name_or_path="me/residual",
    )  # fmt: skip
    initial = LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="org/original")
    with caplog.at_level(logging.WARNING, logger="adapterctl"):
        convert_tensors(tensors, tensors, trained, initial)
    assert any("me/residual" in r.message and "org/original" in r.message for r in caplog.records)
