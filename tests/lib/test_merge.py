"""`adapterctl.merge` against PEFT's `merge_and_unload()` on tiny random models (the core set; the
full variant matrix is tests/lib/test_merge_parity.py)."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import peft_save, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.slow


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _save_base(model_fn: Callable[[], Any], out: Path, dtype: Any = None, **kwargs: Any) -> Path:
    def run() -> None:
        model = model_fn()
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(str(out), **kwargs)

    _quiet(run)
    return out


def _peft_merged(base: Path, adapter: Path, dtype: Any = None, names: list[str] | None = None):
    def run() -> dict[str, Any]:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or "auto")
        if names:
            pm = PeftModel.from_pretrained(
                model,
                str(adapter / names[0]) if names[0] != "default" else str(adapter),
                adapter_name=names[0],
            )
            for n in names[1:]:
                pm.load_adapter(str(adapter / n), adapter_name=n)
            merged = pm.merge_and_unload(adapter_names=names)
        else:
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}

    result: dict[str, Any] = _quiet(run)
    return result


def _output(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _stored(base: Path) -> dict[str, Any]:
    return _output(base)


def _compare(ours: dict[str, Any], peft: dict[str, Any], rel: float) -> None:
    import torch

    for key, value in ours.items():
        if key not in peft:
            continue
        ref = peft[key]
        assert value.dtype == ref.dtype, key
        assert value.shape == ref.shape, key
        err = (value.double() - ref.double()).norm() / max(ref.double().norm(), 1e-30)
        assert err <= rel, (key, float(err))
    assert torch.is_tensor(next(iter(ours.values())))


def _merge(base: Path, adapter: Path, out: Path, **kwargs: Any) -> Any:
    from adapterctl import merge

    return merge(base, adapter, out, **kwargs)


def _lora(
    tmp_path: Path, model_fn: Callable[[], Any], config: dict[str, Any], name: str = "a"
) -> Path:
    return peft_save(model_fn, tmp_path / name, {"default": config})


def test_importing_merge_imports_no_torch() -> None:
    import subprocess

    code = "import sys, adapterctl; adapterctl.merge; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_llama_lora_fp32_single_file_matches_peft(tmp_path: Path) -> None:
    base = _save_base(tiny_llama, tmp_path / "base")
    adapter = _lora(
        tmp_path, tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    )
    result = _merge(base, adapter, tmp_path / "out")
    assert result.shards == ["model.safetensors"]
    assert result.modules == {"linear": 6}
    assert result.tensors_merged == 6
    ours = _output(tmp_path / "out")
    peft = _peft_merged(base, adapter)
    _compare(ours, peft, 1e-6)
    stored = _stored(base)
    assert list(ours) == list(stored) or set(ours) == set(stored)
    # every tensor the adapter does not touch is a byte-for-byte copy
    for key, value in stored.items():
        if not any(m in key for m in ("q_proj", "v_proj", "down_proj")):
            assert ours[key].numpy().tobytes() == value.numpy().tobytes(), key
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert result.to_dict()["schema_version"] == 1


def test_sharded_base_and_output(tmp_path: Path) -> None:
    base = _save_base(tiny_llama, tmp_path / "base", max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").is_file()
    adapter = _lora(tmp_path, tiny_llama, {"r": 4, "target_modules": ["q_proj", "o_proj"]})
    result = _merge(base, adapter, tmp_path / "out", max_shard_size="30KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(result.shards) > 1
    assert result.shards[0] == f"model-00001-of-{len(result.shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(result.shards)
    assert index["metadata"]["total_size"] == result.bytes
    for shard in result.shards:
        data = (out / shard).read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        assert header["__metadata__"] == {"format": "pt"}
    _compare(_output(out), _peft_merged(base, adapter), 1e-6)
    # transformers loads it
    from transformers import AutoModelForCausalLM

    loaded = _quiet(lambda: AutoModelForCausalLM.from_pretrained(str(out)))
    assert loaded is not None


def test_gpt2_conv1d(tmp_path: Path) -> None:
    base = _save_base(tiny_gpt2, tmp_path / "base")
    adapter = _lora(tmp_path, tiny_gpt2, {"r": 4, "target_modules": ["c_attn", "c_proj"]})
    result = _merge(base, adapter, tmp_path / "out")
    assert result.modules == {"conv1d": 6}  # c_attn, attn.c_proj, mlp.c_proj
    _compare(_output(tmp_path / "out"), _peft_merged(base, adapter), 1e-6)


def test_dora_linear(tmp_path: Path) -> None:
    base = _save_base(tiny_llama, tmp_path / "base")
    adapter = _lora(
        tmp_path, tiny_llama, {"r": 4, "use_dora": True, "target_modules": ["q_proj", "up_proj"]}
    )
    result = _merge(base, adapter, tmp_path / "out")
    assert result.modules == {"dora_linear": 4}
    _compare(_output(tmp_path / "out"), _peft_merged(base, adapter), 1e-6)


def _ordered(t: Any) -> Any:
    """16-bit float bits as integers in the order of the values (ulp distance is a difference)."""
    import torch

    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _bits_identical(ours: dict[str, Any], peft: dict[str, Any], keys: list[str]) -> float:
    import torch

    same = total = 0
    for k in keys:
        a, b = ours[k], peft[k]
        assert a.dtype == b.dtype
        assert a.dtype in (torch.bfloat16, torch.float16)
        same += int((a.view(torch.int16) == b.view(torch.int16)).sum())
        total += a.numel()
        assert int((_ordered(a) - _ordered(b)).abs().max()) <= 1, k
    return same / total


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_half_base_is_rounded_once_as_peft_does(tmp_path: Path, name: str) -> None:
    import torch

    half = getattr(torch, name)

    base = _save_base(
        lambda: tiny_llama(hidden_size=64, intermediate_size=128), tmp_path / "base", half
    )
    adapter = _lora(
        tmp_path,
        lambda: tiny_llama(hidden_size=64, intermediate_size=128),
        {"r": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    )
    _merge(base, adapter, tmp_path / "out")
    ours = _output(tmp_path / "out")
    peft = _peft_merged(base, adapter)
    keys = [k for k in ours if any(m in k for m in ("q_proj", "v_proj", "up_proj"))]
    fraction = _bits_identical(ours, peft, keys)
    print(f"{name} bit-identical fraction: {fraction:.6f}")
    assert fraction >= 0.999
    # the engine's merge (load --merge-to, AdapterModel.merge_and_unload) is the same rule
    from transformers import AutoModelForCausalLM

    from adapterctl import AdapterModel

    def engine() -> dict[str, Any]:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=half)
        merged = AdapterModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}

    mine = _quiet(engine)
    assert _bits_identical(mine, peft, keys) >= 0.999


def test_dtype_cast_updates_config(tmp_path: Path) -> None:
    import torch

    base = _save_base(tiny_llama, tmp_path / "base")
    adapter = _lora(tmp_path, tiny_llama, {"r": 4, "target_modules": ["q_proj"]})
    result = _merge(base, adapter, tmp_path / "out", dtype="bfloat16")
    assert result.dtype == "bfloat16"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    ours = _output(tmp_path / "out")
    peft = _peft_merged(base, adapter, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in ours.values())
    keys = [k for k in ours if "q_proj" in k]
    assert _bits_identical(ours, peft, keys) >= 0.999


def test_quantized_base_is_refused(tmp_path: Path) -> None:
    from adapterctl.errors import IncompatibleModelError

    base = _save_base(tiny_llama, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    adapter = _lora(tmp_path, tiny_llama, {"r": 4, "target_modules": ["q_proj"]})
    with pytest.raises(IncompatibleModelError, match="quantized"):
        _merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_module_and_shapes(tmp_path: Path) -> None:
    from adapterctl.errors import IncompatibleModelError

    base = _save_base(lambda: tiny_llama(hidden_size=64), tmp_path / "base")
    adapter = _lora(tmp_path, tiny_llama, {"r": 4, "target_modules": ["q_proj"]})
    with pytest.raises(IncompatibleModelError, match=r"q_proj.*\[4, 32\].*\[64, 64\]"):
        _merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_passes_and_catches_a_planted_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterctl.ops.merge import VerificationFailed, stream

    base = _save_base(tiny_llama, tmp_path / "base")
    adapter = _lora(
        tmp_path,
        tiny_llama,
        {"r": 4, "use_dora": True, "target_modules": ["q_proj", "embed_tokens"]},
    )
    result = _merge(base, adapter, tmp_path / "ok", verify=True)
    assert result.verification is not None
    assert result.verification.passed
    assert result.verification.to_dict()["tensors"] == 3

    real = stream.Merger.apply

    def planted(self: Any, key: str, raw: Any, ops: Any) -> Any:
        out = real(self, key, raw, ops)
        if key.endswith("layers.1.self_attn.q_proj.weight"):
            from adapterctl.format.rawtensor import RawTensor, to_float32

            values = to_float32(out).copy()
            values[0, 0] += 1.0
            return RawTensor(out.dtype, out.shape, values)
        return out

    monkeypatch.setattr(stream.Merger, "apply", planted)
    with pytest.raises(VerificationFailed, match=r"layers\.1\.self_attn\.q_proj"):
        _merge(base, adapter, tmp_path / "bad", verify=True)
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad*"))


def test_output_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterctl.errors import OutputError
    from adapterctl.ops.merge import stream

    base = _save_base(tiny_llama, tmp_path / "base")
    adapter = _lora(tmp_path, tiny_llama, {"r": 4, "target_modules": ["v_proj"]})
    calls = []

    def failing(self: Any, key: str) -> Any:
        calls.append(key)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(self, key)

    real = stream.Merger.copied  # the tensors no adapter touches, written piece by piece
    monkeypatch.setattr(stream.Merger, "copied", failing)
    with pytest.raises(OutputError, match="No space left"):
        _merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"base", "a"}  # no temp left
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    from adapterctl.errors import AdapterctlError

    with pytest.raises(AdapterctlError, match="already exists"):
        _merge(base, adapter, tmp_path / "out")


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "bf16"])
def test_dora_after_lora_on_one_layer_in_order(tmp_path: Path, half: bool) -> None:
    import torch

    dtype = torch.bfloat16 if half else None
    base = _save_base(tiny_llama, tmp_path / "base", dtype)
    adapters = peft_save(
        tiny_llama,
        tmp_path / "multi",
        {
            "first": {"r": 4, "target_modules": ["q_proj"]},
            "second": {"r": 2, "use_dora": True, "target_modules": ["q_proj", "v_proj"]},
        },
    )
    result = _merge(
        base, adapters, tmp_path / "out", adapter_names=["first", "second"], verify=True
    )
    assert result.adapters == ["first", "second"]
    assert result.modules == {"linear": 2, "dora_linear": 4}
    ours = _output(tmp_path / "out")
    peft = _peft_merged(base, adapters, names=["first", "second"])
    if half:
        keys = [k for k in ours if "q_proj" in k or "v_proj" in k]
        assert _bits_identical(ours, peft, keys) >= 0.999
    else:
        _compare(ours, peft, 1e-6)


def test_tied_lm_head_is_merged_into_the_embedding_with_a_warning(tmp_path: Path) -> None:
    def model() -> Any:
        return tiny_llama(tie_word_embeddings=True)

    base = _save_base(model, tmp_path / "base")
    adapter = _lora(tmp_path, model, {"r": 4, "target_modules": ["lm_head"]})
    result = _merge(base, adapter, tmp_path / "out")
    assert any("tied" in w and "model.embed_tokens.weight" in w for w in result.warnings)
    ours = _output(tmp_path / "out")
    assert "lm_head.weight" not in ours
    _compare(ours, _peft_merged(base, adapter), 1e-6)


def test_bin_base_is_read_one_shard_at_a_time(tmp_path: Path) -> None:
    import torch

    base = _save_base(tiny_llama, tmp_path / "base")
    state = _output(base)
    (base / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, base / file)
        index["weight_map"].update(dict.fromkeys(part, file))
    (base / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    adapter = _lora(tmp_path, tiny_llama, {"r": 4, "target_modules": ["q_proj", "gate_proj"]})
    result = _merge(base, adapter, tmp_path / "out")
    assert result.shards == ["model.safetensors"]
    ours = _output(tmp_path / "out")
    assert set(ours) == set(state)
    _compare(ours, _peft_merged(base, adapter), 1e-6)


def test_a_classifier_the_base_lacks_is_added(tmp_path: Path) -> None:
    """A SEQ_CLS adapter on a causal-LM checkpoint: its trained `score` comes into the output."""

    def classifier() -> Any:
        import torch
        from transformers import LlamaForSequenceClassification

        torch.manual_seed(0)
        return LlamaForSequenceClassification(tiny_llama().config).eval()

    base = _save_base(tiny_llama, tmp_path / "base")
    adapter = _lora(
        tmp_path, classifier, {"r": 4, "target_modules": ["q_proj"], "task_type": "SEQ_CLS"}
    )
    result = _merge(base, adapter, tmp_path / "out")
    assert result.tensors_added == 1
    ours = _output(tmp_path / "out")
    stored = _output(adapter)
    assert (
        ours["score.weight"].numpy().tobytes()
        == stored["base_model.model.score.weight"].numpy().tobytes()
    )


def test_buffers_the_base_stores_are_kept_byte_for_byte(tmp_path: Path) -> None:
    """A stored buffer (an old checkpoint's `position_ids`) comes along, under its own name and
    dtype, even with --dtype (only float tensors are cast)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    base = _save_base(tiny_llama, tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.position_ids"] = np.arange(64, dtype=np.int64)[None]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = _lora(tmp_path, tiny_llama, {"r": 4, "target_modules": ["q_proj"]})
    result = _merge(base, adapter, tmp_path / "out", dtype="bfloat16")
    assert result.tensors_copied == len(tensors) - 2
    out = _output(tmp_path / "out")
    assert set(out) == set(tensors)
    kept = out["model.position_ids"].numpy()
    assert kept.dtype == np.int64
    assert kept.tobytes() == tensors["model.position_ids"].tobytes()


def test_dora_after_a_lora_bias_adapter_replays_the_bias_too(tmp_path: Path) -> None:
    """PEFT takes a lora_bias adapter out of the bias and puts it back when a DoRA adapter comes
    after it on the layer: in bfloat16 those roundings show, and both merges reproduce them."""
    import torch

    from adapterctl import AdapterModel

    def model() -> Any:
        return tiny_llama(attention_bias=True)

    base = _save_base(model, tmp_path / "base", torch.bfloat16)
    adapters = peft_save(
        model,
        tmp_path / "multi",
        {
            "first": {"r": 4, "target_modules": ["q_proj"], "lora_bias": True},
            "second": {"r": 2, "use_dora": True, "target_modules": ["q_proj"]},
        },
    )
    names = ["first", "second"]
    result = _merge(base, adapters, tmp_path / "out", adapter_names=names, verify=True)
    assert result.modules == {"linear": 2, "lora_bias": 2, "dora_linear": 2}
    ours = _output(tmp_path / "out")
    peft = _peft_merged(base, adapters, names=names)

    def engine() -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        wrapped = AdapterModel.from_pretrained(
            loaded, str(adapters / "first"), adapter_name="first"
        )
        wrapped.load_adapter(str(adapters / "second"), adapter_name="second")
        merged = wrapped.merge_and_unload(adapter_names=names)
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}

    mine = _quiet(engine)
    for key in [k for k in ours if "q_proj" in k]:
        assert torch.equal(ours[key], peft[key]), key
        assert torch.equal(mine[key], peft[key]), key


@pytest.mark.parametrize(
    "sizes", [[6, 6, 2, 6, 2, 2], [1] * 7, [11, 1, 10, 3], [5], [10, 10, 10]], ids=str
)
@pytest.mark.parametrize("limit", ["10", "10KB", "0.01MB"])
def test_shards_split_and_sizes_parse_as_huggingface_hub_does(sizes: list[int], limit: str) -> None:
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from huggingface_hub.serialization._base import parse_size_to_int

    from adapterctl.ops.merge import parse_size
    from adapterctl.ops.merge.shards import shard_names, split

    scale = 1 if limit == "10" else 1000
    state = {f"t{i}": n * scale for i, n in enumerate(sizes)}
    max_size = parse_size(limit)
    if limit != "10":
        assert max_size == parse_size_to_int(limit)
    theirs = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda n: n, get_storage_id=lambda n: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_size,
    )  # fmt: skip
    groups = split(list(state.items()), max_size)
    assert dict(zip(shard_names(len(groups)), groups, strict=True)) == theirs.filename_to_tensors


