"""`convert --embeddings-to-lora`: full embedding / output-layer copies stored through
`modules_to_save`, and trainable-token deltas (`trainable_token_indices`), written as plain LoRA
factors with scaling 1 by ops/convert/dense.py.

What PEFT 0.21.2 computes, and so what the factors reproduce:
- a `modules_to_save` copy replaces the module's weight: the change is copy - base, nonzero on the
  rows training touched; an input embedding becomes an embedding LoRA (lora_embedding_A (r, vocab),
  lora_embedding_B (dim, r)), an output layer a linear LoRA (lora_A (r, dim), lora_B (vocab, r));
- a trainable-token delta holds the new values of the listed rows, which *replace* the base rows
  (`TrainableTokensLayer`: `index_copy` of the delta cast to the weight's dtype): the change is
  new rows - base rows at those indices, zero elsewhere;
- tied embeddings (the base's `tie_word_embeddings`): a `modules_to_save` copy is a copy, so the
  copied embedding and lm_head change alone (each is converted on its own); trainable tokens on the
  input embedding also replace the same rows of the tied lm_head, so lm_head gets a linear LoRA of
  the same change (unless the adapter stores lm_head's own delta).

Each new module gets alpha = r (scaling 1) through anchored rank/alpha patterns; the module leaves
`modules_to_save` (the tokens leave `trainable_token_indices`) and joins `target_modules` under its
full path. Every other module and its scaling is unchanged. The numbers (changed rows, rank, kept
energy, relative error, bytes) are computed when `EmbeddingDeltas` is made, before anything is
written; one module's arrays are in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from adapterctl.errors import ConfigError, ConversionError
from adapterctl.format.config import LoraConfig
from adapterctl.format.dtypes import Dtype
from adapterctl.format.keys import OUTPUT_HEADS, TOKEN_EMBEDDINGS, classify, stored_key
from adapterctl.format.rawtensor import RawTensor, TensorStore, from_float, numel, to_float64
from adapterctl.ops.convert.blas import one_blas_thread
from adapterctl.ops.convert.dense import Factored, Target, factor
from adapterctl.ops.convert.derived import OnBase, Specs
from adapterctl.ops.convert.plan import ModuleReport, Plan
from adapterctl.ops.convert.targeted import targeted_config
from adapterctl.ops.convert.verify import Check, factored_allowance

if TYPE_CHECKING:
    from pathlib import Path

    from adapterctl.format.checkpoint import BaseCheckpoint

_HINT = "pass the base model the adapter was made on"
#: values compared at a time (float64: 32 MiB a piece)
_PIECE = 1 << 22
#: input embeddings (nn.Embedding) and output layers (nn.Linear) by their module names
INPUT_NAMES = TOKEN_EMBEDDINGS
OUTPUT_NAMES = OUTPUT_HEADS

Origin = Literal["modules_to_save", "trainable tokens", "tied"]
_ORIGIN = {"modules_to_save": "modules_to_save copy", "trainable tokens": "trainable tokens", "tied": "tied trainable tokens"}  # fmt: skip


@dataclass
class EmbeddingModule:
    """One module whose weight change becomes LoRA: where it comes from (`key_in`, the copy or
    the token delta; a tied lm_head shares its embedding's), its shape and what factoring gives."""

    module: str
    kind: Literal["embedding", "linear"]
    origin: Origin
    key_in: str
    dtype: Dtype
    vocab: int
    dim: int
    indices: tuple[int, ...] | None = None  # trainable tokens: the replaced rows, in order
    rows: int = 0  # rows the change touches
    rank: int = 0
    energy: float = 1.0
    relative_error: float = 0.0
    bytes_in: int = 0  # what the source stored for it (0 for a tied lm_head)
    bytes_out: int = 0

    @property
    def a_key(self) -> str:
        return stored_key(self.module, "lora_embedding_A" if self.kind == "embedding" else "lora_A")

    @property
    def b_key(self) -> str:
        return stored_key(self.module, "lora_embedding_B" if self.kind == "embedding" else "lora_B")

    @property
    def full(self) -> int:
        return min(self.vocab, self.dim)

    def shapes(self, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(A, B) shapes at rank k."""
        if self.kind == "embedding":
            return (k, self.vocab), (self.dim, k)
        return (k, self.dim), (self.vocab, k)


def _kind(module: str) -> Literal["embedding", "linear"] | None:
    last = module.rsplit(".", 1)[-1]
    if last in INPUT_NAMES:
        return "embedding"
    return "linear" if last in OUTPUT_NAMES else None


class EmbeddingDeltas(OnBase):
    """The source adapter with each embedding copy and trainable-token delta replaced by the LoRA
    factors of its weight change (a `TensorStore`; `config` goes with it)."""

    def __init__(
        self,
        source: TensorStore,
        config: LoraConfig,
        base: BaseCheckpoint,
        *,
        rank: int | None = None,
        energy: float | None = None,
        out_dtype: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(source, base, Target(rank=rank, energy=energy))
        self.modules = self._find(config)
        for m in self.modules:  # the numbers, before anything is written
            self._measure(m, out_dtype)
            if progress is not None:
                progress(1, len(self.modules))
        owner = {k: m.module for m in self.modules for k in (m.a_key, m.b_key)}
        self.derive(self._new_specs(), owner)
        ranks = {m.module: m.rank for m in self.modules}
        copied = {m.module for m in self.modules if m.origin == "modules_to_save"}
        tokens = any(m.origin != "modules_to_save" for m in self.modules)
        self.config = targeted_config(config, ranks, copied, list(self.specs_in), tokens=tokens)

    # --- planning ------------------------------------------------------------------------------

    def _find(self, config: LoraConfig) -> list[EmbeddingModule]:
        mts = config.modules_to_save or []
        copies: dict[str, dict[str, str]] = {}
        deltas: dict[str, str] = {}
        for key in self.specs_in:
            info = classify(key, mts)
            if info.kind == "modules_to_save" and _kind(info.module) is not None:
                copies.setdefault(info.module, {})[info.param] = key
            elif info.kind == "trainable_tokens_delta":
                deltas[info.module] = key
        modules = [self._copy(name, params) for name, params in copies.items()]
        both = sorted(set(copies) & set(deltas))
        if both:
            raise ConversionError(
                f"`{self.source.label}` holds both a modules_to_save copy and trainable-token "
                f"deltas for `{both[0]}`: which one PEFT applies is unclear, so neither is "
                "converted",
                hint="convert the adapter without --embeddings-to-lora",
            )
        modules += [self._tokens(config, name, key) for name, key in deltas.items()]
        if not modules:
            raise ConversionError(
                f"`{self.source.label}` has neither a full embedding or lm_head copy in "
                "modules_to_save nor trainable-token deltas: nothing for --embeddings-to-lora",
                hint="--embeddings-to-lora takes an adapter saved with modules_to_save="
                '["embed_tokens", "lm_head"] or with trainable_token_indices',
            )
        tied = self._tied(modules)
        modules += [tied] if tied is not None else []
        for m in modules:
            if m.a_key in self.specs_in or m.b_key in self.specs_in:
                raise ConversionError(
                    f"`{m.module}` already has LoRA factors: the change of its "
                    f"{_ORIGIN[m.origin]} cannot be added to them",
                    hint="merge the adapter into the base instead (`adapterctl merge`)",
                )
        return modules

    def _module_shape(self, module: str) -> tuple[int, ...]:
        key = self.base.find(module)
        if key is None:
            raise ConversionError(
                f"base `{self.base.path}` has no weight for `{module}`", hint=_HINT
            )
        return self.base_shape(key)

    def _check_shape(self, module: str, vocab: int, dim: int) -> None:
        shape = self._module_shape(module)
        if len(shape) != 2 or shape[1] != dim:
            raise ConversionError(
                f"base weight of `{module}` is {list(shape)}, the adapter's is [{vocab}, {dim}]",
                hint=_HINT,
            )
        if shape[0] != vocab:
            grown = "grew" if vocab > shape[0] else "shrank"
            raise ConversionError(
                f"`{module}`: the vocabulary {grown} from {shape[0]} rows (base) to {vocab} "
                "(adapter): new rows are no change of the base's weight, LoRA cannot hold them",
                hint="keep the full copy (convert without --embeddings-to-lora), or pass the "
                "resized base the adapter was trained on",
            )

    def _copy(self, module: str, params: dict[str, str]) -> EmbeddingModule:
        other = sorted(p for p in params if p != "weight")
        if other or "weight" not in params:
            raise ConversionError(
                f"`{module}` is saved whole with {', '.join(other) or 'no weight'}: "
                "--embeddings-to-lora converts a copied weight only",
                hint="convert the adapter without --embeddings-to-lora",
            )
        key = params["weight"]
        dtype, shape = self.specs_in[key]
        if len(shape) != 2:
            raise ConversionError(f"`{module}`'s saved weight is {list(shape)}, not a matrix")
        kind = _kind(module)
        assert kind is not None  # _find picks named embeddings only
        self._check_shape(module, shape[0], shape[1])
        return EmbeddingModule(module, kind, "modules_to_save", key, dtype, shape[0], shape[1])

    def _tokens(self, config: LoraConfig, module: str, key: str) -> EmbeddingModule:
        dtype, shape = self.specs_in[key]
        indices = _indices(config.trainable_token_indices, module)
        if indices is None:
            raise ConversionError(
                f"`{self.source.label}` has trainable tokens for `{module}` but the config's "
                f"trainable_token_indices ({config.trainable_token_indices!r}) name none for it"
            )
        if len(shape) != 2 or shape[0] != len(indices):
            raise ConversionError(
                f"`{module}`: its trainable-token delta is {list(shape)}, the config lists "
                f"{len(indices)} token indices"
            )
        if len(set(indices)) != len(indices):
            raise ConversionError(
                f"`{module}`: trainable_token_indices lists a token twice: PEFT's result then "
                "depends on the order its copy runs in"
            )
        vocab = self._module_shape(module)[0]
        bad = [i for i in indices if not 0 <= i < vocab]
        if bad:
            raise ConversionError(
                f"`{module}`: token index {bad[0]} is outside the base's {vocab} rows", hint=_HINT
            )
        self._check_shape(module, vocab, shape[1])
        kind = _kind(module) or "embedding"
        return EmbeddingModule(
            module, kind, "trainable tokens", key, dtype, vocab, shape[1], tuple(indices)
        )

    def _tied(self, modules: list[EmbeddingModule]) -> EmbeddingModule | None:
        """With tied weights PEFT ties the output layer's token adapter to the input embedding's:
        the same rows are replaced in lm_head (unless the adapter holds lm_head's own)."""
        if not self.base.tied:
            return None
        tokens = [m for m in modules if m.origin == "trainable tokens" and m.kind == "embedding"]
        if len(tokens) != 1 or any(m.module.rsplit(".", 1)[-1] == "lm_head" for m in modules):
            return None
        t = tokens[0]
        return EmbeddingModule(
            "lm_head", "linear", "tied", t.key_in, t.dtype, t.vocab, t.dim, t.indices
        )

    def change(self, m: EmbeddingModule) -> tuple[Any, Any]:
        """The rows the change touches (indices into the weight's rows) and the change on them
        ((rows, dim), float64): copy - base, or the new token rows (in the base weight's dtype,
        as PEFT casts them) - the base rows. Compared in pieces of rows: besides the two stored
        tensors only the changed rows and one piece are in memory as floats."""
        import numpy as np

        got = self.source.get(m.key_in)
        w_raw = self.base.weight("lm_head" if m.origin == "tied" else m.module)
        copy, weight = _rows(got, m.dim), _rows(w_raw, m.dim)
        mine, theirs = f"`{self.source.label}`: `{m.key_in}`", f"base weight of `{m.module}`"
        if m.indices is not None:
            new = copy(slice(None))
            if got.dtype.code != w_raw.dtype.code:  # PEFT: `delta.to(weight)` before the copy
                new = to_float64(from_float(new, w_raw.dtype.code)).reshape(-1, m.dim)
            idx = np.asarray(m.indices)
            diff = self._finite(new, mine) - self._finite(weight(idx), theirs)
            keep = (diff != 0).any(axis=1)
            return idx[keep], diff[keep]
        rows, blocks = [], []
        step = max(1, _PIECE // m.dim)
        for start in range(0, m.vocab, step):
            part = slice(start, min(start + step, m.vocab))
            diff = self._finite(copy(part), mine) - self._finite(weight(part), theirs)
            changed = np.flatnonzero((diff != 0).any(axis=1))
            rows.append(changed + start)
            blocks.append(diff[changed])
        return np.concatenate(rows), np.concatenate(blocks)

    @staticmethod
    def _finite(values: Any, what: str) -> Any:
        import numpy as np

        if not np.isfinite(values).all():
            raise ConversionError(
                f"{what} holds NaN or infinite values: the weight change cannot be factored"
            )
        return values

    def _factored(self, m: EmbeddingModule) -> tuple[Any, Any, Factored, int]:
        """Factors of the (vocab, dim) change: B (vocab, k), A (k, dim), the `Factored` and the
        number of rows the change touches (only those are factored)."""
        import numpy as np

        rows, block = self.change(m)
        f = factor(block, self.target)
        b = np.zeros((m.vocab, f.rank))
        b[rows] = f.b
        return b, f.a, f, len(rows)

    def _measure(self, m: EmbeddingModule, out_dtype: str | None) -> None:
        _, _, f, rows = self._factored(m)
        m.rows, m.rank, m.energy, m.relative_error = rows, f.rank, f.energy, f.relative_error
        if m.origin != "tied":
            m.bytes_in = numel(self.specs_in[m.key_in][1]) * m.dtype.bits // 8
        bits = m.dtype.bits if out_dtype is None else _bits(out_dtype)
        a_shape, b_shape = m.shapes(m.rank)
        m.bytes_out = (numel(a_shape) + numel(b_shape)) * bits // 8

    # --- the store -----------------------------------------------------------------------------

    def _new_specs(self) -> Specs:
        """The source's tensors, each converted one's key replaced by its new factors' keys."""
        made: dict[str, list[EmbeddingModule]] = {}
        for m in self.modules:
            made.setdefault(m.key_in, []).append(m)
        out: Specs = {}
        for key, spec in self.specs_in.items():
            if key not in made:
                out[key] = spec
                continue
            for m in made[key]:
                a_shape, b_shape = m.shapes(m.rank)
                out[m.a_key] = (m.dtype, a_shape)
                out[m.b_key] = (m.dtype, b_shape)
        return out

    def make(self, module: str) -> dict[str, RawTensor]:
        import numpy as np

        m = next(x for x in self.modules if x.module == module)
        b, a, _, _ = self._factored(m)
        if m.kind == "embedding":  # the weight's change is (B·A)ᵀ
            a, b = b.T, a.T
        return {
            m.a_key: from_float(np.ascontiguousarray(a), m.dtype.code),
            m.b_key: from_float(np.ascontiguousarray(b), m.dtype.code),
        }


def _rows(t: RawTensor, dim: int) -> Callable[[Any], Any]:
    """Rows of a stored (vocab, dim) tensor as float64, by a slice or an index array."""

    def rows(which: Any) -> Any:
        part = t.data.reshape(-1, dim)[which]
        return to_float64(RawTensor(t.dtype, tuple(part.shape), part))

    return rows


def _bits(code: str) -> int:
    from adapterctl.format.dtypes import DTYPES

    return DTYPES[code].bits


def _indices(value: Any, module: str) -> list[int] | None:
    """The token indices the config gives `module`: a list applies to the input embedding, a
    dict to the modules whose path ends with one of its keys (PEFT's rule). The config is
    untrusted: anything but a list of integers (or a dict of such lists) is refused."""
    if isinstance(value, list):
        return _int_list(value, "trainable_token_indices") if _kind(module) != "linear" else None
    if isinstance(value, dict):
        lists = {n: _int_list(v, f"trainable_token_indices[{n!r}]") for n, v in value.items()}
        for name, indices in lists.items():
            if module == name or module.endswith("." + name):
                return indices
        return None
    if value is not None:
        raise ConfigError(
            f"trainable_token_indices is {type(value).__name__}, not a list or a dict of lists",
            hint=_INDICES_HINT,
        )
    return None


_INDICES_HINT = 'trainable_token_indices is a list of token ids, or a dict {"module": [ids]}'


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise ConfigError(f"{what} is {value!r:.80}, not a list of integers", hint=_INDICES_HINT)
    return value


# --- reports and checks -----------------------------------------------------------------------


@dataclass
class EmbeddingReport(ModuleReport):
    """A module report with what the conversion to LoRA did: rows changed, bytes before/after."""

    converted_from: str = ""
    rows_changed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "converted_from": self.converted_from,
            "rows_changed": self.rows_changed,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def embedding_reports(deltas: EmbeddingDeltas, plan: Plan) -> None:
    """Each converted module's plan report told what the conversion did."""
    for m in deltas.modules:
        found = plan.module_named(m.module)
        assert found is not None  # every converted module is a LoRA module of the plan
        rep = found.report
        full = ["full rank"] if m.rank == m.full else []
        origin = "tied trainable tokens" if m.origin == "tied" else m.origin
        found.report = EmbeddingReport(
            rep.module,
            [
                f"{origin}->lora",
                f"{m.rows} rows changed",
                f"rank {m.rank}",
                *full,
                f"{m.bytes_in} -> {m.bytes_out} bytes",
                *rep.actions,
            ],
            m.full, float(m.full), rep.r, rep.alpha, m.energy, m.relative_error,
            rep.dropped_norm, m.origin, m.rows, m.bytes_in, m.bytes_out,
        )  # fmt: skip


def embedding_checks(deltas: EmbeddingDeltas, directory: Path) -> list[Check]:
    """`--verify` for each converted module: the written s·B·A against the change computed again
    from the source and the base, ||difference|| / ||change||; allowed: the reported relative
    error, plus the rounding of the factors' dtype, plus 1e-6."""
    import numpy as np

    from adapterctl.format.config import CONFIG_NAME
    from adapterctl.format.layout import SAFETENSORS_NAME
    from adapterctl.format.tensors import SafetensorsReader

    config = LoraConfig.from_file(directory / CONFIG_NAME)
    checks = []
    with SafetensorsReader(directory / SAFETENSORS_NAME) as reader, one_blas_thread():
        for m in deltas.modules:
            a, b = (
                to_float64(RawTensor(info.dtype, info.shape, reader.array(key)))
                for key, info in ((x, reader.tensors[x]) for x in (m.a_key, m.b_key))
            )
            if m.kind == "embedding":
                a, b = b.T, a.T
            k = a.shape[0]
            s = config.scaling(config.alpha_for(m.module), config.rank_for(m.module))
            rows, block = deltas.change(m)
            error = math.sqrt(_off_by(s, b, a, rows, block))
            total = float(np.linalg.norm(block))
            rel = error / total if total else (0.0 if error == 0.0 else math.inf)
            codes = (reader.tensors[x].dtype.code for x in (m.a_key, m.b_key))
            allowed = factored_allowance(m.relative_error, codes, k)
            checks.append(Check(f"{m.module} (LoRA of the {m.origin} change)", rel, allowed))
    return checks


def _off_by(s: float, b: Any, a: Any, rows: Any, block: Any) -> float:
    """||s·B·A - change||² where the change is `block` on `rows` and zero elsewhere; the
    product is made in pieces of rows (never the whole vocab x dim matrix)."""
    import numpy as np

    where = np.full(len(b), -1)
    where[rows] = np.arange(len(rows))
    total = 0.0
    step = max(1, _PIECE // max(1, a.shape[1]))
    for start in range(0, len(b), step):
        got = s * (b[start : start + step] @ a)
        at = where[start : start + step]
        changed = at >= 0
        got[changed] -= block[at[changed]]
        total += float((got**2).sum())
    return total
