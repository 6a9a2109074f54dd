"""inspect_adapter against adapters written by PEFT: the true headers, PEFT's own r/alpha/scaling."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from adapterctl.errors import AdapterNotFoundError, SelectionError
from adapterctl.ops.inspect import inspect_adapter
from tests.fixtures import CASES
from tests.helpers import P, Q, lora_tensors, write_adapter

ALL = [*CASES, "llama_bf16", "llama_bin"]


def _true_tensors(path: Path) -> list[tuple[str, list[int], str]]:
    """What the weights file really holds, read by safetensors (or torch for .bin)."""
    import torch
    from safetensors import safe_open

    st = path / "adapter_model.safetensors"
    if st.exists():
        with safe_open(str(st), framework="pt") as f:
            items = [(k, f.get_slice(k)) for k in f.keys()]  # noqa: SIM118
            return sorted(
                (k, list(s.get_shape()), str(f.get_tensor(k).dtype).removeprefix("torch."))
                for k, s in items
            )
    sd = torch.load(path / "adapter_model.bin", weights_only=True)
    return sorted((k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items())


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL)
def test_tensors_equal_the_true_file(peft_adapters: dict[str, Path], case: str) -> None:
    report = inspect_adapter(peft_adapters[case], adapter="default")
    (adapter,) = report.adapters
    got = [(t.name, list(t.shape), t.dtype) for t in adapter.tensors]
    assert got == _true_tensors(peft_adapters[case])
    assert adapter.errors == []
    config = json.loads((peft_adapters[case] / "adapter_config.json").read_text())
    assert adapter.to_dict()["config"] == config
    assert adapter.format == ("bin" if case == "llama_bin" else "safetensors")


@pytest.mark.slow
def test_dtypes_and_sizes(peft_adapters: dict[str, Path]) -> None:
    (a,) = inspect_adapter(peft_adapters["llama_bf16"]).adapters
    assert {t.dtype for t in a.tensors} == {"bfloat16"}
    assert all(t.nbytes == t.numel * 2 for t in a.tensors)
    assert a.total_bytes == sum(t.nbytes for t in a.tensors)
    assert a.num_parameters == sum(t.numel for t in a.tensors)


def _peft_scalings(case_dir: Path, case: str) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(adapter, module) -> (r, alpha, scaling) as PEFT itself computes them after loading."""
    from peft import PeftModel

    model_fn, configs = CASES[case]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_fn(), str(case_dir), adapter_name="default")
        for name in configs:
            if name != "default":
                model.load_adapter(str(case_dir / name), adapter_name=name)
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            for name, s in module.scaling.items():
                out[(name, path)] = (module.r[name], module.lora_alpha[name], s)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama_dora_patterns", "llama_embed", "gpt2_conv1d", "multi"])
def test_rank_alpha_scaling_equal_peft(peft_adapters: dict[str, Path], case: str) -> None:
    expected = _peft_scalings(peft_adapters[case], case)
    got = {}
    for adapter in inspect_adapter(peft_adapters[case]).adapters:
        for m in adapter.modules:
            if m.r is not None:
                got[(adapter.name, m.path)] = (m.r, m.alpha, m.scaling)
    assert got.keys() == expected.keys()
    for key, (r, alpha, scaling) in expected.items():
        assert got[key][0] == r
        assert got[key][1] == alpha
        assert got[key][2] == pytest.approx(scaling, rel=1e-12)


@pytest.mark.slow
def test_kinds_of_peft_keys(peft_adapters: dict[str, Path]) -> None:
    kinds = {
        case: {
            k
            for a in inspect_adapter(peft_adapters[case]).adapters
            for m in a.modules
            for k in m.kinds
        }
        for case in ("llama_dora_patterns", "llama_embed", "llama_bias", "bert_seq_cls")
    }
    assert kinds["llama_dora_patterns"] == {
        "lora_A",
        "lora_B",
        "lora_magnitude_vector",
        "modules_to_save",
    }
    assert kinds["llama_embed"] == {
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "embedding",
    }
    assert kinds["llama_bias"] == {"lora_A", "lora_B", "lora_B.bias", "bias"}
    assert kinds["bert_seq_cls"] == {"lora_A", "lora_B", "modules_to_save"}


@pytest.mark.slow
def test_saved_embedding_is_reported_with_its_size(peft_adapters: dict[str, Path]) -> None:
    (a,) = inspect_adapter(peft_adapters["llama_embed"]).adapters
    msgs = [p.message for p in a.problems if p.severity == "warning"]
    assert any(
        "embed_tokens.base_layer.weight" in m and "[64, 32]" in m and "8.0 KiB" in m for m in msgs
    )


@pytest.mark.slow
def test_multi_adapter_directory(peft_adapters: dict[str, Path]) -> None:
    report = inspect_adapter(peft_adapters["multi"])
    assert [a.name for a in report.adapters] == ["default", "alpha", "beta"]
    assert [a.name for a in inspect_adapter(peft_adapters["multi"], "beta").adapters] == ["beta"]
    with pytest.raises(SelectionError, match="no adapter named `gamma`"):
        inspect_adapter(peft_adapters["multi"], "gamma")


def test_single_file_without_config(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterNotFoundError, match="no adapter"):
        inspect_adapter(d)
    (a,) = inspect_adapter(d / "adapter_model.safetensors").adapters
    assert a.config is None
    assert [m.r for m in a.modules] == [4]
    assert any("no `adapter_config.json`" in p.message for p in a.problems)


