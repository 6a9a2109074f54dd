"""What `extract` writes, from the two checkpoints' headers (the only data read: whether an lm_head
holds the input embedding's bytes, for tied heads): BASE's and
TUNED's tensors matched by name whatever their shard layouts, the modules whose weight change
becomes LoRA factors (`Job`), the tensors stored whole (`Whole`: --modules-to-save, --bias all),
the tensors only compared (changed ones are reported), and every refusal (a tensor in one
checkpoint only, shapes that differ, a vocabulary that grew).

Targets: by default every linear layer (a 2-D `.weight` of a module that is not an embedding or an
output head); `--target NAME` matches module paths as PEFT matches a target_modules list (the path,
or a path ending in `.NAME`) and may name embeddings (embedding LoRA) and output heads (linear
LoRA); Conv1D only for transformers' Conv1D modules of a Conv1D model type (`CONV1D_MODULES`).
A model whose output head shares the input embedding (tie_word_embeddings, an lm_head equal to it,
or, where config.json does not say, an lm_head absent from the files) has ONE weight change for
both: targeting either writes both from one factoring (`Job.heads`); several input embeddings
that would share one head, and a --target left with no module to write, are refused. --bias all
tensors are named once the modules whose weight changed are known (`placed`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from adapterctl.errors import AdapterctlError, ConversionError, InvalidOptionError
from adapterctl.format.checkpoint import TIED_EMBEDDINGS, BaseCheckpoint
from adapterctl.format.dtypes import Dtype
from adapterctl.format.files import read_small
from adapterctl.format.keys import OUTPUT_HEADS, PREFIX, TOKEN_EMBEDDINGS, module_matches
from adapterctl.format.rawtensor import FLOAT_CODES
from adapterctl.ops.merge import CONV1D_MODEL_TYPES, Kind, model_type

#: input embeddings (nn.Embedding): an embedding LoRA when targeted, never a default target
INPUT_EMBEDDINGS = TOKEN_EMBEDDINGS | {
    "wpe", "position_embeddings", "token_type_embeddings", "embed_positions",
}  # fmt: skip
#: output heads: a linear LoRA when targeted, never a default target
HEADS = OUTPUT_HEADS
#: the modules transformers builds as Conv1D in a Conv1D model type (GPT-2's task heads
#: `score`, `classifier`, `qa_outputs`, `summary` are nn.Linear)
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
_HINT = "pass the base model TUNED was fine-tuned from"

Spec = tuple[Dtype, tuple[int, ...]]


@dataclass(frozen=True)
class Job:
    """One module whose weight change is factored: `key` names its weight in both checkpoints;
    `heads`: tied output heads written from the same factors (as linear LoRA)."""

    module: str
    key: str
    kind: Kind
    shape: tuple[int, ...]
    code: str  # the factors' safetensors dtype
    heads: tuple[str, ...] = ()

    @property
    def out_in(self) -> tuple[int, int]:
        """(d_out, d_in) of the change as its factors write it (B·A): an embedding's is
        (dim, vocab), a Conv1D's its transpose."""
        a, b = self.shape[0], self.shape[1]
        return (a, b) if self.kind == "linear" else (b, a)


@dataclass(frozen=True)
class Whole:
    """A TUNED tensor stored whole under `stored` (cast to `code` when it is a float one)."""

    stored: str
    key: str
    dtype: Dtype
    shape: tuple[int, ...]
    bias_of: str | None = None  # --bias all: its module (`placed` names it once factored)


def placed(whole: Sequence[Whole], lora: set[str]) -> list[Whole]:
    """`whole` as PEFT loads it once the LoRA modules are known (those whose weight changed):
    a --bias all tensor of a LoRA module under `<module>.base_layer.bias`, any other under its
    plain name (PEFT's bias="all" on an untargeted module)."""
    return [
        replace(w, stored=f"{PREFIX}{w.bias_of}.base_layer.{w.key.rpartition('.')[2]}")
        if w.bias_of is not None and w.bias_of in lora
        else w
        for w in whole
    ]


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    whole: list[Whole] = field(default_factory=list)
    compared: list[str] = field(default_factory=list)  # changed ones are reported
    tied: bool = False
    conv1d: bool = False


