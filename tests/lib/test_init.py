"""get_adapter_model's initial values: LoRA's default, gaussian, PiSSA (full and randomized), OLoRA."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest

from tests.fixtures import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.slow


def _ours(fn: Any, **config: Any) -> Any:
    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig

    return get_adapter_model(fn(), LoraConfig(**config))


def _peft(fn: Any, **config: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(fn(), LoraConfig(**config))


def _layers(model: Any) -> dict[str, Any]:
    from adapterctl.engine.layers import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_default_init() -> None:
    model = _ours(tiny_llama, r=4, target_modules="all-linear")
    for layer in _layers(model).values():
        a, b = layer.factors("default")
        assert a.abs().max().item() <= 1 / math.sqrt(layer.in_features)
        assert b.abs().max().item() == 0


def test_gaussian_init() -> None:
    import torch

    model = _ours(tiny_llama, r=4, target_modules="all-linear", init_lora_weights="gaussian")
    a = torch.cat([layer.factors("default")[0].flatten() for layer in _layers(model).values()])
    assert abs(a.std().item() - 1 / 4) <= 0.1 / 4
    assert all(
        layer.factors("default")[1].abs().max().item() == 0 for layer in _layers(model).values()
    )


def _check_residual(fn: Any, model: Any, tol: float) -> None:
    """W_res + s B0 A0 equals the original weight (in (out, in) orientation)."""
    original = dict(fn().named_parameters())
    for path, layer in _layers(model).items():
        a, b = layer.factors("default")
        w = layer.base_weight_out_in() + layer.scaling["default"] * (b @ a)
        key = path.removeprefix("base_model.model.") + ".weight"
        w0 = original[key] if layer.kind == "linear" else original[key].T
        assert (w - w0).abs().max().item() <= tol, path


@pytest.mark.parametrize(
    ("init", "fn"), [("pissa", tiny_llama), ("olora", tiny_llama), ("pissa", tiny_gpt2)]
)
def test_residual_inits_equal_peft_up_to_sign(init: str, fn: Any) -> None:
    targets = ["c_attn"] if fn is tiny_gpt2 else ["q_proj", "v_proj"]
    ours = _ours(fn, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    ref = _peft(fn, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    _check_residual(fn, ours, 1e-5)
    theirs = dict(ref.named_modules())
    for path, layer in _layers(ours).items():
        peft_layer = theirs[path]
        a, b = layer.factors("default")
        pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        signs = (a * pa).sum(dim=1).sign()  # one sign per singular pair: rows of A, columns of B
        assert (a - signs[:, None] * pa).abs().max().item() <= 1e-4, path
        assert (b - pb * signs[None, :]).abs().max().item() <= 1e-4, path
        base, peft_base = layer.base_layer.weight, peft_layer.base_layer.weight
        assert (base - peft_base).abs().max().item() <= 1e-5, path


def test_randomized_pissa_reconstructs_the_weight() -> None:
    model = _ours(
        tiny_llama,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights="pissa_niter_4",
    )
    _check_residual(tiny_llama, model, 1e-5)


def test_olora_on_conv1d_decomposes_the_out_in_weight() -> None:
    import torch

    model = _ours(
        tiny_gpt2, r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="olora"
    )
    _check_residual(tiny_gpt2, model, 1e-5)
    original = dict(tiny_gpt2().named_parameters())
    for path, layer in _layers(model).items():
        w = original[path.removeprefix("base_model.model.") + ".weight"].T  # (out, in)
        q, r = torch.linalg.qr(w)
        a, b = layer.factors("default")
        assert (a - r[:4]).abs().max().item() <= 1e-5
        assert (b - q[:, :4]).abs().max().item() <= 1e-5


def test_a_new_pissa_adapter_computes_the_base() -> None:
    import torch

    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        expected = tiny_llama()(input_ids=ids).logits
        got = _ours(
            tiny_llama, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
        )(input_ids=ids).logits
    assert (expected - got).abs().max().item() <= 1e-4
