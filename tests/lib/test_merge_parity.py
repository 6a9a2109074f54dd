"""`adapterctl.merge` against PEFT 0.21.2 (the oracle), with no mocks: tiny random Llama / GPT-2 /
BERT bases saved by transformers, adapters "trained" and saved by PEFT, and PEFT's own
`PeftModel.from_pretrained(base, ADAPTER).merge_and_unload()` (tests/fixtures.py: merge_oracle).

Each case is one variant on one architecture in one dtype, single-file or sharded; together they
cover every variant on every architecture where it applies, each dtype and both layouts. For each
case: OUTPUT holds exactly the base checkpoint's tensor names; each merged tensor matches PEFT's
(float32: within 1e-6 of the tensor's largest value; half precision: >= 99.9 % bit-identical and
never more than one unit in the last place apart; the fractions are reported at the end of the
run); every tensor PEFT's merge leaves as it was is the base file's bytes; and the model that
transformers loads from OUTPUT gives PEFT's merged model's logits."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import (
    as_tensor,
    merge_inputs,
    merge_oracle,
    read_checkpoint,
    read_file,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

pytestmark = pytest.mark.slow

SHARD = "10KB"  # transformers' units: 10_000 bytes, a few tiny-model tensors per shard
SHARD_BYTES = 10_000
HALF = ("bfloat16", "float16")
QV = ["q_proj", "v_proj"]


def _split_weight_and_bias(model: Any, directory: Path) -> None:
    """A base whose modules' weights sit in one shard and their biases in another."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    shards = {
        "model-00001-of-00002.safetensors": {
            k: v for k, v in state.items() if k.endswith(".weight")
        },
        "model-00002-of-00002.safetensors": {
            k: v for k, v in state.items() if not k.endswith(".weight")
        },
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))


def _bin_base(shards: int) -> Callable[[Any, Path], None]:
    """A `.bin` base, as older transformers saved one: `pytorch_model.bin`, or `shards` files
    with `pytorch_model.bin.index.json`."""

    def write(model: Any, directory: Path) -> None:
        import torch

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        names = list(state)
        if shards == 1:
            torch.save(state, directory / "pytorch_model.bin")
        else:
            weight_map = {}
            step = -(-len(names) // shards)
            for i in range(shards):
                file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
                part = {k: state[k] for k in names[i * step : (i + 1) * step]}
                torch.save(part, directory / file)
                weight_map |= dict.fromkeys(part, file)
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(directory))

    return write