@pytest.mark.parametrize("dtype", [None, "bfloat16"], ids=["as-is", "cast"])
def test_an_untouched_tensor_is_copied_in_pieces(tmp_path: Path, dtype: str | None) -> None:
    """A 32 MiB tensor no adapter touches (an embedding, often a model's largest) goes through
    the merge in pieces: the merge's own allocations stay a few MiB, cast or not."""
    import json
    import tracemalloc

    import numpy as np

    from tests.helpers import Q, lora_tensors, write_adapter, write_tensors

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    big = np.arange(4096 * 2048, dtype=np.float32).reshape(4096, 2048)
    write_tensors(
        base / "model.safetensors",
        {"model.embed_tokens.weight": big, f"{Q}.weight": np.eye(8, dtype=np.float32)},
    )
    del big
    adapter = write_adapter(tmp_path / "a", lora_tensors())
    tracemalloc.start()
    try:
        result = _merge(base, adapter, tmp_path / "out", dtype=dtype)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.tensors_merged == 1
    assert result.tensors_copied == 1
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB"
    from adapterctl.format.tensors import SafetensorsReader

    with SafetensorsReader(tmp_path / "out" / "model.safetensors") as f:
        copied = f.array("model.embed_tokens.weight")
    if dtype is None:
        assert np.array_equal(copied, np.arange(4096 * 2048, dtype=np.float32).reshape(4096, 2048))
    else:
        assert copied.dtype == np.uint16
        assert copied.shape == (4096, 2048)
