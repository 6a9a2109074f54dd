"""AdapterModel against PEFT's PeftModel on the same files: logits, merges, modes, errors."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapterctl.errors import AdapterctlError, IncompatibleModelError
from tests.fixtures import CASES, peft_save, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.slow

SINGLE = [c for c in CASES if c != "multi"]


def _ids() -> Any:
    import torch

    return torch.arange(12).reshape(2, 6) % 64


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        out = model(input_ids=_ids())
    return out.logits


def _peft(fn: Callable[[], Any], path: Path, **kwargs: Any) -> Any:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(fn(), str(path), **kwargs)


def _ours(fn: Callable[[], Any], path: Path, **kwargs: Any) -> Any:
    from adapterctl.engine.model import AdapterModel

    return AdapterModel.from_pretrained(fn(), path, **kwargs)


def _multi_loaded(src: Path) -> tuple[Any, Any, list[Any]]:
    """PEFT and us, each with the multi fixture's default loaded and alpha, beta added."""
    ref, ours = _peft(tiny_llama, src), _ours(tiny_llama, src)
    results = []
    for name in ("alpha", "beta"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.load_adapter(str(src / name), adapter_name=name)
        results.append(ours.load_adapter(src / name, adapter_name=name))
    return ref, ours, results


@pytest.mark.parametrize("case", SINGLE)
def test_logits_equal_peft(peft_adapters: dict[str, Path], case: str) -> None:
    fn, _ = CASES[case]
    ref, ours = _peft(fn, peft_adapters[case]), _ours(fn, peft_adapters[case])
    assert (_logits(ref) - _logits(ours)).abs().max().item() <= 1e-5
    assert ours.last_load.missing_keys == []


@pytest.mark.parametrize(
    "case",
    [
        "llama_basic",
        "llama_dora_patterns",
        "llama_embed",
        "llama_bias",
        "gpt2_conv1d",
        "llama_embed_dora",
        "bert_seq_cls",
    ],
)
def test_merge_equals_peft_merge(peft_adapters: dict[str, Path], case: str) -> None:
    fn, _ = CASES[case]
    ref = _peft(fn, peft_adapters[case]).merge_and_unload()
    ours = _ours(fn, peft_adapters[case]).merge_and_unload()
    assert type(ours) is type(ref)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for key in ref_sd:
        assert (ref_sd[key] - our_sd[key]).abs().max().item() <= 1e-6, key
    assert (_logits(ref) - _logits(ours)).abs().max().item() <= 1e-5


def test_several_adapters_switch_like_peft(peft_adapters: dict[str, Path]) -> None:
    ref, ours, results = _multi_loaded(peft_adapters["multi"])
    for result in results:
        assert result.missing_keys == []
        assert result.unexpected_keys == []
    assert ours.active_adapter == "default"  # loading does not activate (as in PEFT)
    assert not any(p.requires_grad for p in ours.parameters())  # loaded frozen, as PEFT does
    assert not any(m.training for m in ours.modules())
    for name in ("default", "alpha", "beta", "default"):
        ref.set_adapter(name)
        ours.set_adapter(name)
        assert (_logits(ref) - _logits(ours)).abs().max().item() <= 1e-5, name
    ours.delete_adapter("alpha")
    assert set(ours.peft_config) == {"default", "beta"}
    assert not any(".alpha." in k for k in ours.state_dict())
    with pytest.raises(AdapterctlError, match="no adapter named `alpha`"):
        ours.set_adapter("alpha")


def test_disable_adapter_gives_the_base(peft_adapters: dict[str, Path]) -> None:
    base = tiny_llama()
    expected = _logits(base)
    ours = _ours(tiny_llama, peft_adapters["llama_dora_patterns"])
    with ours.disable_adapter():
        assert (_logits(ours) - expected).abs().max().item() == 0
    assert (_logits(ours) - expected).abs().max().item() > 1e-4


def test_unload_gives_the_base_back(peft_adapters: dict[str, Path]) -> None:
    expected = _logits(tiny_llama())
    plain = _ours(tiny_llama, peft_adapters["llama_dora_patterns"]).unload()
    assert (_logits(plain) - expected).abs().max().item() == 0
    assert not any("lora_" in k for k in plain.state_dict())


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize(
    "case", ["llama_dora_patterns", "llama_bias", "gpt2_bias_all", "bert_seq_cls"]
)
def test_trainable_flags_match_peft(
    peft_adapters: dict[str, Path], case: str, trainable: bool
) -> None:
    fn, _ = CASES[case]
    ref = _peft(fn, peft_adapters[case], is_trainable=trainable)
    ours = _ours(fn, peft_adapters[case], is_trainable=trainable)
    want = {n for n, p in ref.named_parameters() if p.requires_grad}
    got = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert ours.training == ref.training
    if not trainable:
        # PEFT leaves bias="all"/"lora_only" biases trainable in inference mode; a loaded
        # adapter that is not trainable is frozen whole here
        assert got == set()
        assert want <= {n for n in want if n.endswith(".bias")}
        return
    assert got == want
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


def test_dropout_in_train_mode_matches_peft(peft_adapters: dict[str, Path]) -> None:
    import torch

    fn, _ = CASES["llama_all_linear"]
    ref = _peft(fn, peft_adapters["llama_all_linear"], is_trainable=True)
    ours = _ours(fn, peft_adapters["llama_all_linear"], is_trainable=True)
    ref.train()
    ours.train()
    torch.manual_seed(123)
    a = ref(input_ids=_ids()).logits
    torch.manual_seed(123)
    b = ours(input_ids=_ids()).logits
    assert (a - b).abs().max().item() <= 1e-5
    ours.eval()
    assert (b - ours(input_ids=_ids()).logits).abs().max().item() > 1e-6  # dropout was active


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_on_a_bf16_base(peft_adapters: dict[str, Path], autocast: bool) -> None:
    import torch

    def bf16() -> Any:
        return tiny_llama().to(torch.bfloat16)

    ref = _peft(bf16, peft_adapters["llama_basic"], autocast_adapter_dtype=autocast)
    ours = _ours(bf16, peft_adapters["llama_basic"], autocast_adapter_dtype=autocast)
    want = {n: p.dtype for n, p in ref.named_parameters() if "lora_" in n}
    got = {n: p.dtype for n, p in ours.named_parameters() if "lora_" in n}
    assert got == want
    assert (_logits(ref).float() - _logits(ours).float()).abs().max().item() <= 1e-2


def test_low_cpu_mem_usage(peft_adapters: dict[str, Path]) -> None:
    ref = _ours(tiny_llama, peft_adapters["llama_dora_patterns"])
    lean = _ours(tiny_llama, peft_adapters["llama_dora_patterns"], low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in lean.parameters())
    assert (_logits(ref) - _logits(lean)).abs().max().item() == 0


def test_adapter_for_another_base_is_refused(peft_adapters: dict[str, Path]) -> None:
    with pytest.raises(IncompatibleModelError, match="no module of the LlamaForCausalLM matches"):
        _ours(tiny_llama, peft_adapters["gpt2_conv1d"])


def test_shape_mismatch_names_module_and_shapes(peft_adapters: dict[str, Path]) -> None:
    def wider() -> Any:
        return tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)

    with pytest.raises(
        IncompatibleModelError, match=r"q_proj.*expects \[4, 48\] but the file has \[4, 32\]"
    ):
        _ours(wider, peft_adapters["llama_basic"])


