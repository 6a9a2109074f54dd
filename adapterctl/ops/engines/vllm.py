"""vLLM's rules, per release range (0.4 to 0.34), read from each minor release's last patch
sdist on PyPI (`python -m tests.engine_sources vllm` re-reads them):

- `vllm/config.py` (0.4-0.10) / `vllm/config/lora.py` (0.11-0.34): `LoRAConfig`, the
  `max_lora_rank` choices and the extra vocabulary sizes;
- `vllm/lora/peft_helper.py` (0.6-0.34): `PEFTHelper._validate_features`, `validate_legal`,
  the scaling (`vllm_lora_scaling_factor`, `get_rank_and_scaling` from 0.32);
- `vllm/lora/utils.py`: `parse_fine_tuned_lora_name` (which tensor names load),
  `is_base_embeddding_weights` (0.12-0.17; `is_base_embedding_weights` from 0.18);
- `vllm/lora/models.py` (0.4-0.12) / `vllm/lora/lora_model.py` (0.13-0.34): `from_lora_tensors`
  (the scale of 0.4-0.5, the copies skipped from 0.12), `activate_adapter` (0.6-0.10: bias
  tensors refused without --enable-lora-bias);
- `vllm/lora/layers/vocal_parallel_embedding.py` (`vocab_parallel_embedding.py` from 0.29):
  the embedding LoRA's rows (base vocab + extra vocab up to 0.11, the base vocab from 0.12).

0.15 has no sdist on PyPI (wheels only) and was not read; 0.14 and 0.16 agree on every rule.
"""

from __future__ import annotations

from adapterctl.ops.engines.facts import (
    Check,
    EngineTable,
    Facts,
    Rule,
    embedding_rows,
    feature,
    patterns_ignored,
    release_key,
    resized,
    some,
)

RELEASES = tuple(f"0.{n}" for n in range(4, 35))
DEFAULT_MAX_RANK = 16  # every release (engine/arg_utils.py 0.4-0.7, LoRAConfig 0.8-0.34)
#: the `--max-lora-rank` choices: (first release, choices)
MAX_LORA_RANKS = (
    ("0.4", (8, 16, 32, 64)),
    ("0.5", (8, 16, 32, 64, 128, 256)),
    ("0.8", (8, 16, 32, 64, 128, 256, 320, 512)),
    ("0.11", (1, 8, 16, 32, 64, 128, 256, 320, 512)),
)
#: `--lora-extra-vocab-size`: default 256, at most 512, up to 0.11; none from 0.12
EXTRA_VOCAB_UNTIL = "0.11"
MAX_EXTRA_VOCAB = 512
DEFAULT_EXTRA_VOCAB = 256
#: utils.py is_base_embedding_weights (0.12-0.34): PEFT's embedding copies, skipped
SKIPPED_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
#: peft_helper.py _validate_features (0.31-0.34): the modules_to_save a classifier may have
HEADS = ("classifier", "score")
#: peft_helper.py _init_is_supported (0.32-0.34): init_lora_weights strings that load
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def max_lora_ranks(version: str) -> tuple[int, ...]:
    return [c for first, c in MAX_LORA_RANKS if release_key(first) <= release_key(version)][-1]


def _extra_vocab(version: str) -> int:
    """The largest extra vocabulary an embedding LoRA may add (0 from 0.12)."""
    return MAX_EXTRA_VOCAB if release_key(version) <= release_key(EXTRA_VOCAB_UNTIL) else 0


def _rank(version: str) -> Check:
    def check(f: Facts) -> str | None:
        r, largest = f.max_rank(), max_lora_ranks(version)[-1]
        return (
            None if r <= largest else f"rank {r} is above the largest --max-lora-rank ({largest})"
        )

    return check


