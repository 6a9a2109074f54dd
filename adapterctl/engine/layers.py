"""LoRA layers that wrap nn.Linear, transformers' Conv1D and nn.Embedding
(docs/peft-format.md §3.2, §3.3).

The attribute names and nesting follow PEFT's, so the in-memory state-dict keys are PEFT's keys
(`…q_proj.lora_A.default.weight`, `…lora_magnitude_vector.default.weight`,
`…lora_embedding_A.default`) and the stored<->memory key rules in `format.keys` apply unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from adapterctl.errors import IncompatibleModelError
from adapterctl.ops.merge import Kind, Step, bias_sequence, merge_sequence

_HALF = (torch.float16, torch.bfloat16)


def param(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A module's tensor attribute, typed (torch types `module.weight` as Tensor | Module)."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value


def onloaded(module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Inside the block the module's weights are real tensors, also when accelerate offloaded
    them (to the CPU or disk; a dispatched model keeps them on `meta` between forwards)."""
    if getattr(module, "_hf_hook", None) is None or not any(p.is_meta for p in module.parameters()):
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)  # type: ignore[no-any-return]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


class _FactorLinear(nn.Linear):
    """nn.Linear without the random init: adapter factors are loaded from a file, or set by
    `engine.init`, right after they are made (the init was half the cost of loading)."""

    def reset_parameters(self) -> None:
        return


def _zero_linear(n_in: int, n_out: int, bias: bool, device: Any, dtype: Any) -> nn.Linear:
    layer = _FactorLinear(n_in, n_out, bias=bias, device=device, dtype=dtype)
    if str(device) != "meta":
        with torch.no_grad():
            for p in layer.parameters():
                p.zero_()
    return layer


class DoraMagnitude(nn.Module):
    """Holds one adapter's DoRA magnitude as `.weight` (PEFT's in-memory key shape)."""

    def __init__(self, size: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))


