"""`convert --dora-to-lora`: each DoRA module's (Linear, Conv1D, Embedding) weight change
W_dora - W, with W_dora exactly what PEFT merges (ops/merge/rule.py, in float64) from that module's
base weight, written as plain LoRA factors with scaling 1 by ops/convert/dense.py: exact at the
change's full rank (the default; no SVD), or cut by an SVD to --rank / --energy. `DoraDeltas` is a
`TensorStore` over the source that holds these factors in place of the DoRA ones (no magnitudes):
the rest of the conversion (casts, --portable, writing, --verify) runs on it as on any plain LoRA
adapter. Its numbers (rank, kept energy, relative error) are computed when it is made, before
anything is written; one module's arrays are in memory at a time (each module is factored again
when its tensors are written).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterctl.errors import ConversionError
from adapterctl.format.config import LoraConfig, residual_init
from adapterctl.format.keys import classify
from adapterctl.format.rawtensor import RawTensor, TensorStore, from_float, to_float64
from adapterctl.ops.convert.blas import one_blas_thread
from adapterctl.ops.convert.dense import Target, factor
from adapterctl.ops.convert.derived import OnBase, Specs
from adapterctl.ops.convert.plan import Plan, reduced_config
from adapterctl.ops.convert.verify import Check, Verification, factored_allowance
from adapterctl.ops.merge import Kind, Step, merge_sequence

if TYPE_CHECKING:
    from pathlib import Path

    from adapterctl.format.checkpoint import BaseCheckpoint

_HINT = "pass the base model the adapter was made on"


@dataclass
class DoraModule:
    """One DoRA module: its source keys, kind and scaling, and what the factoring gives."""

    module: str
    a_key: str
    b_key: str
    m_key: str
    kind: Kind
    scaling: float
    r_in: int
    alpha_in: float
    full: int  # min(out, in)
    rank: int = 0
    energy: float = 1.0
    relative_error: float = 0.0


def _norm(x: Any, axis: int) -> Any:
    import numpy as np

    return np.linalg.norm(x, axis=axis)


class DoraDeltas(OnBase):
    """The source adapter with every DoRA module's factors replaced by the factors of its weight
    change (a `TensorStore`; `config` is the plain-LoRA config that goes with it)."""

    def __init__(
        self,
        source: TensorStore,
        config: LoraConfig,
        base: BaseCheckpoint,
        *,
        rank: int | None = None,
        energy: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(source, base, Target(rank=rank, energy=energy))
        self.modules = self._find(config)
        self._by_key = {k: m for m in self.modules for k in (m.a_key, m.b_key)}
        for m in self.modules:  # the numbers, before anything is written
            self._measure(m)
            if progress is not None:
                progress(1, len(self.modules))
        self.derive(self._new_specs(), {k: m.module for k, m in self._by_key.items()})
        ranks = {m.module: m.rank for m in self.modules}
        self.config = reduced_config(config.replace(use_dora=False), ranks)

    # --- planning ------------------------------------------------------------------------------

    def _find(self, config: LoraConfig) -> list[DoraModule]:
        mts = config.modules_to_save or []
        groups: dict[str, dict[str, str]] = {}
        for key in self.specs_in:
            info = classify(key, mts)
            if info.is_lora:
                groups.setdefault(info.module, {})[info.kind] = key
        if residual_init(config.init_lora_weights):
            raise ConversionError(
                f"the adapter's init_lora_weights is {config.init_lora_weights!r}: its DoRA "
                "modules act on a residual base, not on BASE",
                hint="convert it to plain LoRA with --base first, then merge or convert the DoRA",
            )
        if not any("lora_magnitude_vector" in kinds for kinds in groups.values()):
            raise ConversionError(
                f"`{self.source.label}` has no DoRA module",
                hint="--dora-to-lora takes an adapter saved with use_dora true",
            )
        modules = []
        for name, kinds in groups.items():
            if "lora_magnitude_vector" not in kinds:
                raise ConversionError(
                    f"`{name}` has LoRA factors but no DoRA magnitude: not a DoRA module",
                    hint="--dora-to-lora takes an adapter saved with use_dora true",
                )
            if "lora_B.bias" in kinds:
                raise ConversionError(
                    f"`{name}` is a DoRA module with a lora_B bias: --dora-to-lora does not "
                    "convert lora_bias",
                    hint="merge the adapter into the base instead (`adapterctl merge`)",
                )
            embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
            pair = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            if pair[0] not in kinds or pair[1] not in kinds:
                raise ConversionError(f"`{name}` has a DoRA magnitude but not both LoRA factors")
            modules.append(self._module(config, name, kinds, pair))
        return modules

    def _module(
        self, config: LoraConfig, name: str, kinds: Mapping[str, str], pair: tuple[str, str]
    ) -> DoraModule:
        """An embedding's factors are A (r, vocab), B (dim, r), its weight (vocab, dim): its
        change is factored as the (dim, vocab) B·A it is written as."""
        a_key, b_key, m_key = kinds[pair[0]], kinds[pair[1]], kinds["lora_magnitude_vector"]
        (_, a_shape), (_, b_shape) = self.specs_in[a_key], self.specs_in[b_key]
        _, m_shape = self.specs_in[m_key]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise ConversionError(
                f"`{name}` is a convolution's DoRA: --dora-to-lora converts Linear and Conv1D only"
            )
        out_dim, in_dim = b_shape[0], a_shape[1]
        if tuple(m_shape) not in ((out_dim,), (1, out_dim)):
            raise ConversionError(
                f"`{name}`: its magnitude is {list(m_shape)}, its factors give {out_dim} outputs"
            )
        key = self.base.find(name)
        if key is None:
            raise ConversionError(
                f"base `{self.base.path}` has no weight for the DoRA module `{name}`", hint=_HINT
            )
        w_shape = self.base_shape(key)
        embedding = pair[0] == "lora_embedding_A"
        kind: Kind | None = None
        if embedding:
            kind = "embedding" if w_shape == (in_dim, out_dim) else None
        elif w_shape == (out_dim, in_dim) and not (out_dim == in_dim and config.fan_in_fan_out):
            kind = "linear"
        elif w_shape == (in_dim, out_dim):
            kind = "conv1d"
        if kind is None:
            expected = [in_dim, out_dim] if embedding else [out_dim, in_dim]
            raise ConversionError(
                f"base weight of `{name}` is {list(w_shape)}, the adapter expects {expected}",
                hint=_HINT,
            )
        r, alpha = a_shape[0], config.alpha_for(name)
        return DoraModule(
            name, a_key, b_key, m_key, kind, config.scaling(alpha, r), r, alpha,
            min(out_dim, in_dim),
        )  # fmt: skip

    def delta(self, m: DoraModule) -> Any:
        """W_dora - W (float64, (out, in)): the merge rule on the base weight in float64, the
        factors and magnitude as PEFT autocasts them (float32)."""
        import numpy as np

        def f64(key: str) -> Any:
            return to_float64(self.source.get(key)).astype(np.float32).astype(np.float64)

        a, b, mag = f64(m.a_key), f64(m.b_key), f64(m.m_key).reshape(-1)
        w = to_float64(self.base.weight(m.module))
        if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(mag).all()):
            raise ConversionError(
                f"`{self.source.label}`: `{m.module}` holds NaN or infinite values: its weight "
                "change cannot be factored"
            )
        if not np.isfinite(w).all():
            raise ConversionError(f"base weight of `{m.module}` holds values that are not finite")
        merged = merge_sequence(
            m.kind, w, [Step(a, b, m.scaling, magnitude=mag)], store=lambda x: x, norm=_norm
        )
        d = merged - w
        return d if m.kind == "linear" else d.T

    def _measure(self, m: DoraModule) -> None:
        """The rank, kept energy and error (refused here, before anything is written, where the
        change is not finite)."""
        f = factor(self.delta(m), self.target)
        m.rank, m.energy, m.relative_error = f.rank, f.energy, f.relative_error

    # --- the store -----------------------------------------------------------------------------

    def _new_specs(self) -> Specs:
        out: Specs = {}
        dropped = {m.m_key for m in self.modules}
        for key, (dtype, shape) in self.specs_in.items():
            m = self._by_key.get(key)
            if key in dropped:
                continue
            if m is None:
                out[key] = (dtype, shape)
            elif key == m.a_key:
                out[key] = (dtype, (m.rank, shape[1]))
            else:
                out[key] = (dtype, (shape[0], m.rank))
        return out

    def make(self, module: str) -> dict[str, RawTensor]:
        import numpy as np

        m = next(x for x in self.modules if x.module == module)
        f = factor(self.delta(m), self.target)
        a_dtype, _ = self.specs_in[m.a_key]
        b_dtype, _ = self.specs_in[m.b_key]
        return {
            m.a_key: from_float(np.ascontiguousarray(f.a), a_dtype.code),
            m.b_key: from_float(np.ascontiguousarray(f.b), b_dtype.code),
        }


def dora_reports(dora: DoraDeltas, plan: Plan) -> None:
    """The plan's module reports told what the factoring did: the DoRA rank and alpha it came
    from, the rank it kept (and whether that is the module's full rank), energy and error."""
    for m in dora.modules:
        found = plan.module_named(m.module)
        assert found is not None  # every DoRA module is a LoRA module of the plan
        rep = found.report
        rep.r_in, rep.alpha_in = m.r_in, m.alpha_in
        rep.energy, rep.relative_error = m.energy, m.relative_error
        full = ["full rank"] if m.rank == m.full else []
        rep.actions[:0] = ["dora->lora", f"rank {m.r_in}->{m.rank}", *full]


def dora_checks(dora: DoraDeltas, directory: Path) -> list[Check]:
    """`--verify` for each DoRA module: the written s'·B'·A' against W_dora - W computed again
    from the base, ||difference|| / ||W_dora - W||; allowed: the relative error the report
    gives, plus the rounding of the factors' dtype (||B||·||A|| <= sqrt(k)·||delta|| for SVD
    factors and for the change beside an identity), plus 1e-6."""
    import numpy as np

    from adapterctl.format.config import CONFIG_NAME
    from adapterctl.format.layout import SAFETENSORS_NAME
    from adapterctl.format.tensors import SafetensorsReader

    config = LoraConfig.from_file(directory / CONFIG_NAME)
    checks = []
    with SafetensorsReader(directory / SAFETENSORS_NAME) as reader, one_blas_thread():
        for m in dora.modules:
            a, b = (
                to_float64(RawTensor(info.dtype, info.shape, reader.array(key)))
                for key, info in ((x, reader.tensors[x]) for x in (m.a_key, m.b_key))
            )
            k = a.shape[0]
            s = config.scaling(config.alpha_for(m.module), config.rank_for(m.module))
            want = dora.delta(m)
            error = float(np.linalg.norm(s * (b @ a) - want))
            total = float(np.linalg.norm(want))
            rel = error / total if total else (0.0 if error == 0.0 else math.inf)
            codes = (reader.tensors[x].dtype.code for x in (m.a_key, m.b_key))
            allowed = factored_allowance(m.relative_error, codes, k)
            checks.append(Check(f"{m.module} (W_dora - W)", rel, allowed))
    return checks


def with_checks(v: Verification, checks: list[Check]) -> Verification:
    """`v` with `checks` added (the worst: the largest error relative to its threshold)."""

    def ratio(c: Check) -> float:
        return c.error / c.threshold if c.threshold else math.inf

    everything = [*checks, *([v.worst] if v.worst is not None else [])]
    return Verification(v.checked + len(checks), max(everything, key=ratio, default=None))
