"""A `TensorStore` over an adapter in which some tensors are made, one module at a time, in place
of others: `--dora-to-lora` (ops/convert/dora.py) and `--embeddings-to-lora`
(ops/convert/embeddings.py) hold their new factors this way. The made tensors' dtypes and shapes
are known before any is computed; one module's tensors are in memory at a time (the writer asks
for a module's factors one after the other)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from adapterctl.format.dtypes import Dtype
from adapterctl.format.rawtensor import RawTensor, TensorStore
from adapterctl.ops.convert.dense import Target

if TYPE_CHECKING:
    from adapterctl.format.checkpoint import BaseCheckpoint

Specs = dict[str, tuple[Dtype, tuple[int, ...]]]


class DerivedStore:
    """`source`'s tensors, less the dropped ones, with each made tensor computed by `make(module)`
    (all of that module's made tensors at once, kept until another module's are asked for).
    A subclass calls `derive` once it knows what it makes."""

    def __init__(self, source: TensorStore) -> None:
        self.label = source.label
        self.source = source
        self._specs: Specs = dict(source.specs())
        self._owner: dict[str, str] = {}  # made key -> its module
        self._cache: tuple[str, dict[str, RawTensor]] | None = None

    def derive(self, specs: Specs, owner: Mapping[str, str]) -> None:
        """What the store holds (`specs`, in order) and which module makes each made key."""
        self._specs, self._owner = dict(specs), dict(owner)
        self._cache = None

    def make(self, module: str) -> dict[str, RawTensor]:  # pragma: no cover - overridden
        raise NotImplementedError

    def specs(self) -> Specs:
        return dict(self._specs)

    def get(self, key: str) -> RawTensor:
        module = self._owner.get(key)
        if module is None:
            if key not in self._specs:
                raise KeyError(key)
            return self.source.get(key)
        if self._cache is None or self._cache[0] != module:
            self._cache = (module, self.make(module))
        return self._cache[1][key]


class OnBase(DerivedStore):
    """A `DerivedStore` whose tensors are made from the source and a base checkpoint's weights,
    each change factored at one `Target` (the source's own specs kept as `specs_in`)."""

    def __init__(self, source: TensorStore, base: BaseCheckpoint, target: Target) -> None:
        super().__init__(source)
        self.base = base
        self.target = target
        self.specs_in: Specs = dict(source.specs())
        self._base_shapes: dict[str, tuple[int, ...]] | None = None

    def base_shape(self, key: str) -> tuple[int, ...]:
        """The shape of the base's tensor `key` (the base's headers are read once)."""
        if self._base_shapes is None:
            self._base_shapes = {name: tuple(shape) for name, _, _, shape in self.base.tensors()}
        return self._base_shapes[key]