class LoraLayer(nn.Module):
    """One wrapped base layer with any number of named adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.kind: Kind
        if isinstance(base_layer, nn.Embedding):
            self.kind = "embedding"
            self.in_features, self.out_features = (
                base_layer.num_embeddings,
                base_layer.embedding_dim,
            )
        elif is_conv1d(base_layer):
            self.kind = "conv1d"
            self.in_features, self.out_features = param(base_layer).shape
        elif isinstance(base_layer, nn.Linear):
            self.kind = "linear"
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:  # pragma: no cover - callers check `supported` first
            raise IncompatibleModelError(f"cannot wrap a {type(base_layer).__name__}")

    # --- adapters ---------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        use_dora: bool = False,
        lora_bias: bool = False,
        device: Any = None,
    ) -> None:
        weight = param(self.base_layer)
        device = weight.device if device is None else device
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.use_dora[name] = use_dora
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        if self.kind == "embedding":
            self.lora_embedding_A[name] = nn.Parameter(
                torch.zeros(r, self.in_features, device=device, dtype=dtype)
            )
            self.lora_embedding_B[name] = nn.Parameter(
                torch.zeros(self.out_features, r, device=device, dtype=dtype)
            )
        else:
            self.lora_A[name] = _zero_linear(self.in_features, r, False, device, dtype)
            self.lora_B[name] = _zero_linear(r, self.out_features, lora_bias, device, dtype)
        if use_dora:
            self.lora_magnitude_vector[name] = DoraMagnitude(self.out_features, device, dtype)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        for container in (
            self.lora_A,
            self.lora_B,
            self.lora_embedding_A,
            self.lora_embedding_B,
            self.lora_magnitude_vector,
            self.lora_dropout,
        ):
            if name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A (r, in) and B (out, r), for every kind of layer."""
        if self.kind == "embedding":
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return param(self.lora_A[name]), param(self.lora_B[name])

    def magnitude(self, name: str) -> torch.Tensor:
        return param(self.lora_magnitude_vector[name])

    # --- weights in (out, in) orientation ------------------------------------------------------

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in): Linear as is, Conv1D transposed, Embedding (dim, vocab)."""
        w = param(self.base_layer)
        return w if self.kind == "linear" else w.T

    def delta_out_in(self, name: str) -> torch.Tensor:
        """s * B @ A, shape (out, in), computed in the adapter's dtype (fp32 for half on CPU)."""
        a, b = self.factors(name)
        dtype = a.dtype
        if a.device.type == "cpu" and dtype in _HALF:
            delta: torch.Tensor = (self.scaling[name] * (b.float() @ a.float())).to(dtype)
            return delta
        out: torch.Tensor = self.scaling[name] * (b @ a)
        return out

    def _dora_norm(self, name: str, weight_out_in: torch.Tensor) -> torch.Tensor:
        """Row norm of W + sBA over the input dimension (per output feature)."""
        total = weight_out_in + self.delta_out_in(name).to(weight_out_in.dtype)
        norm: torch.Tensor = torch.linalg.norm(total, dim=1)
        return norm

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or not self.active_adapters:
            plain: torch.Tensor = self.base_layer(x, *args, **kwargs)
            return plain
        if self.kind == "embedding":
            return self._forward_embedding(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A or name in self.merged_adapters:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            s = self.scaling[name]
            xa = x.to(param(lora_a).dtype)
            if not self.use_dora[name]:
                result = result + lora_b(lora_a(dropout(xa))) * s
                continue
            # DoRA: y = (m / ||W + sBA||) * (W x + s B A x) + bias, the norm a constant
            with onloaded(self.base_layer):
                weight = self.base_weight_out_in()
                norm = self._dora_norm(name, weight.to(xa.dtype)).detach()
                if isinstance(dropout, nn.Identity) or not self.training:
                    base = result
                    bias = getattr(self.base_layer, "bias", None)
                    if isinstance(bias, torch.Tensor):
                        base = base - bias.to(base.device)
                else:
                    xa = dropout(xa)
                    base = F.linear(xa, weight.to(xa.dtype))
            scale = (self.magnitude(name) / norm).view(1, -1)
            lora = lora_b(lora_a(xa))  # no lora_bias with DoRA: the config refuses it
            result = result + (scale - 1) * base.to(scale.dtype) + scale * lora * s
        final: torch.Tensor = result.to(out_dtype)
        return final

    def _forward_embedding(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        assert isinstance(base, nn.Embedding)
        result = base(x, *args, **kwargs)
        out_dtype = result.dtype
        embed_scale = getattr(base, "embed_scale", None)
        for name in self.active_adapters:
            if name not in self.lora_embedding_A or name in self.merged_adapters:
                continue
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            s = self.scaling[name]
            after_a = F.embedding(
                x, a.T, base.padding_idx, base.max_norm, base.norm_type,
                base.scale_grad_by_freq, base.sparse,
            )  # fmt: skip
            delta = (after_a @ b.T) * s
            if isinstance(embed_scale, torch.Tensor):
                delta = delta * embed_scale.to(delta.dtype)
            if not self.use_dora[name]:
                result = result + delta
                continue
            with onloaded(base):
                weight = param(base)  # (vocab, dim)
                total = weight + self.delta_out_in(name).T.to(weight.dtype)
                norm = torch.linalg.norm(total, dim=0).detach()  # over the vocab, per embedding dim
            scale = (self.magnitude(name) / norm).view(1, -1)
            result = scale * (result + delta)
        final: torch.Tensor = result.to(out_dtype)
        return final

    # --- merging ----------------------------------------------------------------------------------

    def merged_weight(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight (and bias) with `names` merged in, in the base's storage orientation
        and dtype: `adapterctl.ops.merge`'s rule (the one `adapterctl merge` uses), on tensors."""
        stored = param(self.base_layer).detach()
        raw_bias = getattr(self.base_layer, "bias", None)
        stored_bias = raw_bias.detach() if isinstance(raw_bias, torch.Tensor) else None
        compute = torch.float32 if stored.dtype in _HALF else stored.dtype

        def store(x: torch.Tensor, dtype: torch.dtype = stored.dtype) -> torch.Tensor:
            return x.to(dtype).to(compute)

        def delta_store(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
            # factors kept in half precision (no autocast): PEFT rounds the delta to them
            return (lambda x: store(x, dtype)) if dtype in _HALF else (lambda x: x)

        steps = []
        bias_steps: list[tuple[torch.Tensor | None, float, bool]] = []
        for name in names:
            if name not in self.r:
                continue
            a, b = self.factors(name)
            dora = self.use_dora[name]
            steps.append(
                Step(
                    a.detach().to(compute),
                    b.detach().to(compute),
                    self.scaling[name],
                    self.magnitude(name).detach().to(compute) if dora else None,
                    delta_store(a.dtype),
                )
            )
            lora_bias = (
                None if self.kind == "embedding" else getattr(self.lora_B[name], "bias", None)
            )
            lb = lora_bias.detach().to(compute) if isinstance(lora_bias, torch.Tensor) else None
            bias_steps.append((lb, self.scaling[name], dora))
        weight = merge_sequence(self.kind, stored.to(compute), steps, store=store, norm=_norm)
        bias = stored_bias
        if stored_bias is not None and any(lb is not None for lb, _, _ in bias_steps):
            merged_bias = bias_sequence(
                stored_bias.to(compute), bias_steps, store=lambda x: store(x, stored_bias.dtype)
            )
            bias = merged_bias.to(stored_bias.dtype)
        return weight.to(stored.dtype), bias


def _norm(x: torch.Tensor, axis: int) -> torch.Tensor:
    norm: torch.Tensor = torch.linalg.norm(x, dim=axis)
    return norm


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: the original plus one trained copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        if self.active_adapter is None:
            self.active_adapter = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self.active_adapter
        if self.disabled or active is None or active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[active](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original_module, name)
