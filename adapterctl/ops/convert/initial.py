"""The initial factors A0, B0 of a PiSSA/OLoRA/CorDA adapter: read from the initial adapter saved
before training, or rebuilt from the original base for the deterministic methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from adapterctl.errors import ConversionError
from adapterctl.format.config import LoraConfig, is_pissa_niter
from adapterctl.format.dtypes import DTYPES
from adapterctl.format.rawtensor import RawTensor, TensorStore, from_float, to_float32

if TYPE_CHECKING:
    from adapterctl.format.checkpoint import BaseCheckpoint

#: the init methods `--base` can rebuild (the others depend on a random state or on data)
REBUILDABLE = ("pissa", "olora")


@dataclass(frozen=True)
class Factors:
    """One LoRA module of the trained adapter, as the conversion sees it."""

    module: str
    a_key: str
    b_key: str
    embedding: bool  # lora_embedding_A/B: delta = s·(B·A)ᵀ
    dtype_code: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a_shape[0]


class Initial(Protocol):
    label: str

    def factors(self, f: Factors) -> tuple[RawTensor, RawTensor]:
        """A0, B0 with the trained factors' shapes and dtype."""
        ...

    def factor(self, f: Factors, which: str) -> RawTensor:
        """A0 (`which` "A") or B0 ("B") alone: one tensor in memory at a time."""
        ...

    def original_weight(self, key: str, residual: RawTensor, f: Factors, code: str) -> RawTensor:
        """The base weight W_orig that `residual` (W_res, saved under `key`) came from, as a
        `code` tensor (rounded once)."""
        ...


class SavedInitial:
    """The initial adapter saved before training."""

    def __init__(self, store: TensorStore, config: LoraConfig) -> None:
        self.label = store.label
        self.store = store
        self.config = config
        self._specs = store.specs()

    def factors(self, f: Factors) -> tuple[RawTensor, RawTensor]:
        return self.factor(f, "A"), self.factor(f, "B")

    def factor(self, f: Factors, which: str) -> RawTensor:
        key, shape = (f.a_key, f.a_shape) if which == "A" else (f.b_key, f.b_shape)
        if key not in self._specs:
            raise ConversionError(
                f"`{key}` is in the trained adapter but not in the initial one",
                hint="pass the initial adapter saved right before this adapter was trained",
            )
        dtype, shape0 = self._specs[key]
        if (dtype.code, shape0) != (f.dtype_code, shape):
            raise ConversionError(
                f"`{key}` differs between the pair: trained "
                f"{DTYPES[f.dtype_code].display_name}{list(shape)}, "
                f"initial {dtype.display_name}{list(shape0)}"
            )
        return self.store.get(key)

    def original_weight(self, key: str, residual: RawTensor, f: Factors, code: str) -> RawTensor:
        """W_res + s0·B0·A0, computed in float32 and rounded once to `code`."""
        a0, b0 = self.factors(f)
        s0 = self.config.scaling(self.config.alpha_for(f.module), f.rank)
        delta = s0 * (to_float32(b0) @ to_float32(a0))
        w = to_float32(residual)
        if f.embedding or delta.shape != w.shape:
            delta = delta.T
        if delta.shape != w.shape:
            raise ConversionError(
                f"`{key}` {list(w.shape)} does not fit its factors {list(delta.shape)}"
            )
        return from_float(w + delta, code)