def test_missing_keys_warn_like_peft(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = peft_adapters["llama_basic"]
    d = tmp_path / "partial"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    sd = load_file(str(src / "adapter_model.safetensors"))
    dropped = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del sd[dropped]
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="Found missing adapter keys"):
        ours = _ours(tiny_llama, d)
    assert ours.last_load.missing_keys == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    ]


def test_load_returns_the_keys_instead_of_warning(
    peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from adapterctl.engine.model import AdapterModel

    src = peft_adapters["multi"]
    d = tmp_path / "partial"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((src / "beta" / "adapter_config.json").read_bytes())
    sd = load_file(str(src / "beta" / "adapter_model.safetensors"))
    del sd["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Found missing adapter keys": the result says it
        loaded = AdapterModel.load(tiny_llama(), d, adapter_name="b", is_trainable=True)
    assert loaded.directory == d
    assert loaded.load_result.adapter_name == "b"
    assert loaded.load_result.missing_keys == [
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.b.weight"
    ]
    assert loaded.model.last_load is None  # only from_pretrained, PEFT's API, sets it
    assert loaded.model.get_nb_trainable_parameters()[0] > 0
    found = AdapterModel.load(tiny_llama(), src, hub={"subfolder": "beta"})
    assert found.directory == src / "beta"
    assert found.load_result.missing_keys == []
    with pytest.raises(TypeError):
        AdapterModel.load(tiny_llama(), src, "b")  # type: ignore[misc]


def test_unknown_kwargs_and_remote_ids_fail_clearly(peft_adapters: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="unexpected keyword arguments: bogus"):
        _ours(tiny_llama, peft_adapters["llama_basic"], bogus=1)
    with pytest.raises(AdapterctlError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        _ours(tiny_llama, "someuser/some-adapter")
    with pytest.raises(AdapterctlError, match="ephemeral_gpu_offload"):
        _ours(tiny_llama, peft_adapters["llama_basic"], ephemeral_gpu_offload=True)


def test_subfolder_loads_one_adapter_of_a_directory(peft_adapters: dict[str, Path]) -> None:
    ref = _peft(tiny_llama, peft_adapters["multi"] / "beta")
    ours = _ours(tiny_llama, peft_adapters["multi"], subfolder="beta", adapter_name="b")
    assert ours.active_adapter == "b"
    assert (_logits(ref) - _logits(ours)).abs().max().item() <= 1e-5


def test_get_adapter_model_starts_as_the_base() -> None:
    import math

    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig

    expected = _logits(tiny_llama())
    model = get_adapter_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])
    )
    assert (_logits(model) - expected).abs().max().item() == 0  # B = 0 (embeddings: A = 0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.abs().max().item() <= 1 / math.sqrt(32)


