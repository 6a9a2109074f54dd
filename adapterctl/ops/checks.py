"""What a file says about its modules, and what is wrong with it (`inspect --check`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adapterctl.format.config import LoraConfig, residual_init
from adapterctl.format.factors import pair_problem
from adapterctl.format.keys import EMBEDDING_NAMES, PREFIX, KeyInfo, classify
from adapterctl.format.nonfinite import NonFinite
from adapterctl.format.variants import free_shapes, variant_message, variant_tensor, variants_in


@dataclass(frozen=True, slots=True)
class Problem:
    severity: str  # "error" | "warning"
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "message": self.message}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    nonfinite: NonFinite | None = None  # NaN/±Inf counts, where the values were scanned

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    path: str
    kinds: tuple[str, ...]
    r: int | None
    alpha: float | None
    scaling: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kinds": list(self.kinds),
            "r": self.r,
            "alpha": self.alpha,
            "scaling": self.scaling,
        }


def human_size(nbytes: int) -> str:
    """1536 -> "1.5 KiB" (bytes below 1 KiB as a plain count)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def tensor_kinds(
    tensors: Sequence[TensorEntry], config: LoraConfig | None
) -> list[tuple[str, str, KeyInfo]]:
    """Per tensor: the module it belongs to (nested `target_parameters` wrappers as separate
    modules, `.base_layer` kept), its kind, and its key's classification. A variant's own tensors
    (KaSA's `q_proj.lora_diag`) belong to their module, under their own kind."""
    mts = list(config.modules_to_save or []) if config is not None else []
    variants = variants_in(config) if config is not None else []
    kinds = []
    for t in tensors:
        info = classify(t.name, mts)
        path = info.module + ".base_layer" * info.depth if info.is_lora else info.module
        own = variant_tensor(info.module, variants) if info.kind == "unknown" else None
        path, kind = own if own is not None else (path, info.kind)
        kinds.append((path, kind, info))
    return kinds


def analyse(
    tensors: Sequence[TensorEntry],
    config: LoraConfig | None,
    kinds: Sequence[tuple[str, str, KeyInfo]] | None = None,
) -> tuple[list[ModuleEntry], list[Problem]]:
    """Group tensors by module, work out r/alpha/scaling, and list the file's problems
    (`kinds`: what tensor_kinds gives for them, where the caller has it already)."""
    problems: list[Problem] = []

    def error(msg: str) -> None:
        problems.append(Problem("error", msg))

    def warn(msg: str) -> None:
        problems.append(Problem("warning", msg))

    mts = list(config.modules_to_save or []) if config is not None else []
    # a variant's own tensors and factor shapes are what PEFT loads: named once, never errors
    variants = variants_in(config) if config is not None else []
    modules: dict[str, dict[str, TensorEntry]] = {}  # path -> kind -> tensor
    if kinds is None:
        kinds = tensor_kinds(tensors, config)
    for t, (path, kind, info) in zip(tensors, kinds, strict=True):
        if not info.prefixed:
            error(f"`{t.name}` does not start with `{PREFIX}`; PEFT ignores it when loading")
        if kind == "unknown":
            warn(
                f"`{t.name}` is of no known kind (not a LoRA factor, bias, embedding or saved module)"
            )
        entry = modules.get(path)
        if entry is None:  # (setdefault would build a dict for every tensor)
            entry = modules[path] = {}
        entry[kind] = t

    if not tensors:
        error("the weights file holds no tensors")
    for t in tensors:
        if t.nonfinite is not None and t.nonfinite.total:
            warn(
                f"`{t.name}` holds {t.nonfinite.describe()} (of {t.numel:,} values); they are "
                "carried through casts and copies, a rank reduction refuses them"
            )
    if config is None:
        warn("no `adapter_config.json` beside the weights: r, alpha and scaling are unknown")
    else:
        if config.encoding_problem:  # `--check` means "PEFT loads this"
            error(f"{config.encoding_problem}; save it as UTF-8 without a BOM")
        _config_warnings(config, warn)

    entries = []
    rules = _Rules(config) if config is not None else None
    any_shapes = free_shapes(variants)
    for path in sorted(modules):
        entries.append(_module_entry(path, modules[path], rules, error, warn, any_shapes))
    if config is not None:
        lora_paths = sorted({e.path.replace(".base_layer", "") for e in entries if e.r is not None})
        pattern_warnings(config, lora_paths, warn)
        if mts and not any(info.kind == "modules_to_save" for _, _, info in kinds):
            warn(
                f"`modules_to_save` lists {', '.join(mts)} but no tensor for them is stored; "
                "PEFT fails to load this adapter (KeyError) on a base that has such a module"
            )
    for t, (_, _, info) in zip(tensors, kinds, strict=True):
        last = info.module.rsplit(".", 1)[-1]
        if info.kind in ("embedding", "base_layer") and (
            info.kind == "embedding" or last in EMBEDDING_NAMES
        ):
            warn(
                f"full embedding `{t.name}` {list(t.shape)} is saved ({human_size(t.nbytes)}): loading "
                "overwrites the base model's embedding and needs a base of the same vocabulary size"
            )
    return entries, problems


def _config_warnings(config: LoraConfig, warn: Any) -> None:
    init = config.init_lora_weights
    if residual_init(init):
        warn(
            f"`init_lora_weights` is {init!r}: loading this adapter makes PEFT re-decompose the base "
            "model (and fail for corda); convert it to plain LoRA with `adapterctl convert`"
        )
    variants = variants_in(config)
    if variants:
        warn(variant_message(variants))
    if config.unknown_keys:
        warn(f"keys unknown to PEFT 0.21.2 (it ignores them): {', '.join(config.unknown_keys)}")