def _head(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in HEADS


def _tensors(
    *, skip_copies: bool, covered: tuple[str, ...] = (), biases: bool = False, heads: bool = False
) -> Check:
    """parse_fine_tuned_lora_name: lora_A/lora_B `.weight` and lora_embedding_A/B load; so do
    `*.bias` (0.6-0.10), `score`/`classifier` weights (0.31-); PEFT's embedding copies are
    skipped from 0.12; `covered`: kinds another rule of the range refuses first."""

    def check(f: Facts) -> str | None:
        bad = [
            n
            for n, k in f.extra_tensors()
            if k not in covered
            and not (skip_copies and n.endswith(SKIPPED_SUFFIXES))
            and not (biases and n.endswith(".bias"))
            and not (heads and _head(n))
        ]
        if not bad:
            return None
        return f"refuses tensors other than LoRA factors: {some(bad)}"

    return check


def _vocab(version: str) -> Check:
    """Up to 0.11 an embedding LoRA's rows fit the base's vocabulary plus the extra one; from
    0.12 every embedding LoRA has exactly the base's rows (lora_model.py from_lora_tensors: "The
    embedding LoRA size(...) must be consistent with the base model's vocabulary size")."""

    def check(f: Facts) -> str | None:
        vocab, rows, extra = f.vocab_size(), embedding_rows(f), _extra_vocab(version)
        fewer = [(n, r) for n, r in _embedding_widths(f) if vocab is not None and r < vocab]
        if fewer and not extra and rows <= (vocab or 0):
            return (
                f"embedding LoRA has {min(r for _, r in fewer)} token rows, fewer than the "
                f"base's vocab_size {vocab} (it needs them equal): {some([n for n, _ in fewer])}"
            )
        if vocab is None or rows <= vocab + extra:
            return None
        room = f"the base's vocab_size {vocab}" + (
            f" plus the largest --lora-extra-vocab-size ({extra})" if extra else ""
        )
        return f"embedding LoRA has {rows} token rows, more than {room}"

    return check


def _embedding_widths(f: Facts) -> list[tuple[str, int]]:
    """Each embedding LoRA's lora_embedding_A name and token rows."""
    return [
        (t.name, t.shape[1])
        for t, (_, k, _) in zip(f.tensors, f.kinds, strict=True)
        if k == "lora_embedding_A" and len(t.shape) == 2
    ]


def _modules_to_save(allowed: tuple[str, ...]) -> Check:
    def check(f: Facts) -> str | None:
        saved = f.config.modules_to_save or []
        bad = [m for m in saved if m not in allowed]
        if not bad:
            return None
        also = f" (only {' or '.join(allowed)} of a classifier)" if allowed else ""
        return f"refuses modules_to_save {bad}{also}"

    return check


def _features(f: Facts) -> str | None:
    """peft_helper.py _validate_features (0.32-0.34): features it reads only to refuse them."""
    c = f.config
    found = []
    if c.lora_bias:
        found.append("lora_bias")
    init = c.init_lora_weights
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        found.append(f"init_lora_weights={init!r}")
    for key in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if getattr(c, key):
            found.append(key)
    return f"does not support {', '.join(found)}" if found else None


def _bias_needs_flag(f: Facts) -> str | None:
    """0.6-0.10: `bias` other than "none" (validate_legal, 0.7-) and any bias tensor, PEFT's
    lora_B bias included (activate_adapter, "Adapter bias cannot be used for ... without
    --enable-lora-bias"), are refused unless vLLM runs with --enable-lora-bias."""
    found = [n for n, k in f.extra_tensors() if k in ("bias", "lora_B.bias")]
    if f.config.bias in (None, "none") and not found:
        return None
    what = f"bias={f.config.bias!r}" if f.config.bias not in (None, "none") else "lora_B biases"
    return (
        f"refuses {what} unless served with --enable-lora-bias (what it then computes is not "
        f"checked){': ' + some(found) if found else ''}"
    )


def _needs(f: Facts, version: str) -> list[str]:
    r = f.max_rank()
    fits = [x for x in max_lora_ranks(version) if x >= r]
    needs = ["--enable-lora"]
    if fits and fits[0] > DEFAULT_MAX_RANK:
        needs.append(f"--max-lora-rank {fits[0]}")
    vocab, rows = f.vocab_size(), embedding_rows(f)
    if _extra_vocab(version) and vocab is not None and rows > vocab + DEFAULT_EXTRA_VOCAB:
        needs.append(f"--lora-extra-vocab-size {MAX_EXTRA_VOCAB}")
    return needs


_PH = "vllm/lora/peft_helper.py"
_SCALE_0_4 = "vllm/lora/lora.py@v0.4.3-v0.5.5 LoRALayerWeights: lora_alpha / config r"

VLLM = EngineTable(
    "vllm",
    RELEASES,
    (
        Rule("vllm.modules_to_save", "error",
             _modules_to_save(()), f"{_PH}@v0.6.6-v0.30.0 _validate_features", ("0.6", "0.30")),
        Rule("vllm.modules_to_save", "error",
             _modules_to_save(HEADS), f"{_PH}@v0.31.0-v0.34.0 _validate_features",
             ("0.31", "0.34")),
        Rule("vllm.dora", "error", feature("use_dora", "does not support DoRA (use_dora)"),
             f"{_PH}@v0.6.6-v0.34.0 _validate_features", ("0.6", "0.34")),
        Rule("vllm.rslora", "error", feature("use_rslora", "does not yet support RSLoRA"),
             f"{_PH}@v0.6.6 _validate_features", ("0.6", "0.6")),
        Rule("vllm.bias", "error", _bias_needs_flag,
             f"{_PH}@v0.7.3-v0.10.2 validate_legal, vllm/lora/models.py@v0.6.6-v0.10.2 "
             "activate_adapter (bias_enabled)", ("0.6", "0.10")),
        Rule("vllm.bias", "error", feature("bias", "does not support bias={value!r}"),
             f"{_PH}@v0.11.2-v0.34.0 validate_legal", ("0.11", "0.34")),
        Rule("vllm.features", "error", _features,
             f"{_PH}@v0.32.0-v0.34.0 _validate_features", ("0.32", "0.34")),
        Rule("vllm.max_rank", "error", _rank("0.4"), "vllm/config.py@v0.4.3 LoRAConfig possible_max_ranks",
             ("0.4", "0.4")),
        Rule("vllm.max_rank", "error", _rank("0.5"),
             "vllm/config.py@v0.5.5-v0.7.3 LoRAConfig possible_max_ranks",
             ("0.5", "0.7")),
        Rule("vllm.max_rank", "error", _rank("0.8"),
             "vllm/config.py@v0.8.5-v0.10.2 possible_max_ranks, vllm/config/lora.py"
             "@v0.11.2-v0.34.0 MaxLoRARanks",
             ("0.8", "0.34")),
        Rule("vllm.tensors", "error", _tensors(skip_copies=False),
             "vllm/lora/utils.py@v0.4.3-v0.5.5 parse_fine_tuned_lora_name", ("0.4", "0.5")),
        Rule("vllm.tensors", "error",
             _tensors(skip_copies=False, covered=("modules_to_save", "lora_magnitude_vector"),
                      biases=True),
             "vllm/lora/utils.py@v0.6.6-v0.10.2 parse_fine_tuned_lora_name", ("0.6", "0.10")),
        Rule("vllm.tensors", "error",
             _tensors(skip_copies=False,
                      covered=("modules_to_save", "lora_magnitude_vector", "bias")),
             "vllm/lora/utils.py@v0.11.2 parse_fine_tuned_lora_name", ("0.11", "0.11")),
        Rule("vllm.tensors", "error",
             _tensors(skip_copies=True,
                      covered=("modules_to_save", "lora_magnitude_vector", "bias")),
             "vllm/lora/utils.py@v0.12.0-v0.30.0 parse_fine_tuned_lora_name, "
             "is_base_embedding_weights", ("0.12", "0.30")),
        Rule("vllm.tensors", "error",
             _tensors(skip_copies=True,
                      covered=("modules_to_save", "lora_magnitude_vector", "bias"), heads=True),
             "vllm/lora/utils.py@v0.31.0-v0.34.0 parse_fine_tuned_lora_name (score, classifier)",
             ("0.31", "0.34")),
        Rule("vllm.vocab", "error", _vocab("0.11"),
             "vllm/lora/layers/vocal_parallel_embedding.py@v0.10.2-v0.11.2, vllm/lora/layers.py"
             "@v0.4.3-v0.9.2: org_vocab_size + lora_extra_vocab_size rows (--base)",
             ("0.4", "0.11")),
        Rule("vllm.vocab", "error", _vocab("0.12"),
             "vllm/lora/layers/vocal_parallel_embedding.py@v0.12.0-v0.28.0 "
             "(vocab_parallel_embedding.py@v0.29.0-v0.34.0): org_vocab_size rows; "
             "vllm/lora/models.py@v0.12.0 (lora_model.py@v0.13.0-v0.34.0) from_lora_tensors: "
             "exactly model_vocab_size rows (--base)",
             ("0.12", "0.34")),
        Rule("vllm.resized_embeddings", "warning", resized,
             "vllm/lora/utils.py@v0.12.0-v0.34.0 is_base_embedding_weights: skipped (--base)",
             ("0.12", "0.34")),
        Rule("vllm.patterns", "warning", lambda f: patterns_ignored(f, rslora=False),
             _SCALE_0_4, ("0.4", "0.5")),
        Rule("vllm.patterns", "warning", patterns_ignored,
             f"{_PH}@v0.6.6-v0.31.0 one vllm_lora_scaling_factor from r/lora_alpha",
             ("0.6", "0.31")),
    ),
    _needs,
)  # fmt: skip