def test_fixture_bases_are_deterministic() -> None:
    # every parity test builds the base twice (once for PEFT, once for us): they must be equal
    assert (_logits(tiny_gpt2()) - _logits(tiny_gpt2())).abs().max().item() == 0


def test_peft_save_helper_writes_subfolders(tmp_path: Path) -> None:
    out = peft_save(tiny_llama, tmp_path / "x", {"a": {"r": 2, "target_modules": ["q_proj"]}})
    assert (out / "a" / "adapter_config.json").is_file()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_redecompose_like_peft(tmp_path: Path, init: str) -> None:
    out = peft_save(
        tiny_llama,
        tmp_path / init,
        {
            "default": {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj", "v_proj"],
                "init_lora_weights": init,
            }
        },
    )
    ref = _peft(tiny_llama, out)
    with pytest.warns(UserWarning, match="replaced by their residual"):
        ours = _ours(tiny_llama, out)
    assert (_logits(ref) - _logits(ours)).abs().max().item() <= 1e-5
    base_ref = ref.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    base_ours = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert (base_ref - base_ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda"])
def test_random_or_data_dependent_inits_are_refused(tmp_path: Path, init: str) -> None:
    from tests.helpers import write_adapter

    d = write_adapter(tmp_path / "a", config={"init_lora_weights": init})
    with pytest.raises(AdapterctlError, match=f"'{init}'") as e:
        _ours(tiny_llama, d)
    assert "adapterctl convert" in (e.value.hint or "")


def test_pissa_on_gpt2_conv1d(tmp_path: Path) -> None:
    out = peft_save(
        tiny_gpt2,
        tmp_path / "g",
        {"default": {"r": 4, "target_modules": ["c_attn"], "init_lora_weights": "pissa"}},
    )
    ref = _peft(tiny_gpt2, out)
    with pytest.warns(UserWarning, match="residual"):
        ours = _ours(tiny_gpt2, out)
    assert (_logits(ref) - _logits(ours)).abs().max().item() <= 1e-5


def test_architectures_with_key_conversion_are_refused(tmp_path: Path) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.helpers import write_adapter

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, num_local_experts=2,
    )  # fmt: skip
    d = write_adapter(tmp_path / "a")
    with pytest.raises(IncompatibleModelError, match="`mixtral`"):
        _ours(lambda: MixtralForCausalLM(config), d)


def test_merge_named_adapters_like_peft(peft_adapters: dict[str, Path]) -> None:
    ref, ours, _ = _multi_loaded(peft_adapters["multi"])
    # beta (plain) first, then alpha (DoRA): its norm is taken on the unmerged weight
    merged_ref = ref.merge_and_unload(adapter_names=["beta", "alpha"])
    merged_ours = ours.merge_and_unload(adapter_names=["beta", "alpha"])
    a, b = merged_ref.state_dict(), merged_ours.state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_target_parameters_are_refused(tmp_path: Path) -> None:
    from tests.helpers import write_adapter

    d = write_adapter(
        tmp_path / "a", config={"target_modules": None, "target_parameters": ["q_proj.weight"]}
    )
    with pytest.raises(AdapterctlError, match="target_parameters"):
        _ours(tiny_llama, d)


def test_merging_dora_after_another_adapter_on_one_layer(tmp_path: Path) -> None:
    cfgs = {
        "default": {"r": 4, "target_modules": ["q_proj"]},
        "d": {"r": 2, "target_modules": ["q_proj"], "use_dora": True},
    }
    src = peft_save(tiny_llama, tmp_path / "two", cfgs)
    ref, ours = _peft(tiny_llama, src), _ours(tiny_llama, src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_adapter(str(src / "d"), adapter_name="d")
    ours.load_adapter(src / "d", adapter_name="d")
    a = ref.merge_and_unload(adapter_names=["default", "d"]).state_dict()
    b = ours.merge_and_unload(adapter_names=["default", "d"]).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
