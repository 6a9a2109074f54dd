"""adapterctl: manage LoRA-family adapters in the Hugging Face PEFT format.

Importing the package is light: the public API is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adapterctl.version import __version__

_LAZY = {
    "AdapterModel": "adapterctl.engine.model",
    "get_adapter_model": "adapterctl.engine.model",
    "LoraConfig": "adapterctl.format.config",
    "inspect_adapter": "adapterctl.ops.inspect",
    "select_adapters": "adapterctl.ops.select",
    "AdapterctlError": "adapterctl.errors",
    "merge": "adapterctl.ops.merge",
    "extract": "adapterctl.ops.extract",
    "ExtractResult": "adapterctl.ops.extract",
    "MergeResult": "adapterctl.ops.merge",
    "combine": "adapterctl.ops.combine",
    "CombineResult": "adapterctl.ops.combine",
}

if TYPE_CHECKING:
    from adapterctl.engine.model import AdapterModel, get_adapter_model
    from adapterctl.errors import AdapterctlError
    from adapterctl.format.config import LoraConfig
    from adapterctl.ops.combine import CombineResult, combine
    from adapterctl.ops.extract import ExtractResult, extract
    from adapterctl.ops.inspect import inspect_adapter
    from adapterctl.ops.merge import MergeResult, merge
    from adapterctl.ops.select import select_adapters

__all__ = [
    "AdapterModel",
    "AdapterctlError",
    "CombineResult",
    "ExtractResult",
    "LoraConfig",
    "MergeResult",
    "__version__",
    "combine",
    "extract",
    "get_adapter_model",
    "inspect_adapter",
    "merge",
    "select_adapters",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapterctl' has no attribute {name!r}")