def _without_classifier(model: Any, directory: Path) -> None:
    """A sequence-classification base whose checkpoint has no classifier (as a base model saved
    before fine-tuning has none): the adapter's modules_to_save copy is all there is of it."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    kept = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    save_file(kept, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))


def _bert_model_only(model: Any, directory: Path) -> None:
    """The encoder alone, saved as a `BertModel` (names without the `bert.` prefix, no
    classifier): the base a sequence classifier is fine-tuned from."""
    model.bert.config.architectures = ["BertModel"]
    model.bert.save_pretrained(str(directory))


@dataclass(frozen=True)
class Case:
    model: Callable[[], Any]
    configs: dict[str, dict[str, Any]]
    dtype: str = "float32"
    shard: str | None = None
    out_dtype: str | None = None  # merge's --dtype; PEFT's base is loaded in it
    autocast: bool = True  # False: the adapter's factors are stored in the base's half dtype
    writer: Callable[[Any, Path], None] | None = None  # the base's files, if not save_pretrained's
    added: tuple[str, ...] = ()  # tensors OUTPUT holds that the base checkpoint lacks
    prefix: str = ""  # what the model's state dict puts before the checkpoint's names
    order: list[str] | None = None  # --adapter NAME ... (and PEFT's adapter_names)


llama_bias = functools.partial(tiny_llama, attention_bias=True)
llama_tied = functools.partial(tiny_llama, tie_word_embeddings=True)

LINEAR = {"default": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}}
ALL_LINEAR = {"default": {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.1}}
PATTERNS = {
    "default": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 6, "layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"v_proj": 16},
    }
}
LAYERS = {
    "default": {
        "r": 4,
        "target_modules": QV,
        "layers_to_transform": [1],
        "layers_pattern": "layers",
    }
}
REGEX = {
    "default": {
        "r": 2,
        "lora_alpha": 6,
        "target_modules": r".*\.(q_proj|o_proj|up_proj)",
        "exclude_modules": ["model.layers.1.self_attn.o_proj"],
    }
}
DORA = {
    "default": {
        "r": 4,
        "lora_alpha": 8,
        "use_dora": True,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
    }
}
EMBED = {"default": {"r": 4, "target_modules": ["embed_tokens", "q_proj"], "use_rslora": True}}
EMBED_DORA = {"default": {"r": 4, "target_modules": ["embed_tokens", "lm_head"], "use_dora": True}}
TIED_EMBED = {"default": {"r": 4, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj"]}}
TIED_HEAD_DORA = {"default": {"r": 4, "target_modules": ["lm_head"], "use_dora": True}}
TIED_HEAD = {"default": {"r": 4, "target_modules": ["lm_head", "v_proj"]}}
LORA_BIAS = {
    "default": {
        "r": 4,
        "target_modules": ["q_proj", "k_proj"],
        "bias": "lora_only",
        "lora_bias": True,
    }
}
BIAS_ALL = {"default": {"r": 4, "target_modules": ["q_proj"], "bias": "all"}}
TO_SAVE = {"default": {"r": 4, "target_modules": QV, "modules_to_save": ["lm_head"]}}
SPLIT = {
    "default": {
        "r": 4,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "bias": "all",
        "lora_bias": True,
    }
}
TWO = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": QV},
    "dora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"], "use_dora": True},
}
THREE = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": QV},
    "dora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": True},
    "dora2": {"r": 4, "target_modules": QV, "use_dora": True, "use_rslora": True},
}
BIAS_THEN_DORA = {
    "default": {"r": 4, "target_modules": ["q_proj", "k_proj"], "lora_bias": True},
    "dora": {"r": 2, "target_modules": ["q_proj"], "use_dora": True, "bias": "lora_only"},
}
EMBED_TWO = {
    "default": {"r": 4, "target_modules": ["embed_tokens"]},
    "dora": {"r": 2, "target_modules": ["embed_tokens", "q_proj"], "use_dora": True},
}
CONV1D_TWO = {
    "default": {"r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    "dora": {"r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True, "use_dora": True},
}
CONV1D = {
    "default": {"r": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}
}
CONV1D_DORA = {
    "default": {
        "r": 4,
        "target_modules": ["c_attn", "c_fc"],
        "fan_in_fan_out": True,
        "use_dora": True,
    }
}
GPT2_BIAS_ALL = {
    "default": {
        "r": 4,
        "target_modules": ["c_attn"],
        "fan_in_fan_out": True,
        "bias": "all",
        "modules_to_save": ["ln_f"],
    }
}
GPT2_LORA_BIAS = {
    "default": {
        "r": 4,
        "target_modules": ["c_attn", "c_proj"],
        "fan_in_fan_out": True,
        "bias": "lora_only",
        "lora_bias": True,
    }
}
GPT2_EMBED = {"default": {"r": 4, "target_modules": ["wte", "c_attn"], "fan_in_fan_out": True}}
GPT2_HEAD = {"default": {"r": 4, "target_modules": ["lm_head", "c_proj"], "fan_in_fan_out": True}}
GPT2_EMBED_DORA = {"default": {"r": 4, "target_modules": ["wte"], "use_dora": True}}
GPT2_RSLORA_LAYERS = {
    "default": {
        "r": 4,
        "target_modules": ["c_attn", "c_fc"],
        "fan_in_fan_out": True,
        "use_rslora": True,
        "layers_to_transform": 0,  # an int, as PEFT accepts too
        "layers_pattern": "h",
        "rank_pattern": {"c_fc": 8},
    }
}
SEQ_CLS = {"default": {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}}
BERT_DORA_BIAS = {
    "default": {
        "r": 4,
        "target_modules": ["query", "key", "dense"],
        "use_dora": True,
        "bias": "lora_only",
        "task_type": "SEQ_CLS",
    }
}
BERT_BIAS_ALL = {
    "default": {
        "r": 4,
        "target_modules": ["query", "value", "output.dense"],
        "use_rslora": True,
        "bias": "all",
        "lora_bias": True,
        "task_type": "SEQ_CLS",
    }
}
BERT_EMBED = {
    "default": {
        "r": 4,
        "target_modules": ["word_embeddings", "query"],
        "alpha_pattern": {"query": 32},
        "rank_pattern": {"word_embeddings": 8},
        "task_type": "SEQ_CLS",
    }
}
BERT_LAYERS = {
    "default": {
        "r": 4,
        "target_modules": ["query", "value", "intermediate.dense"],
        "layers_to_transform": [0],
        "layers_pattern": "layer",
        "task_type": "SEQ_CLS",
    }
}

CASES: dict[str, Case] = {
    # Llama: Linear, patterns, layers, DoRA, embeddings, tied, biases, modules_to_save, several
    "llama-linear-fp32-single": Case(tiny_llama, LINEAR),
    "llama-linear-bf16-sharded": Case(tiny_llama, LINEAR, "bfloat16", SHARD),
    "llama-linear-fp16-single": Case(tiny_llama, LINEAR, "float16"),
    "llama-all-linear-fp32-sharded": Case(tiny_llama, ALL_LINEAR, shard=SHARD),
    "llama-rslora-patterns-fp32-single": Case(tiny_llama, PATTERNS),
    "llama-rslora-patterns-bf16-single": Case(tiny_llama, PATTERNS, "bfloat16"),
    "llama-layers-fp32-sharded": Case(tiny_llama, LAYERS, shard=SHARD),
    "llama-layers-fp16-single": Case(tiny_llama, LAYERS, "float16"),
    "llama-regex-exclude-fp16-sharded": Case(tiny_llama, REGEX, "float16", SHARD),
    "llama-dora-fp32-single": Case(tiny_llama, DORA),
    "llama-dora-bf16-sharded": Case(tiny_llama, DORA, "bfloat16", SHARD),
    "llama-dora-fp16-single": Case(tiny_llama, DORA, "float16"),
    "llama-embed-fp32-sharded": Case(tiny_llama, EMBED, shard=SHARD),
    "llama-embed-bf16-single": Case(tiny_llama, EMBED, "bfloat16"),
    "llama-embed-dora-fp32-single": Case(tiny_llama, EMBED_DORA),
    "llama-embed-dora-fp16-sharded": Case(tiny_llama, EMBED_DORA, "float16", SHARD),
    "llama-tied-embed-fp32-single": Case(llama_tied, TIED_EMBED),
    "llama-tied-embed-bf16-sharded": Case(llama_tied, TIED_EMBED, "bfloat16", SHARD),
    "llama-tied-lm-head-fp32-single": Case(llama_tied, TIED_HEAD),
    "llama-tied-lm-head-dora-bf16": Case(llama_tied, TIED_HEAD_DORA, "bfloat16"),
    "llama-lora-bias-fp32-sharded": Case(llama_bias, LORA_BIAS, shard=SHARD),
    "llama-lora-bias-bf16-single": Case(llama_bias, LORA_BIAS, "bfloat16"),
    "llama-bias-all-fp32-single": Case(llama_bias, BIAS_ALL),
    "llama-bias-all-fp16-sharded": Case(llama_bias, BIAS_ALL, "float16", SHARD),
    "llama-modules-to-save-fp32-sharded": Case(tiny_llama, TO_SAVE, shard=SHARD),
    "llama-modules-to-save-bf16-single": Case(tiny_llama, TO_SAVE, "bfloat16"),
    "llama-split-shards-fp32": Case(llama_bias, SPLIT, writer=_split_weight_and_bias),
    "llama-split-shards-bf16": Case(llama_bias, SPLIT, "bfloat16", writer=_split_weight_and_bias),
    "llama-two-adapters-fp32-single": Case(tiny_llama, TWO, order=["default", "dora"]),
    "llama-two-adapters-reversed-fp32": Case(tiny_llama, TWO, order=["dora", "default"]),
    "llama-two-adapters-bf16-sharded": Case(
        tiny_llama, TWO, "bfloat16", SHARD, order=["default", "dora"]
    ),
    "llama-two-adapters-reversed-bf16": Case(
        tiny_llama, TWO, "bfloat16", order=["dora", "default"]
    ),
    "llama-three-adapters-bf16": Case(
        tiny_llama, THREE, "bfloat16", order=["default", "dora", "dora2"]
    ),
    "llama-three-adapters-fp16-sharded": Case(
        tiny_llama, THREE, "float16", SHARD, order=["dora2", "default", "dora"]
    ),
    "llama-lora-bias-then-dora-bf16": Case(
        llama_bias, BIAS_THEN_DORA, "bfloat16", order=["default", "dora"]
    ),
    "llama-lora-bias-then-dora-fp16-sharded": Case(
        llama_bias, BIAS_THEN_DORA, "float16", SHARD, order=["default", "dora"]
    ),
    "llama-embed-two-adapters-fp16": Case(
        tiny_llama, EMBED_TWO, "float16", order=["default", "dora"]
    ),
    "llama-bin-base-fp32-single": Case(tiny_llama, DORA, writer=_bin_base(1)),
    "llama-bin-base-bf16-sharded": Case(llama_bias, LORA_BIAS, "bfloat16", writer=_bin_base(2)),
    "llama-cast-to-bf16": Case(tiny_llama, DORA, out_dtype="bfloat16"),
    "llama-cast-to-fp32": Case(tiny_llama, LINEAR, "float16", out_dtype="float32"),
    "llama-cast-to-fp32-sharded": Case(tiny_llama, DORA, "float16", SHARD, out_dtype="float32"),
    "llama-cast-to-fp16-sharded": Case(tiny_llama, LINEAR, "bfloat16", SHARD, out_dtype="float16"),
    "llama-half-factors-bf16": Case(tiny_llama, DORA, "bfloat16", autocast=False),
    # GPT-2: Conv1D (fan_in_fan_out), DoRA Conv1D, biases, modules_to_save, tied Embedding LoRA
    "gpt2-conv1d-fp32-single": Case(tiny_gpt2, CONV1D),
    "gpt2-conv1d-bf16-sharded": Case(tiny_gpt2, CONV1D, "bfloat16", SHARD),
    "gpt2-conv1d-fp16-single": Case(tiny_gpt2, CONV1D, "float16"),
    "gpt2-dora-fp32-sharded": Case(tiny_gpt2, CONV1D_DORA, shard=SHARD),
    "gpt2-dora-bf16-single": Case(tiny_gpt2, CONV1D_DORA, "bfloat16"),
    "gpt2-dora-fp16-sharded": Case(tiny_gpt2, CONV1D_DORA, "float16", SHARD),
    "gpt2-bias-all-fp32-single": Case(tiny_gpt2, GPT2_BIAS_ALL),
    "gpt2-lora-bias-fp16-single": Case(tiny_gpt2, GPT2_LORA_BIAS, "float16"),
    "gpt2-embed-fp32-sharded": Case(tiny_gpt2, GPT2_EMBED, shard=SHARD),
    "gpt2-embed-dora-bf16-single": Case(tiny_gpt2, GPT2_EMBED_DORA, "bfloat16"),
    "gpt2-rslora-layers-fp32-single": Case(tiny_gpt2, GPT2_RSLORA_LAYERS),
    "gpt2-two-adapters-bf16": Case(tiny_gpt2, CONV1D_TWO, "bfloat16", order=["default", "dora"]),
    "gpt2-tied-lm-head-bf16-sharded": Case(tiny_gpt2, GPT2_HEAD, "bfloat16", SHARD),
    "gpt2-cast-to-fp16": Case(tiny_gpt2, CONV1D_DORA, out_dtype="float16"),
    # BERT for sequence classification: the classifier is a modules_to_save copy
    "bert-seq-cls-fp32-single": Case(tiny_bert, SEQ_CLS),
    "bert-seq-cls-bf16-sharded": Case(tiny_bert, SEQ_CLS, "bfloat16", SHARD),
    "bert-seq-cls-fp16-single": Case(tiny_bert, SEQ_CLS, "float16"),
    "bert-dora-bias-fp32-sharded": Case(tiny_bert, BERT_DORA_BIAS, shard=SHARD),
    "bert-embed-patterns-fp32-single": Case(tiny_bert, BERT_EMBED),
    "bert-lora-bias-all-fp16-sharded": Case(tiny_bert, BERT_BIAS_ALL, "float16", SHARD),
    "bert-layers-bf16-single": Case(tiny_bert, BERT_LAYERS, "bfloat16"),
    "bert-classifier-added-fp32": Case(
        tiny_bert,
        SEQ_CLS,
        writer=_without_classifier,
        added=("classifier.bias", "classifier.weight"),
    ),
    "bert-encoder-only-base-bf16": Case(
        tiny_bert,
        BERT_DORA_BIAS,
        "bfloat16",
        writer=_bert_model_only,
        added=("classifier.bias", "classifier.weight"),
        prefix="bert.",
    ),
}

#: (test, case id) -> why adapterctl's merge does not do what PEFT does there (strict xfails)
KNOWN: dict[tuple[str, str], str] = {}  # none today


def params(test: str, case_ids: Iterable[str] = CASES) -> list[Any]:
    """`case_ids` as parameters of `test`, each known failure a strict xfail."""
    out = []
    for case_id in case_ids:
        reason = KNOWN.get((test, case_id))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case_id, id=case_id, marks=marks))
    return out


def ulps(a: Any, b: Any) -> Any:
    """Units in the last place between two half-precision tensors of one dtype."""
    import torch

    def ordered(x: Any) -> Any:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)

    return (ordered(a) - ordered(b)).abs()


# --- running both sides -----------------------------------------------------------------------


@dataclass
class Merged:
    case: Case
    base: Path
    adapter: Path
    output: Path
    expected: dict[str, Any]
    logits: Any
    result: Any
    caught: list[str]


class Runs:
    """Each case built (PEFT's side) and merged (adapterctl's) once per session, on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Merged] = {}

    def __call__(self, case_id: str) -> Merged:
        if case_id not in self.done:
            self.done[case_id] = self._run(case_id)
        return self.done[case_id]

    def _run(self, case_id: str) -> Merged:
        import adapterctl

        case = CASES[case_id]
        root = self.root / case_id
        base, adapter, expected, logits = merge_oracle(
            case.model,
            root,
            case.configs,
            dtype=case.dtype,
            shard=case.shard,
            merge_dtype=case.out_dtype,
            autocast=case.autocast,
            write_base=case.writer,
            order=case.order,
        )
        output = root / "merged"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = adapterctl.merge(
                base,
                adapter,
                output,
                adapter_names=case.order,
                dtype=case.out_dtype,
                max_shard_size=SHARD if case.shard else None,
            )
        messages = [str(w.message) for w in caught]
        return Merged(case, base, adapter, output, expected, logits, result, messages)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("merge-parity"))