def test_overlapping_patterns_warn_and_resolve_in_file_order(tmp_path: Path) -> None:
    # docs/peft-format.md, Trap T1: PEFT tries keys in file order (sorted after a save), not in
    # training order.
    k = "model.layers.0.self_attn.q_proj"
    d = write_adapter(
        tmp_path / "a",
        lora_tensors(k, r=4),
        {"alpha_pattern": {"layers.0.self_attn.q_proj": 32, "q_proj": 16}},
    )
    (a,) = inspect_adapter(d).adapters
    (m,) = a.modules
    assert m.alpha == 32  # "layers.0..." sorts first
    assert m.scaling == 8.0
    assert any("several alpha_pattern keys" in p.message for p in a.problems)


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"r": 8}, None, "the config gives rank 8"),
        ({"rank_pattern": {"q_proj": 2}}, None, "rank_pattern key 'q_proj'"),
        ({"use_dora": True}, None, "no lora_magnitude_vector"),
        (
            {},
            {
                f"{P}{Q}.lora_A.weight": np.zeros((0, 8), "float32"),
                f"{P}{Q}.lora_B.weight": np.zeros((8, 0), "float32"),
            },
            "rank 0",
        ),
        ({}, {f"{P}{Q}.lora_A.weight": lora_tensors()[f"{P}{Q}.lora_A.weight"]}, "no lora_B"),
        (
            {},
            {f"model.{Q}.lora_A.weight": lora_tensors()[f"{P}{Q}.lora_A.weight"]},
            "does not start",
        ),
        ({}, {}, "holds no tensors"),
    ],
)
def test_errors(tmp_path: Path, config: dict, tensors: dict | None, message: str) -> None:
    (a,) = inspect_adapter(write_adapter(tmp_path / "a", tensors, config)).adapters
    assert any(message in p.message for p in a.errors), a.problems


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "pissa_niter_4"])
def test_residual_init_warns(tmp_path: Path, init: str) -> None:
    (a,) = inspect_adapter(
        write_adapter(tmp_path / "a", None, {"init_lora_weights": init})
    ).adapters
    assert a.errors == []
    assert any("re-decompose" in p.message for p in a.problems)


def test_unknown_keys_and_kinds_warn(tmp_path: Path) -> None:
    tensors = {**lora_tensors(), f"{P}model.norm.weight": lora_tensors()[f"{P}{Q}.lora_A.weight"]}
    d = write_adapter(tmp_path / "a", tensors)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["some_future_option"] = {"x": 1}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (a,) = inspect_adapter(d).adapters
    msgs = [p.message for p in a.problems if p.severity == "warning"]
    assert any("some_future_option" in m for m in msgs)
    assert any("model.norm.weight` is of no known kind" in m for m in msgs)
    assert a.to_dict()["config"]["some_future_option"] == {"x": 1}


def test_modules_to_save_listed_but_absent_is_a_warning(tmp_path: Path) -> None:
    # PEFT saves and reloads this when the base has no such module (e.g. "classifier" on Llama)
    (a,) = inspect_adapter(
        write_adapter(tmp_path / "a", None, {"modules_to_save": ["classifier"]})
    ).adapters
    assert a.errors == []
    assert any("no tensor for them is stored" in p.message for p in a.problems)


@pytest.mark.slow
def test_modules_to_save_matched_as_peft_matches(tmp_path: Path) -> None:
    from tests.fixtures import peft_save, tiny_llama

    d = peft_save(
        tiny_llama,
        tmp_path / "ln",
        {"default": {"r": 2, "target_modules": ["q_proj"], "modules_to_save": ["layernorm"]}},
    )
    (a,) = inspect_adapter(d).adapters
    assert a.problems == ()
    saved = [m.path for m in a.modules if m.kinds == ("modules_to_save",)]
    assert "model.layers.0.input_layernorm" in saved


def test_conv_factors_and_nested_wrappers(tmp_path: Path) -> None:
    conv = {
        f"{P}conv.lora_A.weight": np.zeros((2, 3, 3, 3), "float32"),
        f"{P}conv.lora_B.weight": np.zeros((8, 2, 1, 1), "float32"),
    }
    (a,) = inspect_adapter(
        write_adapter(tmp_path / "c", conv, {"r": 2, "target_modules": ["conv"]})
    ).adapters
    assert a.errors == []
    assert [m.r for m in a.modules] == [2]
    experts = {
        f"{P}m.experts.base_layer.lora_A.weight": np.zeros((6, 16), "float32"),
        f"{P}m.experts.base_layer.lora_B.weight": np.zeros((32, 6), "float32"),
        f"{P}m.experts.lora_A.weight": np.zeros((6, 32), "float32"),
    }
    cfg = {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": None,
        "target_parameters": ["experts.a", "experts.b"],
    }
    (a,) = inspect_adapter(write_adapter(tmp_path / "e", experts, cfg)).adapters
    assert {m.path: (m.r, m.scaling) for m in a.modules} == {
        "m.experts": (None, None),
        "m.experts.base_layer": (2, 2.0),
    }
    assert any("`m.experts` has lora_A but no lora_B" in p.message for p in a.errors)


def test_a_broken_subfolder_does_not_hide_the_others(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    (src / "checkpoint-10").mkdir()
    (src / "checkpoint-10" / "adapter_config.json").write_text("{}")
    assert [a.name for a in inspect_adapter(src).adapters] == ["default"]
