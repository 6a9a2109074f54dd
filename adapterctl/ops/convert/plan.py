"""Adapter tensors transformed one module at a time: PiSSA/OLoRA/CorDA to plain LoRA, dtype casts
and rank reduction, planned from the headers and computed when the writer asks for each tensor.

PiSSA to LoRA (docs/peft-format.md §7.2): W_res + s·B·A = W_orig − s·B0·A0 + s·B·A
= W_orig + s'·[B | −B0]·[A ; A0] with r' = 2r and the scaling kept (α' = 2α, or √2·α with rslora).
Unlike PEFT nothing is dropped: DoRA magnitudes, modules_to_save, biases, lora_bias and saved
embeddings are carried over, embedding LoRA is concatenated like A/B, and a saved
`<mod>.base_layer.weight` of a module that also has factors (the RESIDUAL weight) is rebuilt as
W_res + s0·B0·A0. Rank reduction replaces s·B·A by its best rank-k approximation from a factored
SVD, with the scaling folded into the factors (α = r per module). Every value that is only copied
or negated keeps its bits; casts round as torch's `.to()` does.

`convert_tensors` (the library's `save_pretrained(path_initial_model_for_weight_conversion=...)`)
and `adapterctl convert` both run `Plan`.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapterctl.errors import ConversionError
from adapterctl.format.config import LoraConfig, reload_drift, residual_init
from adapterctl.format.dtypes import DTYPES, Dtype
from adapterctl.format.factors import as_matrix, matrix_shapes, pair_problem
from adapterctl.format.keys import classify
from adapterctl.format.rawtensor import (
    FLOAT_CODES,
    DictStore,
    RawTensor,
    TensorStore,
    cast,
    concat,
    concat_negated,
    from_float,
    to_float64,
    to_floats,
)
from adapterctl.ops.convert.blas import one_blas_thread
from adapterctl.ops.convert.finite import refuse_new_nonfinite
from adapterctl.ops.convert.initial import Factors, Initial, RebuiltInitial, SavedInitial
from adapterctl.ops.convert.lowrank import BUDGET, Spectrum, apply, basis
from adapterctl.ops.convert.portable import (
    Kept,
    common_rank,
    folded_bias,
    not_portable,
    padded,
    padded_shape,
    portable_config,
)

#: LoRA kind -> the axis the rank runs along (A: rows, B: columns)
_RANK_AXIS = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}


#: configuration fields the trained adapter and its initial adapter must agree on
PAIR_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    initial: Initial | None = None
    dtype: str | None = None  # a safetensors code: F32, BF16, F16
    rank: int | None = None
    energy: float | None = None
    portable: bool = False  # scaling folded into B, one rank for all (portable.py)

    @property
    def reduce(self) -> bool:
        return self.rank is not None or self.energy is not None


@dataclass
class ModuleReport:
    module: str
    actions: list[str]
    r_in: int
    alpha_in: float
    r: int
    alpha: float
    energy: float | None = None  # kept fraction of the spectral energy (rank reduction)
    relative_error: float | None = None  # ||dropped|| / ||delta||
    dropped_norm: float = 0.0  # the absolute Frobenius norm of what the reduction dropped

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "actions": self.actions,
            "r_in": self.r_in,
            "alpha_in": self.alpha_in,
            "r": self.r,
            "alpha": self.alpha,
            "energy": self.energy,
            "relative_error": self.relative_error,
        }


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: Dtype
    shape: tuple[int, ...]
    produce: Callable[[], RawTensor]  # checked: see `Plan._output`
    computed: bool  # values were cast or computed (elementwise checks allow rounding)


@dataclass
class Module:
    """One LoRA module as the plan sees it: its factors, its lora_B.bias (if any), its report
    (complete once the plan is made) and, for a rank reduction, the transforms that give the
    reduced factors, B·to_b and to_a·A (computed while planning from the delta's spectrum,
    applied when the reduced factors are written)."""

    factors: Factors
    bias_key: str | None
    report: ModuleReport
    transforms: tuple[Any, Any] | None = None  # (to_b, to_a): (r, k) and (k, r)
    rank: int = 0  # the rank of its factors before --portable pads them (set by the plan)


def check_pair(
    trained: LoraConfig, initial: LoraConfig, labels: tuple[str, str] = ("", "")
) -> list[str]:
    """Refuse a pair whose configs differ (a differing base name is returned as a warning)."""
    which = [f" (`{x}`)" if x else "" for x in labels]
    for name in PAIR_FIELDS:
        a, b = getattr(trained, name), getattr(initial, name)
        if (a or None) != (b or None) if name.endswith("_pattern") else a != b:
            raise ConversionError(
                f"the trained adapter{which[0]} and the initial one{which[1]} differ in "
                f"`{name}`: {a!r} vs {b!r}",
                hint="pass the initial adapter saved right before this adapter was trained",
            )
    warnings = []
    tb, ib = trained.base_model_name_or_path, initial.base_model_name_or_path
    if tb and ib and tb != ib:
        warnings.append(
            f"the trained adapter names base `{tb}`, the initial one `{ib}` (usually the "
            f"residual base it was trained on); the output names `{ib}`"
        )
    return warnings


def converted_config(
    trained: LoraConfig,
    initial: LoraConfig | None = None,
    label: str = "<memory>",
    modules: Sequence[str] = (),
) -> LoraConfig:
    """r ×2 (patterns too), α ×2 (√2 with rslora; patterns likewise), init_lora_weights true; the
    base is the initial adapter's (the trained one names the residual base it was trained on).
    An α that the doubling takes past the largest float is an error naming a module using it."""
    factor = math.sqrt(2) if trained.use_rslora else 2
    for module in modules:
        alpha = trained.alpha_for(module)
        if not math.isfinite(alpha * factor):
            raise ConversionError(
                f"`{label}`: `{module}`: lora_alpha {alpha:g} becomes {alpha * factor:g} in the "
                f"converted adapter (×{factor:g} for twice the rank): not a finite number",
                hint="nothing was written; the config's lora_alpha is too large to convert",
            )
    changes: dict[str, Any] = {
        "r": trained.r * 2,
        "lora_alpha": trained.lora_alpha * factor,
        "rank_pattern": {k: v * 2 for k, v in (trained.rank_pattern or {}).items()},
        "alpha_pattern": {k: v * factor for k, v in (trained.alpha_pattern or {}).items()},
        "init_lora_weights": True,
    }
    if initial is not None and initial.base_model_name_or_path:
        changes["base_model_name_or_path"] = initial.base_model_name_or_path
    return trained.replace(**changes)


def reduced_config(config: LoraConfig, ranks: Mapping[str, int]) -> LoraConfig:
    """Scaling exactly 1 everywhere: r = α = the most common rank, the others by exact-name
    rank/alpha patterns (no two can match one module, so sorting cannot change them:
    docs/peft-format.md, Trap T1)."""
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(config.r)
    patterns = {"^" + re.escape(m): k for m, k in sorted(ranks.items()) if k != common}
    out = config.replace(
        r=common,
        lora_alpha=common,
        use_rslora=False,
        rank_pattern=dict(patterns),
        alpha_pattern=dict(patterns),
    )
    wrong = [m for m, k in ranks.items() if out.rank_for(m) != k or out.alpha_for(m) != k]
    if wrong or reload_drift(out, list(ranks)):  # pragma: no cover - anchored names are exact
        raise ConversionError(f"the reduced ranks cannot be written as rank patterns: {wrong}")
    return out


class Plan:
    """What the output holds (names, dtypes, shapes, known from the headers before anything is
    computed), every module's report (the rank a reduction cuts to and what it drops included:
    complete before anything is written) and how each tensor is made (`outputs`, produced in any
    order: one tensor at a time, or one module at a time when a rank reduction needs both
    factors)."""

    def __init__(
        self,
        source: TensorStore,
        config: LoraConfig,
        options: Options,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """`progress(1, modules)` after each module whose spectrum planning computes (a rank
        reduction: --rank or --energy)."""
        self.source = source
        self.options = options
        self._progress = progress
        self.specs = source.specs()
        self.config_in = config
        self.warnings: list[str] = []
        #: what --portable keeps as is (no engine computes it from plain factors)
        self.not_portable: list[Kept] = not_portable(self.specs, config) if options.portable else []
        self._cache: tuple[str, dict[str, RawTensor]] | None = None
        self._check_options(config)
        self.modules = self._modules(config)
        self._by_key = {
            k: m for m in self.modules for k in (m.factors.a_key, m.factors.b_key, m.bias_key) if k
        }
        self._by_name: dict[str, Module] = {}
        for m in self.modules:
            self._by_name.setdefault(m.factors.module, m)
        self.config = self._config(config)
        self.outputs = self._outputs()

    def module_of(self, key: str) -> Module | None:
        """The module whose LoRA factor (or lora_B.bias) `key` is; None for any other tensor."""
        return self._by_key.get(key)

    def module_named(self, name: str) -> Module | None:
        """The LoRA module named `name` (a module path, as `classify` gives it), if any."""
        return self._by_name.get(name)

    # --- planning ------------------------------------------------------------------------------

    def _check_options(self, config: LoraConfig) -> None:
        opts = self.options
        residual = residual_init(config.init_lora_weights)
        if opts.initial is None and opts.reduce and residual:
            raise ConversionError(
                f"the adapter's init_lora_weights is {config.init_lora_weights!r}: its factors "
                "act on a residual base, and a reduced rank would make PEFT decompose it again",
                hint="convert it to plain LoRA in the same run: add --initial INIT or --base BASE",
            )
        # `true` is what the PEFT docs (and `adapterctl save`) write before training: no warning
        if opts.initial is not None and not residual and config.init_lora_weights is not True:
            self.warnings.append(
                f"the trained adapter's init_lora_weights is {config.init_lora_weights!r}, not "
                "a PiSSA/OLoRA/CorDA one; converting it as one"
            )
        if isinstance(opts.initial, SavedInitial):
            labels = (self.source.label, opts.initial.label)
            self.warnings += check_pair(config, opts.initial.config, labels)

    def _modules(self, config: LoraConfig) -> list[Module]:
        mts = config.modules_to_save or []
        groups: dict[str, dict[str, str]] = {}
        for key in self.specs:
            info = classify(key, mts)
            if info.is_lora:
                prefix = key[: key.rindex(".lora_")]
                groups.setdefault(prefix, {})[info.kind] = key
        modules = []
        for prefix, kinds in groups.items():
            embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
            a_kind, b_kind = (
                ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            )
            if a_kind not in kinds or b_kind not in kinds:
                have = ", ".join(sorted(kinds))
                raise ConversionError(f"`{prefix}` has {have} but not both LoRA factors")
            a_key, b_key = kinds[a_kind], kinds[b_kind]
            (a_dtype, a_shape), (b_dtype, b_shape) = self.specs[a_key], self.specs[b_key]
            module = classify(a_key, mts).module
            problem = pair_problem(a_kind, a_shape, b_kind, b_shape)
            if problem is not None:
                raise ConversionError(f"`{module}`: {problem}")
            computed = self.options.initial is not None or self.options.reduce
            if self.options.portable and matrix_shapes(a_shape, b_shape) is None:
                raise ConversionError(
                    f"`{module}` is a grouped convolution's LoRA: its rank cannot be padded "
                    "(each group holds its own slice of the rank)",
                    hint="drop --portable",
                )
            if computed and matrix_shapes(a_shape, b_shape) is None:
                raise ConversionError(
                    f"`{module}` is a grouped convolution's LoRA: its delta is not one product "
                    "B·A, so it can be cast or copied but not converted or reduced",
                    hint="drop --initial/--base/--rank/--energy",
                )
            if computed and len(a_shape) > 2 and isinstance(self.options.initial, RebuiltInitial):
                raise ConversionError(
                    f"`{module}` is a convolution's LoRA: its initial factors cannot be rebuilt "
                    "from the base",
                    hint="pass --initial with the initial adapter saved before training",
                )
            if computed and a_dtype != b_dtype and self.options.dtype is None:
                raise ConversionError(
                    f"`{module}`: lora_A is {a_dtype.display_name} but lora_B is {b_dtype.display_name}",
                    hint="pass --dtype to write both in one dtype",
                )
            if a_dtype.code not in FLOAT_CODES:
                raise ConversionError(
                    f"`{module}`: {a_dtype.display_name} factors cannot be converted"
                )
            r = config.rank_for(module)
            if r != a_shape[0]:
                raise ConversionError(
                    f"`{self.source.label}`: `{module}`: the config gives rank {r}, lora_A has "
                    f"{a_shape[0]} rows"
                )
            alpha = config.alpha_for(module)
            if "lora_magnitude_vector" in kinds and self.options.reduce:
                raise ConversionError(
                    f"`{module}` is a DoRA module: its magnitude is the norm of W + s·B·A, which "
                    "depends on the base weight, so its rank cannot be reduced from the files",
                    hint="drop --rank/--energy, or merge the adapter instead",
                )
            factors = Factors(
                module, a_key, b_key, embedding, a_dtype.code, a_shape, b_shape,
                config.scaling(alpha, r),
            )  # fmt: skip
            report = ModuleReport(module, [], r, alpha, r, alpha)
            modules.append(Module(factors, kinds.get("lora_B.bias"), report))
        return modules

    def _target_rank(self, m: Module) -> int:
        r = m.factors.rank * (2 if self.options.initial is not None else 1)
        out_dim, in_dim = m.factors.b_shape[0], math.prod(m.factors.a_shape[1:])
        full = min(r, out_dim, in_dim)
        if self.options.rank is not None:
            return min(self.options.rank, full)
        return full  # --energy: replaced by the computed rank

    def _config(self, config: LoraConfig) -> LoraConfig:
        opts = self.options
        out = config
        if opts.initial is not None:
            saved = opts.initial.config if isinstance(opts.initial, SavedInitial) else None
            modules = [m.factors.module for m in self.modules]
            out = converted_config(config, saved, self.source.label, modules)
            for m in self.modules:
                init = config.init_lora_weights
                m.report.actions.append(f"{init}->lora" if isinstance(init, str) else "to lora")
                m.report.r = out.rank_for(m.report.module)
                m.report.alpha = out.alpha_for(m.report.module)
        if opts.reduce:
            for m in self.modules:
                self._measure(m)
                if self._progress is not None:
                    self._progress(1, len(self.modules))
            out = reduced_config(out, {m.report.module: m.report.r for m in self.modules})
        for m in self.modules:
            m.rank = m.report.r
        if opts.portable:
            out = self._portable(out)
        if opts.dtype:
            for m in self.modules:
                f = m.factors
                if opts.dtype != f.dtype_code:
                    # dtypes named as everywhere else in adapterctl (`bfloat16`, not `BF16`)
                    old, new = DTYPES[f.dtype_code].display_name, DTYPES[opts.dtype].display_name
                    m.report.actions.append(f"{old}->{new}")
        return out

    def _portable(self, config: LoraConfig) -> LoraConfig:
        """Every module's scaling folded into B (a reduction already did), every module padded
        to one rank R (--rank, else the largest), r = lora_alpha = R, no rslora, no patterns."""
        ranks = [m.rank for m in self.modules]
        rank = common_rank(ranks, self.options.rank, int(config.r))
        for m in self.modules:
            rep = m.report
            if not self.options.reduce and m.factors.scaling != 1.0:
                rep.actions.append(f"scaling {m.factors.scaling:g} into B")
            if m.rank != rank:
                rep.actions.append(f"padded {m.rank}->{rank}")
            rep.r = rep.alpha = rank
        return portable_config(config, rank)

    def _measure(self, m: Module) -> None:
        """A rank reduction's numbers, before anything is written: the spectrum of the module's
        (joined) delta, the rank it is cut to (--rank, or the smallest keeping --energy), the
        energy kept and the norm dropped; and the transforms the writer applies (`_reduce`)."""
        import numpy as np

        f, rep = m.factors, m.report
        # a factor that fits one chunk is made float64 once; a larger one is read in float64
        # chunks: one side in memory at a time
        r = f.rank * (2 if self.options.initial is not None else 1)
        with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
            b_basis = basis(self._float_values(m, "B"), "B")
            a_basis = basis(self._float_values(m, "A"), "A")
            spec = Spectrum.from_bases(b_basis, a_basis, f.scaling, r)
            energy = self.options.energy
            k = spec.rank_for_energy(energy) if energy is not None else self._target_rank(m)
            kept, dropped = spec.loss(k)
            total = math.sqrt(spec.energy)
            m.transforms = spec.transforms(k)
        rep.r = rep.alpha = k
        rep.energy, rep.dropped_norm = kept, dropped
        rep.relative_error = dropped / total if total else 0.0
        rep.actions.append(f"rank {r}->{k}")

    def _outputs(self) -> list[OutputTensor]:
        mts = self.config_in.modules_to_save or []
        lora_modules = {m.factors.module for m in self.modules}
        outputs = []
        target = self.options.dtype
        for key, (dtype, shape) in self.specs.items():
            new_dtype = DTYPES[target] if target and dtype.code in FLOAT_CODES else dtype
            info = classify(key, mts)
            m = self.module_of(key)
            if m is not None and key != m.bias_key:
                r = (
                    m.report.r
                    if self.options.reduce or self.options.portable
                    else shape[_RANK_AXIS[info.kind]]
                    * (2 if self.options.initial is not None else 1)
                )
                axis = _RANK_AXIS[info.kind]  # convolutions keep their other axes
                new_shape = padded_shape(shape, axis, r)
                which = "A" if axis == 0 else "B"
                origin = None if self.options.reduce else self._origin_factor(m, which)
                # --portable: A is copied (or cast) and padded; B is scaled unless s is 1
                scaled = self.options.portable and which == "B" and m.factors.scaling != 1.0
                outputs.append(
                    self._output(
                        key, new_dtype, new_shape, self._lora(m, key), True, origin,
                        m.factors.module,
                        exact=not self.options.reduce and new_dtype == dtype and not scaled,
                    )
                )  # fmt: skip
                continue
            residual = (
                self.options.initial is not None
                and info.param == "weight"
                and info.depth > 0
                and info.module in lora_modules
                and m is None
            )
            if residual:
                owner = self._owner(info.module)
                if len(owner.factors.a_shape) > 2:
                    raise ConversionError(
                        f"`{info.module}` is a convolution whose residual base weight is saved: "
                        "adapterctl does not rebuild that weight",
                        hint="convert it with PEFT",
                    )
                outputs.append(
                    self._output(
                        key, new_dtype, shape, self._original(key, owner), True,
                        self._source(key), info.module,
                    )
                )  # fmt: skip
            elif m is not None:  # lora_B.bias (scaled where the scaling is folded)
                folded = self.options.reduce or self.options.portable
                outputs.append(
                    self._output(
                        key, new_dtype, shape, self._lora(m, key), True, self._source(key),
                        m.factors.module, exact=not folded and new_dtype == dtype,
                    )
                )  # fmt: skip
            else:  # DoRA magnitudes, modules_to_save, biases, embeddings: copied (or cast)
                outputs.append(
                    self._output(
                        key, new_dtype, shape, self._copy(key), new_dtype != dtype,
                        self._source(key), info.module or None, exact=new_dtype == dtype,
                    )
                )  # fmt: skip
        return outputs

    def _output(
        self,
        key: str,
        dtype: Dtype,
        shape: tuple[int, ...],
        make: Callable[[], RawTensor],
        computed: bool,
        origin: Callable[[], RawTensor] | None,
        module: str | None,
        exact: bool = False,
    ) -> OutputTensor:
        """Every output tensor goes through here: a computed one must be finite wherever the
        values it came from are. `origin` gives the input it was made from element by element
        (a cast, a join, W_res of W_res + s0·B0·A0, the bias a scaling multiplies): the NaN
        and ±Inf that input holds are carried, any other is an error. A tensor that mixes its
        inputs (rank reduction: `origin` None; its inputs were checked finite) must be finite.
        An `exact` one (bits copied, joined or sign-flipped) cannot make a value that is not
        finite and is not checked: exact conversions never import numpy."""

        def produce() -> RawTensor:
            if exact:  # bits copied, joined or sign-flipped: finite stays finite (no numpy)
                return make()
            import numpy as np

            with np.errstate(over="ignore", invalid="ignore"):  # found below, not warned
                t = make()
            owner = self.module_named(module) if module is not None else None
            refuse_new_nonfinite(
                t, origin, label=self.source.label, key=key, module=module,
                scaling=owner.factors.scaling if owner is not None else None,
            )  # fmt: skip
            return t

        return OutputTensor(key, dtype, shape, produce, computed)

    def _owner(self, module: str) -> Module:
        owner = self.module_named(module)
        assert owner is not None  # a planned module's name
        return owner

    # --- producing -----------------------------------------------------------------------------

    def _source(self, key: str) -> Callable[[], RawTensor]:
        return lambda: self.source.get(key)

    def _origin_factor(self, m: Module, which: str) -> Callable[[], RawTensor]:
        if not self.options.portable:
            return lambda: self.joined(m, which)
        # the joined factor padded as the output is: its NaN/Inf where the output's may be
        axis, rank = (0 if which == "A" else 1), m.report.r

        def origin() -> RawTensor:
            t = self.joined(m, which)
            return padded([(t, 1.0)], axis, t.dtype.code, rank)

        return origin

    def _copy(self, key: str) -> Callable[[], RawTensor]:
        def produce() -> RawTensor:
            t = self.source.get(key)
            return cast(t, self.options.dtype) if self.options.dtype else t

        return produce

    def _original(self, key: str, owner: Module) -> Callable[[], RawTensor]:
        def produce() -> RawTensor:
            assert self.options.initial is not None
            residual = self.source.get(key)
            code = self.options.dtype or residual.dtype.code
            return self.options.initial.original_weight(key, residual, owner.factors, code)

        return produce

    def _lora(self, m: Module, key: str) -> Callable[[], RawTensor]:
        def produce() -> RawTensor:
            if not self.options.reduce:  # each tensor on its own: one in memory at a time
                return self._compute(m, key)[key]
            prefix = key[: key.rindex(".lora_")]
            if self._cache is None or self._cache[0] != prefix:
                self._cache = (prefix, self._compute(m))
            return self._cache[1][key]

        return produce

    def joined(self, m: Module, which: str) -> RawTensor:
        """A or B of the source, joined with the initial A0 or −B0 when converting."""
        f = m.factors
        t = self.source.get(f.a_key if which == "A" else f.b_key)
        if self.options.initial is None:
            return t
        t0 = self.options.initial.factor(f, which)
        return concat(t, t0, 0) if which == "A" else concat_negated(t, t0, 1)

    def _values(self, m: Module, which: str, *, checked: bool = False) -> Any:
        """The joined A or B as floats: a view of float32 storage (no copy), else converted;
        refused where not finite (unless `checked`: planning read the same values)."""
        import numpy as np

        t = self.joined(m, which)
        values = as_matrix(to_floats(t), which)
        if not checked and not np.isfinite(values).all():
            raise ConversionError(
                f"`{self.source.label}`: `{m.factors.module}` holds NaN or infinite values "
                f"(lora_{which}{' or its initial factor' if self.options.initial else ''}): "
                "the rank of its delta cannot be reduced",
                hint="nothing was written; a --dtype cast alone carries NaN and Inf unchanged",
            )
        return values

    def _float_values(self, m: Module, which: str, *, checked: bool = False) -> Any:
        """`_values`, made float64 once where the factor fits one chunk (else read in float64
        chunks by whoever uses it)."""
        import numpy as np

        values = self._values(m, which, checked=checked)
        return values.astype(np.float64) if values.size <= BUDGET else values

    def _compute(self, m: Module, only: str | None = None) -> dict[str, RawTensor]:
        """The module's output tensors (or just `only`): joined with the initial factors,
        reduced, cast."""
        f, opts = m.factors, self.options
        out: dict[str, RawTensor] = {}
        code = opts.dtype or f.dtype_code
        if opts.reduce:
            import numpy as np

            with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
                self._reduce(m, out, code)
        elif opts.portable:
            self._fold(m, out, only)
        else:
            for key, which in ((f.a_key, "A"), (f.b_key, "B")):
                if only is None or only == key:  # each factor in its own dtype, or --dtype
                    t = self.joined(m, which)
                    out[key] = cast(t, opts.dtype) if opts.dtype else t
            if m.bias_key and only in (None, m.bias_key):
                out[m.bias_key] = self.source.get(m.bias_key)
        if m.bias_key in out and opts.dtype:
            out[m.bias_key] = cast(out[m.bias_key], opts.dtype)
        return out

    def _fold(self, m: Module, out: dict[str, RawTensor], only: str | None) -> None:
        """--portable without a reduction: A (joined with A0) padded with zero rows, B (joined
        with −B0) times the scaling padded with zero columns, the bias times the scaling; each
        written straight into its output array."""
        f, opts, rank = m.factors, self.options, m.report.r
        for key, which, axis in ((f.a_key, "A", 0), (f.b_key, "B", 1)):
            if only not in (None, key):
                continue
            t = self.source.get(key)
            code = opts.dtype or t.dtype.code
            s = 1.0 if which == "A" else f.scaling
            parts = [(t, s)]
            if opts.initial is not None:
                parts.append((opts.initial.factor(f, which), -s if which == "B" else 1.0))
            out[key] = padded(parts, axis, code, rank)
        if m.bias_key and only in (None, m.bias_key):
            bias = self.source.get(m.bias_key)
            out[m.bias_key] = folded_bias(bias, f.scaling, opts.dtype or bias.dtype.code)

    def _reduce(self, m: Module, out: dict[str, RawTensor], code: str) -> None:
        """The module's reduced factors (and its bias, scaled) into `out`: the transforms
        planning computed (`_measure`) applied to A, then to B (one side in memory at a time)."""
        f = m.factors
        assert m.transforms is not None  # measured while planning
        to_b, to_a = m.transforms
        k = m.rank  # what the reduction kept (--portable pads it to report.r)
        new_a = apply(self._float_values(m, "A", checked=True), to_a, "A")
        new_b = apply(self._float_values(m, "B", checked=True), to_b, "B")
        a_shape = (k, *f.a_shape[1:])  # a convolution's factors keep their other axes
        b_shape = (f.b_shape[0], k, *f.b_shape[2:])
        if m.report.r != k:  # --portable: rounded piece by piece into the padded arrays
            f64, rank = DTYPES["F64"], m.report.r
            a64, b64 = RawTensor(f64, a_shape, new_a.reshape(a_shape)), RawTensor(f64, b_shape, new_b.reshape(b_shape))  # fmt: skip
            out[f.a_key] = padded([(a64, 1.0)], 0, code, rank)
            out[f.b_key] = padded([(b64, 1.0)], 1, code, rank)
        else:
            out[f.a_key] = from_float(new_a.reshape(a_shape), code)
            out[f.b_key] = from_float(new_b.reshape(b_shape), code)
        if m.bias_key:  # the scaling is now 1: the bias carries the old one
            bias = self.source.get(m.bias_key)
            code_b = self.options.dtype or bias.dtype.code  # rounded once
            out[m.bias_key] = from_float(f.scaling * to_float64(bias), code_b)

    @property
    def reports(self) -> list[ModuleReport]:
        return [m.report for m in self.modules]


def convert_tensors(
    trained: Mapping[str, RawTensor],
    initial: Mapping[str, RawTensor],
    trained_config: LoraConfig,
    initial_config: LoraConfig,
) -> dict[str, RawTensor]:
    """PiSSA/OLoRA/CorDA to plain LoRA, tensors in memory (what save_pretrained converts)."""
    plan = Plan(
        DictStore(trained),
        trained_config,
        Options(initial=SavedInitial(DictStore(initial), initial_config)),
    )
    missing = missing_from_trained(plan)
    if missing:
        raise ConversionError(
            f"`{missing[0]}` is in the initial adapter but not in the trained one"
        )
    for message in plan.warnings:  # as `convert` warns: differing base names, not a residual init
        log.warning("%s", message)
    return {o.name: o.produce() for o in plan.outputs}


def missing_from_trained(plan: Plan) -> list[str]:
    """LoRA factors the initial adapter has and the trained one lacks (the pair does not match)."""
    initial = plan.options.initial
    if not isinstance(initial, SavedInitial):
        return []
    mts = plan.config_in.modules_to_save or []
    return [
        k
        for k in initial.store.specs()
        if classify(k, mts).kind in _RANK_AXIS and k not in plan.specs
    ]
