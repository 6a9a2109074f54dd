"""Initial values of a new adapter (peft-format.md 4.6): LoRA's default and gaussian."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapterctl.engine.layers import param

if TYPE_CHECKING:
    from adapterctl.engine.model import AdapterModel
    from adapterctl.format.config import LoraConfig


def init_default(model: AdapterModel, name: str, config: LoraConfig) -> None:
    """A ~ kaiming-uniform(a=sqrt(5)) (gaussian: N(0, 1/r)), B = 0; embeddings A = 0, B ~ N(0, 1).

    `init_lora_weights: false` leaves both random (B non-zero), as PEFT does. DoRA magnitudes start
    at the row norm of W + sBA.
    """
    init = config.init_lora_weights
    with torch.no_grad():
        for _, layer in model.base_model.lora_layers():
            if name not in layer.r:
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