@dataclass
class HalfStats:
    identical: int = 0
    total: int = 0
    max_ulp: int = 0


#: case id -> bit-identical counts of the merged (changed) half-precision tensors
HALF_STATS: dict[str, HalfStats] = {}


class _HalfReport:
    """A plugin printing, in pytest's closing summary, each half-precision case's
    bit-identical fraction and max ulp distance from PEFT's merged tensors."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not HALF_STATS:
            return
        terminalreporter.section("merge parity, half precision (merged tensors vs PEFT's)")
        for case_id, s in sorted(HALF_STATS.items()):
            fraction = s.identical / s.total if s.total else 1.0
            terminalreporter.write_line(
                f"{case_id:40s} {100 * fraction:8.4f} % bit-identical of {s.total:6d},"
                f" max {s.max_ulp} ulp"
            )


@pytest.fixture(scope="session", autouse=True)
def report_half_precision(request: pytest.FixtureRequest) -> None:
    if not request.config.pluginmanager.has_plugin("merge-parity-half-report"):
        request.config.pluginmanager.register(_HalfReport(), "merge-parity-half-report")


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", params("tensors"))
def test_tensors_match_peft(case_id: str, runs: Runs) -> None:
    import torch

    m = runs(case_id)
    base = read_checkpoint(m.base)
    out = read_checkpoint(m.output)
    # exactly the base checkpoint's tensors, under its own names (and any it lacks, added)
    assert sorted(out) == sorted([*base, *m.case.added])
    stats = HalfStats()
    for name, stored in out.items():
        got = as_tensor(stored)
        want = m.expected.get(name if name in m.case.added else m.case.prefix + name)
        if name in m.case.added:
            assert torch.equal(got, want), name
            continue
        original = as_tensor(base[name])
        if want is None:  # a buffer the model does not keep in its state dict: a plain copy
            assert stored.data == base[name].data, name
            continue
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if m.case.out_dtype is None and torch.equal(want, original):
            # PEFT's merge left it as it was: the base file's bytes
            assert stored.data == base[name].data, name
            continue
        if got.dtype in (torch.bfloat16, torch.float16):
            distance = ulps(got, want)
            stats.identical += int((distance == 0).sum())
            stats.total += distance.numel()
            stats.max_ulp = max(stats.max_ulp, int(distance.max()))
        elif got.is_floating_point():
            scale = float(want.abs().max()) or 1.0
            err = float((got.double() - want.double()).abs().max())
            assert err <= 1e-6 * scale, f"{name}: {err:.3g} > 1e-6 * {scale:.3g}"
        else:
            assert torch.equal(got, want), name
    if stats.total:
        HALF_STATS[case_id] = stats
        assert stats.max_ulp <= 1, f"{stats.max_ulp} ulp apart"
        assert stats.identical >= 0.999 * stats.total, f"{stats.identical}/{stats.total}"


@pytest.mark.parametrize("case_id", params("logits"))
def test_loaded_output_gives_peft_logits(case_id: str, runs: Runs) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = runs(case_id)
    seq_cls = type(m.case.model()).__name__.endswith("ForSequenceClassification")
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(str(m.output), output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    want_dtype = m.case.out_dtype or m.case.dtype
    assert model.dtype == getattr(torch, want_dtype)
    with torch.no_grad():
        logits = model.eval().float()(merge_inputs()).logits
    half = want_dtype in HALF
    # half precision (computed in float32): a few weights may be one ulp off PEFT's
    tol = 1e-4 if half else 1e-5
    torch.testing.assert_close(logits, m.logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("case_id", params("shards", [c for c in CASES if CASES[c].shard]))
def test_output_shards_as_transformers_names_them(case_id: str, runs: Runs) -> None:
    m = runs(case_id)
    index = json.loads((m.output / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in m.output.glob("*.safetensors")) == files
    total = 0
    for name in files:
        tensors, metadata = read_file(m.output / name)
        assert metadata == {"format": "pt"}
        assert all(index["weight_map"][t] == name for t in tensors)
        size = sum(len(t.data) for t in tensors.values())
        assert size <= SHARD_BYTES or len(tensors) == 1, (name, size)
        total += size
    assert index["metadata"]["total_size"] == total
    assert sorted(index["weight_map"]) == sorted(read_checkpoint(m.base))


@pytest.mark.parametrize("case_id", params("single", [c for c in CASES if not CASES[c].shard]))
def test_single_file_output(case_id: str, runs: Runs) -> None:
    """Without --max-shard-size (transformers' 50GB) one file, whatever the base's layout."""
    m = runs(case_id)
    names = sorted(p.name for p in m.output.iterdir())
    assert "model.safetensors" in names
    assert "model.safetensors.index.json" not in names
    assert read_file(m.output / "model.safetensors")[1] == {"format": "pt"}


@pytest.mark.parametrize("case_id", ["llama-linear-fp32-single", "llama-cast-to-bf16"])
def test_config_and_side_files_come_along(case_id: str, runs: Runs) -> None:
    m = runs(case_id)
    files = {p.name for p in m.output.iterdir()}
    assert {"config.json", "generation_config.json"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors", "README.md"} & files
    base_config = json.loads((m.base / "config.json").read_text())
    config = json.loads((m.output / "config.json").read_text())
    key = "dtype" if "dtype" in base_config else "torch_dtype"
    assert config[key] == (m.case.out_dtype or base_config[key])
    assert {k: v for k, v in config.items() if k != key} == {
        k: v for k, v in base_config.items() if k != key
    }
    assert (m.output / "generation_config.json").read_bytes() == (
        m.base / "generation_config.json"
    ).read_bytes()


def test_tokenizer_files_come_along_training_state_does_not(runs: Runs, tmp_path: Path) -> None:
    import shutil

    import adapterctl

    m = runs("llama-linear-fp32-single")
    base = tmp_path / "base"
    shutil.copytree(m.base, base)
    wanted = {
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"model_max_length": 64}',
        "special_tokens_map.json": b"{}",
        "tokenizer.model": b"\x00sentencepiece",
        "chat_template.jinja": b"{{ messages }}",
    }
    unwanted = {"optimizer.pt": b"\0" * 64, "trainer_state.json": b"{}", "scheduler.pt": b"\0"}
    for name, data in {**wanted, **unwanted}.items():
        (base / name).write_bytes(data)
    out = tmp_path / "out"
    adapterctl.merge(base, m.adapter, out)
    files = {p.name for p in out.iterdir()}
    for name, data in wanted.items():
        assert (out / name).read_bytes() == data, name
    assert not files & set(unwanted)
    assert read_checkpoint(out) == read_checkpoint(m.output)


TIED = [
    "llama-tied-embed-fp32-single",
    "llama-tied-lm-head-fp32-single",
    "llama-tied-lm-head-dora-bf16",
    "gpt2-embed-fp32-sharded",
    "gpt2-tied-lm-head-bf16-sharded",
]


@pytest.mark.parametrize("case_id", params("warning", TIED))
def test_tied_embeddings_merge_what_peft_holds_and_warn(case_id: str, runs: Runs) -> None:
    """The checkpoint stores one tensor for the tied pair; it holds PEFT's merged value (checked
    above) and the merge says so."""
    m = runs(case_id)
    assert any("tied" in w.lower() for w in m.caught) or any(
        "tied" in str(w).lower() for w in getattr(m.result, "warnings", [])
    ), (m.caught, m.result)


@pytest.mark.parametrize("case_id", params("verify"))
def test_verify_passes_a_correct_merge(case_id: str, runs: Runs, tmp_path: Path) -> None:
    """`verify=True` on every case: each merged tensor within its bound, the same output. (The
    tensors an adapter replaces, trained biases and modules_to_save copies, are not checked.)"""
    import adapterctl

    m = runs(case_id)
    out = tmp_path / "verified"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = adapterctl.merge(
            m.base,
            m.adapter,
            out,
            adapter_names=m.case.order,
            dtype=m.case.out_dtype,
            max_shard_size=SHARD if m.case.shard else None,
            verify=True,
        )
    doc = result.to_dict()["verification"]
    assert doc["passed"], doc
    assert 0 < doc["tensors"] <= result.tensors_merged
    assert read_checkpoint(out) == read_checkpoint(m.output)


def test_merge_order_matters(runs: Runs) -> None:
    """DoRA after LoRA on one layer differs from LoRA after DoRA, in PEFT and in OUTPUT alike."""
    q = "model.layers.0.self_attn.q_proj.weight"
    one, other = runs("llama-two-adapters-fp32-single"), runs("llama-two-adapters-reversed-fp32")
    a = as_tensor(read_checkpoint(one.output)[q])
    b = as_tensor(read_checkpoint(other.output)[q])
    assert float((a - b).abs().max()) > 1e-4


@pytest.mark.parametrize(
    ("case_id", "variants"),
    [
        ("llama-all-linear-fp32-sharded", {"linear": 14}),
        ("gpt2-dora-fp32-sharded", {"dora_conv1d": 4}),
        ("llama-embed-dora-fp32-single", {"dora_embedding": 1, "dora_linear": 1}),
    ],
)
def test_report_counts_what_was_merged(case_id: str, variants: dict[str, int], runs: Runs) -> None:
    """The JSON report: modules merged per variant, tensors merged (those PEFT's merge changed)
    and copied, the shards written and their bytes."""
    import torch

    m = runs(case_id)
    doc = json.loads(json.dumps(m.result.to_dict()))
    base = read_checkpoint(m.base)
    changed = [
        k
        for k, v in base.items()
        if not torch.equal(as_tensor(v), m.expected[k].to(as_tensor(v).dtype))
    ]
    assert {k: doc["modules"].get(k) for k in variants} == variants
    assert doc["tensors_merged"] == len(changed)
    assert doc["tensors_copied"] == len(base) - len(changed)
    assert doc["tensors_added"] == 0
    files = sorted(p.name for p in m.output.glob("*.safetensors"))
    assert sorted(doc["shards"]) == files
    assert doc["bytes"] >= sum(len(t.data) for t in read_checkpoint(m.output).values())
    assert doc["peak_memory"] > 0


def test_trainable_tokens_are_refused_as_load_refuses_them(tmp_path: Path) -> None:
    """`load` has no trainable-token layer; merge refuses such an adapter, naming the variant,
    and writes nothing."""
    import adapterctl
    from adapterctl.errors import UnsupportedVariantError

    config = {"r": 4, "target_modules": QV, "trainable_token_indices": [1, 5]}
    base, adapter, _, _ = merge_oracle(tiny_llama, tmp_path / "case", {"default": config})
    with pytest.raises(UnsupportedVariantError, match="trainable tokens"):
        adapterctl.merge(base, adapter, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]