class RebuiltInitial:
    """A0, B0 decomposed again from the original base, as PEFT's init computed them: PiSSA from a
    full SVD (A0 = sqrt(S_r/s)·Vh_r, B0 = U_r·sqrt(S_r/s)), OLoRA from a QR (A0 = R_r, B0 = Q_r),
    both on the (out, in) float32 weight. Singular pairs may come out with flipped signs; only
    B0·A0 enters the conversion, and that is sign-free."""

    def __init__(self, base: BaseCheckpoint, method: str, config: LoraConfig) -> None:
        if method not in REBUILDABLE:
            raise ConversionError(f"cannot rebuild a {method!r} initial adapter from the base")
        self.label = str(base.path)
        self.base = base
        self.method = method
        self.config = config
        self._done: dict[str, tuple[RawTensor, RawTensor]] = {}

    def factor(self, f: Factors, which: str) -> RawTensor:
        """One of the pair; each module is decomposed once (the factors are kept: as much
        memory as the initial adapter, against an SVD of the base weight per use)."""
        if f.module not in self._done:
            self._done[f.module] = self.factors(f)
        return self._done[f.module][0 if which == "A" else 1]

    def _weight_out_in(self, f: Factors) -> RawTensor:
        w = self.base.weight(f.module)
        out_dim, in_dim = f.b_shape[0], f.a_shape[1]
        if len(w.shape) != 2 or set(w.shape) != {out_dim, in_dim}:
            raise ConversionError(
                f"base weight of `{f.module}` is {list(w.shape)}, the adapter expects "
                f"{[out_dim, in_dim]}",
                hint="pass the base model the adapter was made on",
            )
        return w

    def factors(self, f: Factors) -> tuple[RawTensor, RawTensor]:
        import numpy as np

        if f.embedding:  # PEFT's PiSSA/OLoRA leave embedding LoRA at A0 = 0: B0·A0 = 0
            zeros = [np.zeros(shape, dtype=np.float32) for shape in (f.a_shape, f.b_shape)]
            return from_float(zeros[0], f.dtype_code), from_float(zeros[1], f.dtype_code)
        raw = self._weight_out_in(f)
        w = to_float32(raw)
        if not np.isfinite(w).all():
            raise ConversionError(f"base weight of `{f.module}` holds values that are not finite")
        out_dim = f.b_shape[0]
        # a Conv1D stores (in, out); a square one is told apart by the config's fan_in_fan_out
        if w.shape[0] != out_dim or (w.shape[0] == w.shape[1] and self.config.fan_in_fan_out):
            w = w.T
        r = f.rank
        if self.method == "pissa":
            u, sv, vh = np.linalg.svd(w, full_matrices=False)
            root = np.sqrt(sv[:r] / f.scaling)
            a0 = root[:, None] * vh[:r]
            b0 = u[:, :r] * root
        else:
            q, rr = np.linalg.qr(w)
            a0, b0 = rr[:r], q[:, :r]
        if a0.shape != f.a_shape or b0.shape != f.b_shape:
            raise ConversionError(
                f"`{f.module}`: rank {r} does not fit the base weight {list(w.shape)}"
            )
        return from_float(a0, f.dtype_code), from_float(b0, f.dtype_code)

    def original_weight(self, key: str, residual: RawTensor, f: Factors, code: str) -> RawTensor:
        w = self.base.weight(f.module)
        if w.shape != residual.shape:
            raise ConversionError(
                f"`{key}` {list(residual.shape)} does not fit the base's {list(w.shape)}"
            )
        from adapterctl.format.rawtensor import cast

        return cast(w, code)


def irreproducible(init: object) -> str | None:
    """Why the initial adapter of a residual init cannot be computed again from the base (what
    both loading such an adapter and `convert --base` would need); None where it can."""
    if is_pissa_niter(init):
        return "its initial adapter came from a randomized SVD, so it depends on the random state"
    if init == "corda":
        return "its initial adapter depends on calibration data that the adapter files do not hold"
    return None


def rebuild_method(config: LoraConfig, requested: str | None) -> str:
    """The init method `--base` rebuilds: the trained config's, or `--init` where it says true."""
    init = config.init_lora_weights
    reason = irreproducible(init)
    if reason is not None:
        raise ConversionError(
            f"`init_lora_weights` is {init!r}: {reason}, and cannot be rebuilt from the base",
            hint="pass --initial with the initial adapter saved before training",
        )
    if init in REBUILDABLE:
        if requested is not None and requested != init:
            raise ConversionError(
                f"--init {requested} contradicts the adapter's init_lora_weights {init!r}"
            )
        return str(init)
    if requested is None:
        raise ConversionError(
            f"the adapter's init_lora_weights is {init!r}, which does not say how it was "
            "initialised",
            hint="pass --init pissa or --init olora",
        )
    if requested not in REBUILDABLE:
        raise ConversionError(f"--init must be one of {', '.join(REBUILDABLE)}")
    return requested