class _Rules:
    """The config fields every module's entry reads, read once (a LoraConfig field is a lookup
    through `__getattr__`; 50k modules ask for each), and scalings by (alpha, r)."""

    __slots__ = ("_scalings", "config", "lora_bias", "target_parameters", "use_dora")

    def __init__(self, config: LoraConfig) -> None:
        self.config = config
        self.use_dora = config.use_dora
        self.lora_bias = config.lora_bias
        self.target_parameters = config.target_parameters
        self._scalings: dict[tuple[float, int], float] = {}

    def scaling(self, alpha: float, r: int) -> float:
        key = (alpha, r)
        found = self._scalings.get(key)
        if found is None:
            found = self._scalings[key] = self.config.scaling(alpha, r)
        return found


def _module_entry(
    path: str,
    m: dict[str, TensorEntry],
    rules: _Rules | None,
    error: Any,
    warn: Any,
    any_shapes: bool = False,
) -> ModuleEntry:
    """One module's entry; `any_shapes`: a variant's factors (BD-LoRA's block-diagonal ones)
    need not share the rank dimension."""
    kinds = tuple(sorted(m))
    pairs = [("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")]
    r: int | None = None
    out_dim: int | None = None
    ndim = 2
    for a_kind, b_kind in pairs:
        a, b = m.get(a_kind), m.get(b_kind)
        if (a is None) != (b is None):
            have, lack = (a_kind, b_kind) if a is not None else (b_kind, a_kind)
            error(f"`{path}` has {have} but no {lack}")
        if a is None or b is None:
            continue
        at, bt = a, b
        problem = pair_problem(a_kind, at.shape, b_kind, bt.shape, free_rank=any_shapes)
        if problem is not None:
            error(f"`{path}`: {problem}")
            if len(at.shape) < 2 or len(at.shape) != len(bt.shape) or at.shape[0] == 0:
                continue
        r, out_dim, ndim = at.shape[0], bt.shape[0], len(at.shape)
    for kind in ("lora_magnitude_vector", "lora_B.bias"):
        if kind in m and out_dim is not None:
            t = m[kind]
            # a convolution's DoRA magnitude is (1, out, 1...), as PEFT's weight norm is
            conv_norm = (1, out_dim, *(1,) * (ndim - 2))
            if t.shape != (out_dim,) and not (
                ndim > 2 and kind != "lora_B.bias" and t.shape == conv_norm
            ):
                error(f"`{path}`: {kind} has shape {list(t.shape)}, expected [{out_dim}]")
    if r is None:
        for kind in ("lora_magnitude_vector", "lora_B.bias"):
            if kind in m:
                error(f"`{path}` has {kind} but no LoRA factors")
        return ModuleEntry(path, kinds, None, None, None)
    if rules is None:
        return ModuleEntry(path, kinds, r, None, None)
    config = rules.config
    module = path.replace(".base_layer", "")
    expected = config.rank_for(module)
    if rules.target_parameters and r != expected and r % expected == 0:
        r = expected  # 3-D expert tensors store r * num_experts rows (docs/peft-format.md §3.5)
    if r != expected:
        keys = config.matching_patterns("rank_pattern", module)
        source = f"rank_pattern key {keys[0]!r}" if keys else "`r`"
        error(
            f"`{path}`: the config gives rank {expected} ({source}) but the stored factors have "
            f"rank {r}; PEFT cannot load this adapter (size mismatch)"
        )
    if rules.use_dora and "lora_magnitude_vector" not in m:
        error(f"`{path}`: `use_dora` is true but no lora_magnitude_vector is stored")
    if not rules.use_dora and "lora_magnitude_vector" in m:
        error(f"`{path}`: a lora_magnitude_vector is stored but `use_dora` is false")
    if rules.lora_bias and "lora_B" in m and "lora_B.bias" not in m:
        warn(f"`{path}`: `lora_bias` is true but no lora_B.bias is stored")
    if not rules.lora_bias and "lora_B.bias" in m:
        warn(f"`{path}`: a lora_B.bias is stored but `lora_bias` is false; PEFT ignores it")
    alpha = config.alpha_for(module)
    return ModuleEntry(path, kinds, r, alpha, rules.scaling(alpha, r))


def pattern_warnings(
    config: LoraConfig,
    modules: list[str],
    warn: Any,
    *,
    where: str = "in the file",
    names: str = "",
) -> None:
    """Pattern keys that match several modules, or none (`names`: the modules there are)."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name) or {}
        used: set[str] = set()
        for path in modules:
            keys = config.matching_patterns(field_name, path)
            used.update(keys)
            if len(keys) > 1:
                values = [patterns[k] for k in keys]
                warn(
                    f"`{path}` is matched by several {field_name} keys {keys} (values {values}); "
                    f"PEFT uses the first in file order, {keys[0]!r}, which may not be the one "
                    "meant in training"
                )
        for key in patterns:
            if key not in used and modules:
                known = f" (its modules: {names})" if names else ""
                warn(f"{field_name} key {key!r} matches no module {where}{known}; PEFT ignores it")


def target_summary(config: LoraConfig, show: Callable[[str], str] = str) -> str:
    """The config's target modules in one line, each name through `show` (a card quotes them)."""
    tm = config.target_modules
    if tm is None:
        return "(architecture default)"
    if isinstance(tm, str):
        return f"regex {show(tm)}"
    return ", ".join(show(t) for t in sorted(set(tm)))
