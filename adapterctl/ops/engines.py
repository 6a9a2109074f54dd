"""Serving readiness (`inspect --engine`): would vLLM, TGI, LoRAX, llama.cpp or PEFT load an
adapter, and compute what PEFT 0.21.2 computes? (docs/engines.md lists every rule and its source.)

The rules are data: one table per engine and version range, each rule an id, a level ("error":
the engine refuses the adapter; "warning": it loads and computes something else), a predicate
over the adapter (`Facts`: config, classified tensors, per-module rank/alpha/scaling as
`ops.checks` worked them out from the patterns, and the base's config.json where given) that
returns the finding's message or None, and what the serve command then needs. Each rule names
its source (the engine's file@version) in its `source` field, each table its files in the
comment above it. No torch, no network (a Hub base's config.json is downloaded, nothing else).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterctl.errors import InvalidOptionError
from adapterctl.format.config import PEFT_VERSION, LoraConfig
from adapterctl.format.keys import KeyInfo
from adapterctl.format.peftversions import peft_version_findings, release
from adapterctl.ops.checks import ModuleEntry, TensorEntry, tensor_kinds
from adapterctl.ops.inspect import AdapterReport, InspectReport

# --- what the rules look at ------------------------------------------------------------------

#: the factor kinds every engine reads; anything else is a full tensor, a bias, a magnitude...
FACTOR_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Facts:
    """One adapter as the rules see it (built from an `inspect` report)."""

    config: LoraConfig
    tensors: tuple[TensorEntry, ...]
    kinds: tuple[tuple[str, str, KeyInfo], ...]  # per tensor: (module path, kind, key info)
    modules: tuple[ModuleEntry, ...]
    base: dict[str, Any] | None = None  # the base's config.json, with --base

    @property
    def lora(self) -> list[ModuleEntry]:
        """The modules with LoRA factors (rank known)."""
        return [m for m in self.modules if m.r is not None]

    def max_rank(self) -> int:
        ranks = [m.r for m in self.lora if m.r is not None]
        return max(ranks, default=int(self.config.r or 0))

    def extra_tensors(self, allowed: Sequence[str] = FACTOR_KINDS) -> list[tuple[str, str]]:
        """(tensor name, kind) of every tensor whose kind is not in `allowed`."""
        return [
            (t.name, k)
            for t, (_, k, _) in zip(self.tensors, self.kinds, strict=True)
            if k not in allowed
        ]

    def global_scaling(self) -> float:
        """One scale per adapter, as the serving engines take it: from the global r/lora_alpha."""
        c = self.config
        return float(c.scaling(float(c.lora_alpha), int(c.r)))

    def layer_types(self) -> dict[str, set[int | None]]:
        """LoRA module type (last path component) -> the layer indices it appears in."""
        found: dict[str, set[int | None]] = {}
        for m in self.lora:
            name = m.path.replace(".base_layer", "")
            match = _LAYER.search(name + ".")
            found.setdefault(name.rsplit(".", 1)[-1], set()).add(
                int(match.group(1)) if match else None
            )
        return found

    def num_layers(self) -> int | None:
        """The base's layer count (--base), else the highest layer index the adapter names + 1."""
        if self.base is not None:
            cfg = self.base.get("text_config") or self.base
            n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
            if isinstance(n, int):
                return n
        found = [i for s in self.layer_types().values() for i in s if i is not None]
        return max(found) + 1 if found else None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def _some(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- predicates shared by several engines (each engine's table says which it uses) ------------

Check = Callable[[Facts], str | None]


def _patterns_ignored(f: Facts) -> str | None:
    """One scale per adapter from the global r/lora_alpha: modules whose PEFT scaling (patterns
    applied) differs get another delta."""
    one = f.global_scaling()
    wrong = [m.path for m in f.lora if m.scaling is not None and not _close(m.scaling, one)]
    if not wrong:
        return None
    return (
        f"takes one scale per adapter ({one:g}, from `r` and `lora_alpha`) and "
        f"ignores rank_pattern/alpha_pattern: {len(wrong)} module(s) get another scale than "
        f"PEFT's ({_some(wrong)})"
    )


def _stacked_ranks(pad: Callable[[int], int]) -> Check:
    """The factors of one layer type are stacked across layers (torch.stack), after `pad`: ranks
    that differ within a type after padding fail to load."""

    def check(f: Facts) -> str | None:
        per_type: dict[str, set[int]] = {}
        for m in f.lora:
            if m.r is not None:
                kind = m.path.replace(".base_layer", "").rsplit(".", 1)[-1]
                per_type.setdefault(kind, set()).add(pad(m.r))
        mixed = sorted(k for k, ranks in per_type.items() if len(ranks) > 1)
        if not mixed:
            return None
        detail = "; ".join(f"{k}: {sorted(per_type[k])}" for k in mixed)
        return f"stacks each layer type's factors and cannot stack different ranks ({detail})"

    return check


def _types_dropped(supported: frozenset[str]) -> Check:
    def check(f: Facts) -> str | None:
        dropped = sorted(t for t in f.layer_types() if t not in supported)
        if not dropped:
            return None
        return f"has no LoRA layer for {_some(dropped)}: those modules are dropped (a log line)"

    return check


def _partial_types(supported: frozenset[str]) -> Check:
    """A layer type missing from any layer is dropped whole ("no LoRA weight for this layer")."""

    def check(f: Facts) -> str | None:
        n = f.num_layers()
        if n is None:
            return None
        partial = sorted(
            t
            for t, layers in f.layer_types().items()
            if t in supported and t != "lm_head" and set(range(n)) - layers
        )
        if not partial:
            return None
        return (
            f"drops a layer type unless every one of the {n} layers has it: {_some(partial)} "
            "are dropped in all layers"
        )

    return check


def _base_copy(name: str, kind: str) -> bool:
    """PEFT's copy of a targeted embedding's own weight (`embed_tokens.base_layer.weight`, saved
    with save_embedding_layers): the base's weight, unless tokens were added (`_resized`)."""
    return kind == "embedding" and name.endswith(".base_layer.weight")


def _resized(f: Facts) -> str | None:
    """With --base: an embedding copy whose row count is not the base's vocab_size means tokens
    were added in training; an engine that keeps the base's embeddings has other ones."""
    if f.base is None:
        return None
    vocab = (f.base.get("text_config") or f.base).get("vocab_size")
    resized = [
        f"`{t.name}` ({t.shape[0]} rows)"
        for t, (_, k, _) in zip(f.tensors, f.kinds, strict=True)
        if _base_copy(t.name, k) and t.shape and t.shape[0] != vocab
    ]
    if not isinstance(vocab, int) or not resized:
        return None
    return (
        f"keeps the base's embeddings (vocab_size {vocab}) and not the adapter's resized copies: "
        + ", ".join(resized[:3])
    )


def _tensors_ignored(f: Facts) -> str | None:
    extra = [(n, k) for n, k in f.extra_tensors(("lora_A", "lora_B")) if not _base_copy(n, k)]
    if not extra:
        return None
    kinds = sorted({k for _, k in extra})
    return (
        f"reads only lora_A/lora_B and ignores {len(extra)} other tensor(s) ({', '.join(kinds)}: "
        f"{_some([n for n, _ in extra])}); PEFT applies them"
    )


def _feature(field_name: str, text: str) -> Check:
    def check(f: Facts) -> str | None:
        value = getattr(f.config, field_name)
        on = bool(value) and value != "none"
        return text.format(value=value) if on else None

    return check


# --- rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    id: str
    level: str  # "error" | "warning"
    check: Check
    source: str  # the engine file@version the rule encodes


@dataclass(frozen=True)
class EngineTable:
    engine: str
    version: str
    rules: tuple[Rule, ...]
    needs: Callable[[Facts], list[str]] = field(default=lambda f: [])


# vLLM: vllm/config/lora.py@v0.11 (MaxLoRARanks, default 16), vllm/lora/peft_helper.py@v0.11
# (_validate_features, validate_legal), vllm/lora/utils.py@v0.11 (parse_fine_tuned_lora_name
# raises "... is unsupported LoRA weight" for any other suffix).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
#: vllm/config/lora.py@v0.11 LoRAExtraVocabSize = Literal[256, 512], default 256
VLLM_MAX_EXTRA_VOCAB = 512
VLLM_DEFAULT_EXTRA_VOCAB = 256
#: vllm/lora/utils.py@v0.11 is_base_embeddding_weights: PEFT's embedding copies, skipped
VLLM_SKIPPED_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


def _vllm_rank(f: Facts) -> str | None:
    r = f.max_rank()
    if r <= VLLM_MAX_LORA_RANKS[-1]:
        return None
    return f"rank {r} is above the largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"


def _vllm_extra(f: Facts) -> str | None:
    covered = {"modules_to_save", "lora_magnitude_vector", "bias"}  # their own rules
    extra = [
        (n, k)
        for n, k in f.extra_tensors()
        if k not in covered and not n.endswith(VLLM_SKIPPED_SUFFIXES)
    ]
    if not extra:
        return None
    return f"refuses tensors other than LoRA factors: {_some([n for n, _ in extra])}"


def _embedding_rows(f: Facts) -> tuple[int | None, int]:
    """(the base's vocab_size, the most token rows an embedding LoRA holds)."""
    vocab = (f.base.get("text_config") or f.base).get("vocab_size") if f.base else None
    rows = [
        t.shape[1]
        for t, (_, k, _) in zip(f.tensors, f.kinds, strict=True)
        if k == "lora_embedding_A" and len(t.shape) == 2
    ]
    return (vocab if isinstance(vocab, int) else None), max(rows, default=0)


def _vllm_vocab(f: Facts) -> str | None:
    vocab, rows = _embedding_rows(f)
    if vocab is None or rows <= vocab + VLLM_MAX_EXTRA_VOCAB:
        return None
    return (
        f"embedding LoRA has {rows} token rows, more than the base's vocab_size {vocab} plus the "
        f"largest --lora-extra-vocab-size ({VLLM_MAX_EXTRA_VOCAB})"
    )


def _vllm_needs(f: Facts) -> list[str]:
    r = f.max_rank()
    fits = [x for x in VLLM_MAX_LORA_RANKS if x >= r]
    needs = ["--enable-lora"]
    if fits and fits[0] > VLLM_DEFAULT_MAX_RANK:
        needs.append(f"--max-lora-rank {fits[0]}")
    vocab, rows = _embedding_rows(f)
    if vocab is not None and rows > vocab + VLLM_DEFAULT_EXTRA_VOCAB:
        needs.append(f"--lora-extra-vocab-size {VLLM_MAX_EXTRA_VOCAB}")
    return needs


VLLM = EngineTable(
    "vllm",
    "0.11",
    (
        Rule("vllm.modules_to_save", "error",
             _feature("modules_to_save", "refuses modules_to_save ({value})"),
             "vllm/lora/peft_helper.py@v0.11 _validate_features"),
        Rule("vllm.dora", "error", _feature("use_dora", "does not support DoRA (use_dora)"),
             "vllm/lora/peft_helper.py@v0.11 _validate_features"),
        Rule("vllm.bias", "error", _feature("bias", "does not support bias={value!r}"),
             "vllm/lora/peft_helper.py@v0.11 validate_legal"),
        Rule("vllm.max_rank", "error", _vllm_rank,
             "vllm/config/lora.py@v0.11 MaxLoRARanks; peft_helper.py validate_legal"),
        Rule("vllm.tensors", "error", _vllm_extra,
             "vllm/lora/utils.py@v0.11 parse_fine_tuned_lora_name"),
        Rule("vllm.vocab", "error", _vllm_vocab,
             "vllm/lora/layers VocabParallelEmbeddingWithLoRA@v0.11 vocab + extra vocab (--base)"),
        Rule("vllm.resized_embeddings", "warning", _resized,
             "vllm/lora/models.py@v0.11 skips is_base_embeddding_weights (--base)"),
        Rule("vllm.patterns", "warning", _patterns_ignored,
             "vllm/lora/peft_helper.py@v0.11 one vllm_lora_scaling_factor from r/lora_alpha"),
    ),
    _vllm_needs,
)  # fmt: skip

# TGI: server/text_generation_server/adapters/lora.py@v3.3.7 (prepare_weights: scale from
# config.r/lora_alpha/use_rslora, torch.stack per layer type, `return None` for a type missing in
# a layer), server/text_generation_server/models/__init__.py@v3.3.7 (adapter_layers; the other
# weights only logged as "unused adapter weights").
TGI_LAYERS = frozenset(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
     "c_proj", "c_fc")
)  # fmt: skip
TGI = EngineTable(
    "tgi",
    "3.3",
    (
        Rule("tgi.ranks", "error", _stacked_ranks(lambda r: r),
             "adapters/lora.py@v3.3.7 LoraWeights torch.stack"),
        Rule("tgi.patterns", "warning", _patterns_ignored,
             "adapters/lora.py@v3.3.7 get_scaling_factor(config.lora_alpha, config.r)"),
        Rule("tgi.layer_types", "warning", _types_dropped(TGI_LAYERS),
             "models/__init__.py@v3.3.7 adapter_layers"),
        Rule("tgi.partial_layers", "warning", _partial_types(TGI_LAYERS),
             "adapters/lora.py@v3.3.7 prepare_weights returns None"),
        Rule("tgi.resized_embeddings", "warning", _resized,
             "models/__init__.py@v3.3.7 reads only lora_A/lora_B (--base)"),
        Rule("tgi.tensors", "warning", _tensors_ignored,
             "models/__init__.py@v3.3.7 unused adapter weights"),
    ),
)  # fmt: skip

# LoRAX: server/lorax_server/adapters/lora.py@0.4.0-23-ga7394ba (as TGI, which copied it), and
# server/lorax_server/utils/punica.py@the same (pad_rank: up to MIN_SGMV_RANK=8, else to a
# multiple of SGMV_BLOCK_SIZE=16), server/lorax_server/models/flash_llama.py (ADAPTER_LAYERS).
LORAX_LAYERS = frozenset(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
)


def lorax_padded_rank(r: int, world_size: int = 1) -> int:
    """LoRAX's SGMV rank: at least 8 (x world size), above that the next multiple of 16."""
    low = 8 * world_size
    return low if r <= low else -(-r // 16) * 16


def _lorax_needs(f: Facts) -> list[str]:
    padded = sorted({lorax_padded_rank(m.r) for m in f.lora if m.r is not None})
    ranks = sorted({m.r for m in f.lora if m.r is not None})
    if padded == ranks:
        return []
    return [f"rank padded to {', '.join(map(str, padded))} for SGMV (1 GPU; zeros, same delta)"]


LORAX = EngineTable(
    "lorax",
    "0.4",
    (
        Rule("lorax.ranks", "error", _stacked_ranks(lorax_padded_rank),
             "adapters/lora.py@0.4.0-23-ga7394ba torch.stack after pad_rank"),
        Rule("lorax.patterns", "warning", _patterns_ignored,
             "adapters/lora.py@0.4.0-23-ga7394ba get_scaling_factor(config.lora_alpha, config.r)"),
        Rule("lorax.layer_types", "warning", _types_dropped(LORAX_LAYERS),
             "models/flash_llama.py@0.4.0-23-ga7394ba ADAPTER_LAYERS"),
        Rule("lorax.partial_layers", "warning", _partial_types(LORAX_LAYERS),
             "adapters/lora.py@0.4.0-23-ga7394ba load returns None"),
        Rule("lorax.resized_embeddings", "warning", _resized,
             "models/model.py@0.4.0-23-ga7394ba reads only lora_A/lora_B (--base)"),
        Rule("lorax.tensors", "warning", _tensors_ignored,
             "models/model.py@0.4.0-23-ga7394ba unused adapter weights"),
    ),
    _lorax_needs,
)  # fmt: skip

# llama.cpp: convert_lora_to_gguf.py@master 0b03ada (get_tensors: only lora_A/B and
# lora_embedding_A/B, `.base_layer.weight` skipped, `_layernorm`/`.norm` full tensors kept,
# anything else sys.exit(1); modify_tensors: lm_head on a tied-embedding base raises; one
# lora_alpha written to the GGUF), src/llama-adapter.h@the same (get_scale: alpha / the
# tensor's own rank; use_rslora is never read).


def _llamacpp_tensors(f: Facts) -> str | None:
    bad = [
        n
        for n, _ in f.extra_tensors()
        if ".base_layer.weight" not in n and "_layernorm" not in n and ".norm" not in n
    ]
    if not bad:
        return None
    full = [n for n in bad if ".embed_tokens.weight" in n or ".lm_head.weight" in n]
    why = " (full embedding copies, from new tokens)" if full else ""
    return f"the converter refuses tensors other than lora_A/lora_B{why}: {_some(bad)}"


def _llamacpp_tied(f: Facts) -> str | None:
    if f.base is None or not any(m.path.endswith("lm_head") for m in f.lora):
        return None
    cfg = f.base.get("text_config") or f.base
    if not cfg.get("tie_word_embeddings", f.base.get("tie_word_embeddings", True)):
        return None
    return "the base ties lm_head to the embeddings: the converter refuses LoRA on lm_head"


def _llamacpp_arch(f: Facts) -> str | None:
    if f.base is None:
        return None
    archs = (f.base.get("text_config") or {}).get("architectures", f.base.get("architectures"))
    if isinstance(archs, list) and archs:
        return None
    return "the base's config.json names no `architectures`: the converter cannot map it"


def _llamacpp_scale(f: Facts) -> str | None:
    """Per tensor: lora_alpha / its own rank (alpha_pattern and use_rslora never read)."""
    alpha = float(f.config.lora_alpha)
    wrong = [
        m.path
        for m in f.lora
        if m.r and m.scaling is not None and not _close(alpha / m.r, m.scaling)
    ]
    if not wrong:
        return None
    why = "ignores use_rslora" if f.config.use_rslora else "ignores alpha_pattern"
    return (
        f"scales each tensor by lora_alpha / its rank and {why}: {len(wrong)} module(s) get "
        f"another scale than PEFT's ({_some(wrong)})"
    )


LLAMACPP = EngineTable(
    "llama.cpp",
    "master@0b03ada",
    (
        Rule("llama.cpp.tensors", "error", _llamacpp_tensors,
             "convert_lora_to_gguf.py@0b03ada get_tensors"),
        Rule("llama.cpp.tied_lm_head", "error", _llamacpp_tied,
             "convert_lora_to_gguf.py@0b03ada modify_tensors (llama.cpp#9065)"),
        Rule("llama.cpp.architecture", "error", _llamacpp_arch,
             "convert_lora_to_gguf.py@0b03ada ModelBase.from_model_architecture"),
        Rule("llama.cpp.resized_embeddings", "warning", _resized,
             "convert_lora_to_gguf.py@0b03ada skips `.base_layer.weight` (--base)"),
        Rule("llama.cpp.scale", "warning", _llamacpp_scale,
             "src/llama-adapter.h@0b03ada llama_adapter_lora_weight::get_scale"),
    ),
    lambda f: ["convert_lora_to_gguf.py --base BASE_DIR, then --lora ADAPTER.gguf"],
)  # fmt: skip

TABLES: dict[str, EngineTable] = {t.engine: t for t in (VLLM, TGI, LORAX, LLAMACPP)}
ENGINES = ("vllm", "tgi", "lorax", "llama.cpp", "peft")


# --- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    level: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "rule": self.rule, "message": self.message}


@dataclass(frozen=True)
class Verdict:
    engine: str
    version: str
    findings: tuple[Finding, ...]
    needs: tuple[str, ...]

    @property
    def loads(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    @property
    def same_as_peft(self) -> bool:
        return self.loads and not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "version": self.version,
            "loads": self.loads,
            "same_as_peft": self.same_as_peft,
            "findings": [f.to_dict() for f in self.findings],
            "needs": list(self.needs),
        }


def parse_engine(spec: str) -> tuple[str, str]:
    """`vllm` / `peft@0.10` -> (engine, version); refuses engines and versions without a table."""
    name, _, version = spec.partition("@")
    name = name.strip().lower()
    if name not in ENGINES:
        raise InvalidOptionError(
            f"unknown engine `{spec}`", hint=f"engines: {', '.join(ENGINES)} (peft@X.Y)"
        )
    if name == "peft":
        return name, release(version) if version and version != PEFT_VERSION else PEFT_VERSION
    known = TABLES[name].version
    if version and version != known:
        raise InvalidOptionError(
            f"no rules for {name} {version}", hint=f"{name}'s rules are for version {known}"
        )
    return name, known


def evaluate(facts: Facts, spec: str, peft_errors: Sequence[str] = ()) -> Verdict:
    """The verdict of one engine (`vllm`, `peft@0.10`, ...) on one adapter; `peft_errors`: what
    `inspect` found that PEFT 0.21.2 itself refuses (the `peft` engine's own findings)."""
    name, version = parse_engine(spec)
    if name == "peft":
        return _peft_verdict(facts, version, peft_errors)
    table = TABLES[name]
    found = []
    for rule in table.rules:
        message = rule.check(facts)
        if message is not None:
            found.append(Finding(rule.level, rule.id, message))
    needs = table.needs(facts) if not any(f.level == "error" for f in found) else []
    return Verdict(name, version, tuple(found), tuple(needs))


def _peft_verdict(facts: Facts, version: str, peft_errors: Sequence[str]) -> Verdict:
    """PEFT 0.21.2 loads what `inspect` finds no error in, and is the reference; another
    release: what `format.peftversions` says that release does with this config and modules."""
    found = [Finding("error", "peft.file", m) for m in peft_errors]
    if version != PEFT_VERSION:
        modules = sorted({m.path.replace(".base_layer", "") for m in facts.lora})
        found += [Finding(*f) for f in peft_version_findings(facts.config, version, modules)]
    return Verdict("peft", version, tuple(found), ())


def read_base_config(base: str | os.PathLike[str], *, token: str | None = None) -> dict[str, Any]:
    """The base's config.json: a local folder's (or the file itself), or a Hub id's (only that
    file downloaded)."""
    from adapterctl.format.files import read_small
    from adapterctl.ops.hub import hub_errors, hub_or_local

    found = hub_or_local(base, bare=True)
    if isinstance(found, str):
        from huggingface_hub import hf_hub_download

        from adapterctl.ops.hub import endpoint

        with hub_errors(found, path="config.json"):
            path = hf_hub_download(found, "config.json", token=token, endpoint=endpoint())
    else:
        path = os.fspath(found / "config.json" if found.is_dir() else found)
    try:
        data = json.loads(read_small(path, "model config"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidOptionError(f"`{path}` is not a model's config.json: {e}") from e
    if not isinstance(data, dict):
        raise InvalidOptionError(f"`{path}` is not a model's config.json (not a JSON object)")
    return data


# --- an inspect report with verdicts ----------------------------------------------------------


@dataclass(frozen=True)
class EngineReport:
    """`inspect --engine`: the inspect report and, per adapter, one verdict per engine asked."""

    inspect: InspectReport
    verdicts: tuple[tuple[Verdict, ...], ...]  # per adapter, in the report's order

    @property
    def failed(self) -> bool:
        """Some engine asked for would not load an adapter or would compute something else."""
        return any(not v.same_as_peft for vs in self.verdicts for v in vs)

    def to_dict(self, *, lazy: bool = False) -> dict[str, Any]:
        doc = self.inspect.to_dict(lazy=lazy)
        for adapter, verdicts in zip(doc["adapters"], self.verdicts, strict=True):
            adapter["engines"] = [v.to_dict() for v in verdicts]
        return doc


def facts_of(adapter: AdapterReport, base: dict[str, Any] | None = None) -> Facts | None:
    """What the rules see of one inspected adapter (None: it has no config)."""
    if adapter.config is None:
        return None
    kinds = adapter.kinds or tuple(tensor_kinds(adapter.tensors, adapter.config))
    return Facts(adapter.config, adapter.tensors, kinds, adapter.modules, base)


def judge(
    report: InspectReport, engines: Sequence[str], base: dict[str, Any] | None = None
) -> EngineReport:
    """Every adapter of `report` against every engine of `engines` (`vllm`, `peft@0.10`...)."""
    for spec in engines:
        parse_engine(spec)  # refuse a bad name before any work
    verdicts = []
    for adapter in report.adapters:
        facts = facts_of(adapter, base)
        if facts is None:
            missing = Finding("error", "config", "no adapter_config.json: no engine loads it")
            verdicts.append(tuple(Verdict(*parse_engine(s), (missing,), ()) for s in engines))
            continue
        peft_errors = [p.message for p in adapter.errors]
        verdicts.append(tuple(evaluate(facts, s, peft_errors) for s in engines))
    return EngineReport(report, tuple(verdicts))
