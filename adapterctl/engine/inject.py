"""LoraModel: the transformers model with LoRA layers injected where an adapter's config says
(PEFT's `LoraModel`): injection, modules_to_save wrappers, and walks over what was injected."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from adapterctl.engine.layers import LoraLayer, ModulesToSaveWrapper, supported
from adapterctl.engine.targets import is_target, resolve_target_modules, stored_target_modules
from adapterctl.errors import IncompatibleModelError
from adapterctl.format.config import LoraConfig

_ADAPTER_PARAMS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)


def _outer_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the insides of LoRA layers and modules_to_save wrappers, so that a
    new adapter never targets another adapter's internals (and the walk does not grow with them)."""
    yield prefix, root
    if isinstance(root, (LoraLayer, ModulesToSaveWrapper)):
        return
    for name, child in root.named_children():
        yield from _outer_modules(child, f"{prefix}.{name}" if prefix else name)


def parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, name = path.rpartition(".")
    return (root.get_submodule(owner) if owner else root), name


def module_names(root: nn.Module, limit: int = 12) -> str:
    """The leaf names of the modules a LoRA can target (`q_proj, k_proj, ...`), each once, in
    model order, at most `limit` of them: what a user can pass as a target."""
    seen: dict[str, None] = {}
    for key, module in _outer_modules(root):
        if key and supported(module if not isinstance(module, LoraLayer) else module.base_layer):
            seen.setdefault(key.rpartition(".")[2], None)
    names = list(seen)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class LoraModel(nn.Module):
    """The transformers model with LoRA layers injected (PEFT's `LoraModel`)."""

    stored_targets: Any = None  # target_modules of the last injection, as PEFT stores them

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in _outer_modules(self.model):
            if isinstance(module, LoraLayer):
                yield name, module

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in _outer_modules(self.model):
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def inject(self, config: LoraConfig, name: str, *, meta: bool = False) -> list[str]:
        """Add adapter `name` to every module the config targets; returns their paths."""
        # variants (target_parameters, KaSA, ...) were refused by name already (format/variants.py)
        model = self.model
        targets = resolve_target_modules(config, model)
        keys = [k for k, _ in _outer_modules(model) if k]
        self.stored_targets = stored_target_modules(config, keys, targets)
        injected = []
        for key in keys:
            if not is_target(config, key, targets):
                continue
            module = model.get_submodule(key)
            if not isinstance(module, LoraLayer):
                if not supported(module):
                    raise IncompatibleModelError(
                        f"target module `{key}` is a {type(module).__name__}; adapterctl supports "
                        "nn.Linear, transformers' Conv1D and nn.Embedding",
                    )
                parent, child = parent_of(model, key)
                module = LoraLayer(module)
                setattr(parent, child, module)
            module.add_adapter(
                name,
                config.rank_for(key),
                config.alpha_for(key),
                use_rslora=config.use_rslora,
                dropout=config.lora_dropout,
                use_dora=config.use_dora,
                lora_bias=config.lora_bias,
                device="meta" if meta else None,
            )
            injected.append(key)
        if not injected:
            raise IncompatibleModelError(
                f"no module of the {type(model).__name__} matches the adapter's target_modules "
                f"{config.target_modules!r}; its modules: {module_names(model)}",
                hint="target some of those names, or this adapter was made for another base",
            )
        self._add_modules_to_save(config, name)
        return injected

    def _add_modules_to_save(self, config: LoraConfig, name: str) -> None:
        names = list(config.modules_to_save or [])
        if config.task_type == "SEQ_CLS":
            names += [n for n in ("classifier", "score") if n not in names]
        if not names:
            return
        model = self.model
        keys = [k for k, _ in model.named_modules(remove_duplicate=False)]
        for key in keys:
            if not any(key.endswith(n) for n in names):
                continue
            try:
                module = model.get_submodule(key)
            except AttributeError:
                continue  # inside a wrapper made earlier in this loop
            parent, child = parent_of(model, key)
            if isinstance(parent, (ModulesToSaveWrapper, nn.ModuleDict)):
                continue
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                setattr(parent, child, module)
            module.add_adapter(name)

    def lora_keys(self, name: str) -> Iterator[str]:
        """The model keys of adapter `name`'s LoRA tensors (what a file must provide)."""
        for path, layer in self.lora_layers():
            if name not in layer.r:
                continue
            for container in ("lora_A", "lora_B", "lora_magnitude_vector"):
                module = getattr(layer, container)
                if name in module:
                    for pname, _ in module[name].named_parameters():
                        yield f"{path}.{container}.{name}.{pname}"
            for container in ("lora_embedding_A", "lora_embedding_B"):
                if name in getattr(layer, container):
                    yield f"{path}.{container}.{name}"

    def freeze_adapter(self, name: str) -> None:
        """Eval mode and no gradients for what adapter `name` added, and nothing else: its
        factors, dropout, magnitudes and saved copies, and the wrappers holding them."""
        for _, layer in self.lora_layers():
            if name not in layer.r:
                continue
            # the wrapper and its containers themselves (not recursively: the containers also
            # hold the other adapters, which are frozen already)
            containers = (
                layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_magnitude_vector,
                layer.lora_embedding_A, layer.lora_embedding_B,
            )  # fmt: skip
            for module in (layer, *containers):
                module.training = False
            for container in containers[:4]:
                if name in container:
                    container[name].requires_grad_(False).train(False)
            for pdict in (layer.lora_embedding_A, layer.lora_embedding_B):
                if name in pdict:
                    pdict[name].requires_grad_(False)
        for _, wrapper in self.wrappers():
            if name in wrapper.modules_to_save:
                wrapper.training = False
                wrapper.modules_to_save[name].requires_grad_(False).train(False)

    def set_adapter(self, name: str) -> None:
        for _, layer in self.lora_layers():
            layer.active_adapters = [name]
        for _, w in self.wrappers():
            w.active_adapter = name if name in w.modules_to_save else None

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        for key, p in self.named_parameters():
            parts = key.split(".")
            if (any(c in parts for c in _ADAPTER_PARAMS) and name in parts) or (
                "modules_to_save" in parts and name in parts
            ):
                yield key, p