def _module(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def targeted(module: str, names: Sequence[str]) -> bool:
    """PEFT's rule for a target_modules list: the path, or a path ending in `.NAME`."""
    return any(module == n or module.endswith("." + n) for n in names)


def _grew(key: str, base: tuple[int, ...], tuned: tuple[int, ...]) -> bool:
    """A vocabulary that grew: an embedding or head with more rows in TUNED."""
    leaf = _leaf(_module(key)[0])
    return (leaf in INPUT_EMBEDDINGS | HEADS and len(base) == len(tuned) == 2
            and base[1] == tuned[1] and tuned[0] > base[0])  # fmt: skip


def _sizes(keys: list[str], base: dict[str, Spec], tuned: dict[str, Spec]) -> ConversionError:
    """The first shape that differs; a grown vocabulary names both sizes and every grown
    module for --modules-to-save."""
    key = keys[0]
    b, t = base[key][1], tuned[key][1]
    grown = [k for k in keys if _grew(k, base[k][1], tuned[k][1])]
    grown.sort(key=lambda k: _leaf(_module(k)[0]) in HEADS)  # the input embedding first
    if grown:
        key = grown[0]
        b, t = base[key][1], tuned[key][1]
        names = ",".join(dict.fromkeys(_leaf(_module(k)[0]) for k in grown))
        return ConversionError(
            f"the vocabulary grew from {b[0]} (BASE) to {t[0]} (TUNED) rows in `{key}`: "
            "new rows have no base weight to change",
            hint=f"store the grown tensors whole: --modules-to-save {names}",
        )
    return ConversionError(
        f"`{key}` is {list(b)} in BASE and {list(t)} in TUNED: not the same model", hint=_HINT
    )


def _same_bytes(ckpt: BaseCheckpoint, one: str, other: str) -> bool:
    pieces = ckpt.pieces(other)
    for piece in ckpt.pieces(one):
        if bytes(piece) != bytes(next(pieces, b"")):
            return False
    return next(pieces, None) is None


def _config_tie(ckpt: BaseCheckpoint) -> bool | None:
    """config.json's tie_word_embeddings, None where it does not say."""
    try:
        config: Any = json.loads(read_small(ckpt.path / "config.json", "model config"))
    except (AdapterctlError, ValueError, RecursionError):
        return None
    said = config.get("tie_word_embeddings") if isinstance(config, dict) else None
    return said if isinstance(said, bool) else None


def _tied(base: BaseCheckpoint, tuned: BaseCheckpoint, names: dict[str, Spec]) -> bool:
    """Whether the output head shares the input embedding: config.json says so, or an lm_head
    equal to it in both checkpoints, or (only where config.json does not say: an explicit false
    wins) the files hold one input embedding and no output head."""
    said = {_config_tie(base), _config_tie(tuned)}
    if True in said:
        return True
    embed = [k for k in names if k.endswith(TIED_EMBEDDINGS)]
    head = [k for k in names if k.endswith("lm_head.weight")]
    if len(embed) == len(head) == 1 and names[embed[0]] == names[head[0]]:
        return all(_same_bytes(c, embed[0], head[0]) for c in (tuned, base))
    heads = [k for k in names if _module(k)[1] == "weight" and _leaf(_module(k)[0]) in HEADS]
    return False not in said and not heads and len(embed) == 1


def _head_module(names: dict[str, Spec], embedding: str) -> str:
    """The tied output head's module path: the lm_head in the files, else `lm_head` (where
    transformers' *ForCausalLM models keep it)."""
    heads = [
        _module(k)[0] for k in names if k.endswith(".weight") and _leaf(_module(k)[0]) in HEADS
    ]
    return heads[0] if heads else "lm_head"


def plan(
    base: BaseCheckpoint,
    tuned: BaseCheckpoint,
    *,
    targets: Sequence[str],
    modules_to_save: Sequence[str],
    bias: str,
    code: str | None,
) -> Plan:
    """Every module's job, the whole tensors and the compared ones; refusals raised here,
    before anything is read or written."""
    base_specs = {n: (d, s) for n, _, d, s in base.tensors()}
    tuned_specs = {n: (d, s) for n, _, d, s in tuned.tensors()}
    out = Plan(tied=_tied(base, tuned, tuned_specs))
    out.conv1d = model_type(base) in CONV1D_MODEL_TYPES

    def saved(key: str) -> bool:
        return any(module_matches(n, _module(key)[0]) for n in modules_to_save)

    lonely = [k for k in tuned_specs if k not in base_specs and not saved(k)]
    lonely += [k for k in base_specs if k not in tuned_specs and not saved(k)]
    if lonely:
        where = "TUNED" if lonely[0] in tuned_specs else "BASE"
        more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
        raise ConversionError(
            f"`{lonely[0]}` is only in {where}{more}: the checkpoints hold different tensors",
            hint="pass the base TUNED was fine-tuned from, or store such tensors whole with "
            "--modules-to-save",
        )
    differ = [k for k, (_, s) in tuned_specs.items() if not saved(k) and base_specs[k][1] != s]
    if differ:
        raise _sizes(differ, base_specs, tuned_specs)
    head_jobs: dict[str, str] = {}  # tied: the input embedding's key -> the head's module
    chosen: list[tuple[str, Kind]] = []
    matched: set[str] = set()
    for key, (dtype, shape) in tuned_specs.items():
        module, param = _module(key)
        if saved(key):
            continue
        leaf = _leaf(module)
        embedding, head = leaf in INPUT_EMBEDDINGS, leaf in HEADS
        if param != "weight" or len(shape) != 2:
            continue
        if targets:
            hit = [t for t in targets if targeted(module, [t])]
            matched.update(hit)
            if out.tied and key.endswith(TIED_EMBEDDINGS):
                head_name = _head_module(tuned_specs, module)
                also = [t for t in targets if targeted(head_name, [t])]
                matched.update(also)
                if also and not hit:
                    hit = also
                if hit:
                    head_jobs[key] = head_name
            if not hit:
                continue
        elif embedding or head:
            continue
        if head and out.tied:
            continue  # written from the input embedding's change
        for where, (d, _) in (("TUNED", (dtype, shape)), ("BASE", base_specs[key])):
            if d.code not in FLOAT_CODES:
                raise ConversionError(f"`{key}` is {d.display_name} in {where}: not a float weight")
        kind: Kind = "embedding" if embedding else (
            "conv1d" if out.conv1d and leaf in CONV1D_MODULES else "linear"
        )  # fmt: skip
        chosen.append((key, kind))
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        raise InvalidOptionError(
            f"--target {unmatched[0]!r} matches no 2-D weight of TUNED",
            hint="name modules as PEFT's target_modules does: q_proj, mlp.down_proj, lm_head",
        )
    if len(head_jobs) > 1:
        raise ConversionError(
            f"the tied output head would get the change of {len(head_jobs)} input embeddings "
            f"(`{'`, `'.join(list(head_jobs)[:2])}`)",
            hint="target one input embedding by its path, e.g. --target "
            + _module(next(iter(head_jobs)))[0],
        )
    for key, kind in chosen:
        dtype, shape = tuned_specs[key]
        module, _ = _module(key)
        heads = (head_jobs[key],) if key in head_jobs else ()
        out.jobs.append(Job(module, key, kind, shape, code or _factor_code(dtype), heads))
    lora = [j.module for j in out.jobs] + [h for j in out.jobs for h in j.heads]
    idle = [t for t in targets if not any(targeted(m, [t]) for m in lora)]
    if idle:
        raise InvalidOptionError(
            f"--target {idle[0]!r} names only an output head tied to the input embedding, "
            "whose change is written from the embedding's",
            hint="target the input embedding (e.g. embed_tokens), or store the head whole "
            "with --modules-to-save",
        )
    done = {j.key for j in out.jobs} | {f"{h}.weight" for j in out.jobs for h in j.heads}
    for key, (dtype, shape) in tuned_specs.items():
        module, param = _module(key)
        if saved(key) or (bias == "all" and param == "bias"):
            of = None if saved(key) else module
            out.whole.append(Whole(f"{PREFIX}{module}.{param}", key, dtype, shape, of))
        elif key not in done:
            out.compared.append(key)
    return out


def _factor_code(dtype: Dtype) -> str:
    return dtype.code if dtype.code in ("F32", "BF16", "F16") else "F32"


def task_type(config: Any) -> str | None:
    """CAUSAL_LM where every architecture the base's config names is a *ForCausalLM (or GPT-2's
    LMHeadModel), else None."""
    arch = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(arch, list) or not arch or not all(isinstance(a, str) for a in arch):
        return None
    if all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        return "CAUSAL_LM"
    return None
