"""Initial values of a new adapter (docs/peft-format.md §4.6): LoRA's default and gaussian."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapterctl.engine.layers import LoraLayer, param
from adapterctl.format.config import is_pissa_niter, pissa_niter

if TYPE_CHECKING:
    from adapterctl.engine.model import AdapterModel
    from adapterctl.format.config import LoraConfig


def init_default(model: AdapterModel, name: str, config: LoraConfig) -> None:
    """A ~ kaiming-uniform(a=sqrt(5)) (gaussian: N(0, 1/r)), B = 0; embeddings A = 0, B ~ N(0, 1).

    `init_lora_weights: false` leaves both random (B non-zero), as PEFT does. DoRA magnitudes start
    at the row norm of W + sBA.
    """
    init = config.init_lora_weights
    # pissa/olora: A0, B0 were set from the base by `decompose`
    residual = init in RESIDUAL_METHODS or is_pissa_niter(init)
    with torch.no_grad():
        for _, layer in model.base_model.lora_layers():
            if name not in layer.r or (residual and layer.kind != "embedding"):
                continue
            if layer.kind == "embedding":
                a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
                if init is False:
                    nn.init.normal_(a)
                    nn.init.normal_(b)
                else:
                    nn.init.zeros_(a)
                    nn.init.normal_(b)
            else:
                a, b = param(layer.lora_A[name]), param(layer.lora_B[name])
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / layer.r[name])
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                if init is False:
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                else:
                    nn.init.zeros_(b)
                if getattr(layer.lora_B[name], "bias", None) is not None:
                    nn.init.zeros_(param(layer.lora_B[name], "bias"))
            if layer.use_dora[name]:
                if layer.kind == "embedding":
                    total = param(layer.base_layer) + layer.delta_out_in(name).T
                    norm = torch.linalg.norm(total, dim=0)
                else:
                    norm = layer._dora_norm(name, layer.base_weight_out_in().to(a.dtype))
                layer.magnitude(name).copy_(norm)


#: init_lora_weights values with no effect on the base model when an adapter is loaded.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
#: values that rewrite the base into a residual when the layer is built (docs/peft-format.md §7.1).
RESIDUAL_METHODS = ("pissa", "olora")


def check_init(config: LoraConfig, *, loading: bool = True) -> str | None:
    """The residual method a config asks for (pissa/olora, and pissa_niter_K when creating a new
    adapter), None for plain inits; else an error."""
    from adapterctl.errors import AdapterctlError

    init = config.init_lora_weights
    if init in PLAIN_INITS:
        return None
    if init in RESIDUAL_METHODS:
        return str(init)
    if not loading and pissa_niter(init) is not None:
        return str(init)
    from adapterctl.ops.convert import irreproducible

    reason = irreproducible(init)
    if reason is not None:  # PEFT would decompose the base again to load it
        raise AdapterctlError(
            f"`init_lora_weights` is {init!r}: loading it means decomposing the base again, and "
            f"{reason}",
            hint="convert it to plain LoRA with `adapterctl convert`, then load the result",
        )
    raise AdapterctlError(f"`init_lora_weights` {init!r} is not supported by adapterctl")


def decompose(layer: LoraLayer, name: str, method: str) -> None:
    """PiSSA / OLoRA: set A0, B0 from the base weight and replace the base by the residual.

    PiSSA: W = U S Vh (full SVD of the (out, in) weight), A0 = sqrt(S_r/s) Vh_r,
    B0 = U_r sqrt(S_r/s); pissa_niter_K the same from a randomized SVD (torch.svd_lowrank, K
    iterations). OLoRA: W = QR, A0 = R_r, B0 = Q_r.
    Either way W_res = W - s B0 A0, written back in the weight's dtype and orientation.
    """
    from adapterctl.errors import IncompatibleModelError

    base = param(layer.base_layer)
    dtype = base.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise IncompatibleModelError(f"{method} needs a float32/16 or bfloat16 base, not {dtype}")
    r, s = layer.r[name], layer.scaling[name]
    # every method works on the (out, in) weight; PEFT's OLoRA takes a Conv1D weight as stored,
    # (in, out), which is the wrong orientation (it then fails to load its own adapter)
    w = layer.base_weight_out_in().to(torch.float32)
    if method == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(sv[:r] / s)
        a0 = torch.diag(root) @ vh[:r]
        b0 = u[:, :r] @ torch.diag(root)
    elif is_pissa_niter(method):
        niter = pissa_niter(method)
        if niter is None:  # check_init lets only pissa_niter_K through
            raise ValueError(f"{method!r} is not pissa_niter_K")
        u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)
        root = torch.sqrt(sv / s)
        a0 = torch.diag(root) @ v.T
        b0 = u @ torch.diag(root)
    else:
        q, rr = torch.linalg.qr(w)
        a0, b0 = rr[:r].contiguous(), q[:, :r].contiguous()
    with torch.no_grad():
        param(layer.lora_A[name]).copy_(a0)
        param(layer.lora_B[name]).copy_(b0)
        if dtype == torch.float32:
            # in place, with no full-size temporary: W -= s B0 A0 (Conv1D stores Wᵀ)
            if layer.kind == "linear":
                base.addmm_(b0, a0, alpha=-s)
            else:
                base.addmm_(a0.T, b0.T, alpha=-s)
        else:
            residual = w.addmm(b0, a0, alpha=-s)
            stored = residual if layer.kind == "linear" else residual.T
            base.data = stored.to(dtype).contiguous()


def decompose_all(model: AdapterModel, name: str, method: str) -> list[str]:
    """Run `decompose` on every Linear/Conv1D layer of adapter `name`; returns their paths."""
    done = []
    for path, layer in model.base_model.lora_layers():
        if name in layer.r and layer.kind != "embedding":
            decompose(layer, name, method)
            done.append(path)
    return done
