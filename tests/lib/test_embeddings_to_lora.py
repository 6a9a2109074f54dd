"""`convert --embeddings-to-lora`: real PEFT adapters with full embedding / lm_head copies
(modules_to_save) or trainable tokens, on the tiny Llama (untied) and GPT-2 (tied), converted to
LoRA and loaded by PEFT onto the base: the original adapter's logits, the sizes and numbers
reported, a 32k vocabulary, the refusals."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapterctl.errors import AdapterctlError
from adapterctl.ops.convert import convert_adapter
from tests.fixtures import _quiet, merge_inputs, read_file, tiny_gpt2, tiny_llama

ROWS = [3, 7, 9]  # the rows "training" changed (merge_inputs() reads token 7)
TOKENS = [7, 3, 21]
Case = tuple[Path, Path, Any]


def _make(
    model_fn: Callable[[], Any], root: Path, config: dict[str, Any], rows: list[int] = ROWS
) -> Case:
    """BASE and a "trained" ADAPTER saved by PEFT (random lora_B, a few copied rows changed,
    every trainable-token row changed), and the adapter's fp32 logits."""

    def run() -> Case:
        import torch
        from peft import LoraConfig, get_peft_model

        model = model_fn()
        base, adapter = root / "base", root / "adapter"
        model.save_pretrained(str(base))
        pm = get_peft_model(model, LoraConfig(**config))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif "modules_to_save" in name and p.ndim == 2:
                    p[rows] += 0.1 * torch.randn((len(rows), p.shape[1]), generator=g)
                elif "trainable_tokens_delta" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(adapter))
        with torch.no_grad():
            logits = pm.eval()(merge_inputs()).logits
        return base, adapter, logits

    result: Case = _quiet(run)
    return result


def _logits(model_fn: Callable[[], Any], adapter: Path) -> Any:
    def run() -> Any:
        import torch
        from peft import PeftModel

        pm = PeftModel.from_pretrained(model_fn(), str(adapter)).eval()
        with torch.no_grad():
            return pm(merge_inputs()).logits

    return _quiet(run)


LLAMA_SAVE = {"r": 4, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}  # fmt: skip
LLAMA_TOKENS = {"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": TOKENS}
GPT2_TOKENS = {"r": 4, "target_modules": ["c_attn"], "trainable_token_indices": TOKENS}
GPT2_SAVE = {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["wte"]}
#: a regex target_modules gains the module as an alternative; a list with layers_to_transform its
#: full path (an exact name is targeted whatever the layers)
LLAMA_REGEX = {"r": 4, "target_modules": r".*\.q_proj", "modules_to_save": ["lm_head"]}
LLAMA_LAYERS = {"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [1], "trainable_token_indices": {"embed_tokens": TOKENS}}  # fmt: skip
#: rslora: alpha = sqrt(r) for scaling 1; the config's own patterns stay, after the new ones
LLAMA_RSLORA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_rslora": True, "rank_pattern": {"v_proj": 2}, "trainable_token_indices": TOKENS}  # fmt: skip
GPT2_BOTH = {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["wte", "lm_head"]}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CONFIGS = {
    "llama_save": ("llama", LLAMA_SAVE),
    "llama_tokens": ("llama", LLAMA_TOKENS),
    "gpt2_tokens": ("gpt2", GPT2_TOKENS),
    "gpt2_save": ("gpt2", GPT2_SAVE),
    "gpt2_both_save": ("gpt2", GPT2_BOTH),
    "llama_regex_save": ("llama", LLAMA_REGEX),
    "llama_layers_tokens": ("llama", LLAMA_LAYERS),
    "llama_rslora_tokens": ("llama", LLAMA_RSLORA),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {
        name: _make(BUILDERS[model], tmp_path_factory.mktemp(name), config)
        for name, (model, config) in CONFIGS.items()
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_computes_the_original_adapter(
    name: str, cases: dict[str, Case], tmp_path: Path
) -> None:
    import torch

    base, adapter, want = cases[name]
    model_fn = BUILDERS[CONFIGS[name][0]]
    out = tmp_path / "out"
    result = convert_adapter(adapter, out, base=base, embeddings_to_lora=True, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    assert result.method == "embeddings"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] is None
    assert config["modules_to_save"] is None
    tensors, _ = read_file(out / "adapter_model.safetensors")
    assert not any("token_adapter" in k for k in tensors)
    assert all(".lora_" in k for k in tensors)  # no full copy is left
    converted = {
        m.module: m for m in result.modules if m.actions[:1] and m.actions[0].endswith("->lora")
    }
    expected = {
        "llama_save": {"model.embed_tokens", "lm_head"},
        "llama_tokens": {"model.embed_tokens"},  # Llama's lm_head is not tied
        "gpt2_tokens": {"transformer.wte", "lm_head"},  # tied: PEFT replaces lm_head's rows too
        "gpt2_save": {"transformer.wte"},  # a copy: the tied lm_head keeps the base's weight
        "gpt2_both_save": {"transformer.wte", "lm_head"},  # two copies, untied, each its change
        "llama_regex_save": {"lm_head"},
        "llama_layers_tokens": {"model.embed_tokens"},
        "llama_rslora_tokens": {"model.embed_tokens"},
    }[name]
    assert set(converted) == expected
    for module, rep in converted.items():
        rows = len(ROWS) if "save" in name else len(TOKENS)
        doc = rep.to_dict()
        assert doc["rows_changed"] == rows
        assert rep.r == rows  # exact at the changed rows
        assert rep.alpha == (rows**0.5 if "rslora" in name else rows)  # scaling 1
        assert rep.relative_error == 0.0
        targets = config["target_modules"]
        assert module in targets if isinstance(targets, list) else re.fullmatch(targets, module)
        assert doc["bytes_after"] > 0
        kind = "lora_embedding_A" if module != "lm_head" else "lora_A.weight"
        assert f"base_model.model.{module}.{kind}" in tensors
    # every other module is unchanged, bit for bit
    before, _ = read_file(adapter / "adapter_model.safetensors")
    for k in before:
        if "lora_" in k:
            assert tensors[k].data == before[k].data
    logits = _logits(model_fn, out)
    assert torch.allclose(logits, want, atol=1e-5, rtol=0)
    plain = _quiet(lambda: model_fn()(merge_inputs()).logits.detach())
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter does change the logits


def test_lower_rank_reports_its_error(cases: dict[str, Case], tmp_path: Path) -> None:
    import numpy as np

    from tests.helpers import lora_deltas

    base, adapter, _ = cases["llama_save"]
    result = convert_adapter(adapter, tmp_path / "out", base=base, embeddings_to_lora=True, rank=2)
    copies, _ = read_file(adapter / "adapter_model.safetensors")
    weights, _ = read_file(base / "model.safetensors")
    deltas = lora_deltas(tmp_path / "out")
    for module, base_key in (("model.embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):  # fmt: skip
        rep = next(m for m in result.modules if m.module == module)
        assert rep.r == 2
        want = np.frombuffer(copies[f"base_model.model.{base_key}"].data, np.float32).astype(
            np.float64
        ) - np.frombuffer(weights[base_key].data, np.float32).astype(np.float64)
        want = want.reshape(64, 32)
        got = np.asarray(deltas[module], np.float64)
        got = got.reshape(64, 32) if got.shape == (64, 32) else got.T
        err = np.linalg.norm(want - got) / np.linalg.norm(want)
        assert rep.relative_error == pytest.approx(err, rel=1e-3)
        assert rep.relative_error > 1e-3


def test_energy_keeps_the_fraction(cases: dict[str, Case], tmp_path: Path) -> None:
    base, adapter, _ = cases["llama_save"]
    result = convert_adapter(
        adapter, tmp_path / "out", base=base, embeddings_to_lora=True, energy=0.8
    )
    for rep in result.modules:
        if rep.energy is not None:
            assert rep.energy >= 0.8 - 1e-9
            assert rep.r <= len(ROWS)


def test_32k_vocabulary_is_small(tmp_path: Path) -> None:
    """Vocabulary 32000, 10 changed rows of embed_tokens and lm_head: the LoRA (one-hot rows of
    rank 10) is at most 5 % of the adapter holding both copies (the ratio is about r/dim: with
    dim 256 it is 4 %), and PEFT computes the same logits."""
    import torch

    big = {"hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 1}

    def model() -> Any:
        return tiny_llama(vocab_size=32000, **big)

    rows = list(range(100, 30000, 2990))
    assert len(rows) == 10
    base, adapter, want = _make(model, tmp_path, LLAMA_SAVE, rows)
    out = tmp_path / "out"
    result = convert_adapter(adapter, out, base=base, embeddings_to_lora=True, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed  # compared in pieces of rows: two pieces here
    assert result.bytes_out <= 0.05 * result.bytes_in
    for m in result.modules:
        if m.module in ("model.embed_tokens", "lm_head"):
            assert m.to_dict()["rows_changed"] == 10
            assert m.to_dict()["bytes_before"] == 32000 * 256 * 4
            assert m.to_dict()["bytes_after"] == (32000 * 10 + 256 * 10) * 4
    logits = _logits(model, out)
    assert torch.allclose(logits, want, atol=1e-5, rtol=0)


def test_portable_and_dtype(cases: dict[str, Case], tmp_path: Path) -> None:
    import torch

    base, adapter, want = cases["gpt2_tokens"]
    out = tmp_path / "p"
    convert_adapter(adapter, out, base=base, embeddings_to_lora=True, portable=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4
    assert not config["rank_pattern"]
    assert torch.allclose(_logits(tiny_gpt2, out), want, atol=1e-5, rtol=0)
    result = convert_adapter(
        adapter, tmp_path / "h", base=base, embeddings_to_lora=True, dtype="bfloat16"
    )
    tensors, _ = read_file(tmp_path / "h" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {"BF16"}
    wte = next(m for m in result.modules if m.module == "transformer.wte")
    assert wte.to_dict()["bytes_after"] == (3 * 64 + 32 * 3) * 2


def test_grown_vocabulary_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    _, adapter, _ = cases["llama_save"]
    small = tmp_path / "small"
    _quiet(lambda: tiny_llama(vocab_size=60).save_pretrained(str(small)))
    with pytest.raises(AdapterctlError, match=r"grew from 60 rows \(base\) to 64"):
        convert_adapter(adapter, tmp_path / "out", base=small, embeddings_to_lora=True)
    assert not (tmp_path / "out").exists()


def test_refusals(cases: dict[str, Case], tmp_path: Path) -> None:
    _, adapter, _ = cases["llama_save"]
    gpt2_base = cases["gpt2_save"][0]
    with pytest.raises(AdapterctlError, match="--embeddings-to-lora needs --base"):
        convert_adapter(adapter, tmp_path / "a", embeddings_to_lora=True)
    with pytest.raises(AdapterctlError, match="not both"):
        convert_adapter(
            adapter, tmp_path / "b", base=gpt2_base, embeddings_to_lora=True, dora_to_lora=True
        )
    with pytest.raises(AdapterctlError, match=r"has no weight for `model\.embed_tokens`"):
        convert_adapter(adapter, tmp_path / "c", base=gpt2_base, embeddings_to_lora=True)
    plain = _make(tiny_llama, tmp_path / "plain", {"r": 4, "target_modules": ["q_proj"]})
    with pytest.raises(AdapterctlError, match="nothing for --embeddings-to-lora"):
        convert_adapter(plain[1], tmp_path / "d", base=plain[0], embeddings_to_lora=True)
    # tied GPT-2 with a LoRA on lm_head: the tied tokens' change cannot join those factors
    config = {"r": 4, "target_modules": ["c_attn", "lm_head"], "trainable_token_indices": TOKENS}
    both = _make(tiny_gpt2, tmp_path / "both", config)
    with pytest.raises(AdapterctlError, match="`lm_head` already has LoRA factors"):
        convert_adapter(both[1], tmp_path / "f", base=both[0], embeddings_to_lora=True)
    # without the option, trainable tokens stay what convert refuses to compute
    with pytest.raises(AdapterctlError, match="trainable tokens"):
        convert_adapter(cases["llama_tokens"][1], tmp_path / "e", dtype="bfloat16")
    assert not any((tmp_path / x).exists() for x in "abcdef")


def test_verify_checks_against_copy_minus_base(
    cases: dict[str, Case], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted error in the written factors: --verify compares them with copy - base computed
    again from the source and the base, and fails."""
    from adapterctl.ops.convert import VerificationFailed
    from adapterctl.ops.convert.embeddings import EmbeddingDeltas

    base, adapter, _ = cases["llama_save"]
    good = EmbeddingDeltas.make

    def planted(self: EmbeddingDeltas, module: str) -> Any:
        import numpy as np

        from adapterctl.format.rawtensor import from_float, to_float64

        made = good(self, module)
        key = next(k for k in made if k.endswith("lora_embedding_B"))  if module.endswith("embed_tokens") else None  # fmt: skip
        if key is not None:
            t = to_float64(made[key]).reshape(made[key].shape)
            t[0, 0] += 0.01 * float(np.abs(t).max())
            made[key] = from_float(t, made[key].dtype.code)
        return made

    monkeypatch.setattr(EmbeddingDeltas, "make", planted)
    with pytest.raises(VerificationFailed, match=r"embed_tokens \(LoRA of the modules_to_save"):
        convert_adapter(
            adapter, tmp_path / "out", base=base, embeddings_to_lora=True, verify_output=True
        )
    assert not (tmp_path / "out").exists()


def test_cli(cases: dict[str, Case], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adapterctl.cli.main import app

    base, adapter, _ = cases["gpt2_tokens"]
    args = [str(adapter), str(tmp_path / "out"), "--base", str(base), "--embeddings-to-lora"]
    result = CliRunner().invoke(app, ["convert", *args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["converted_from"] == "embeddings"
    wte = next(m for m in doc["modules"] if m["module"] == "transformer.wte")
    assert wte["rows_changed"] == 3
    assert wte["converted_from"] == "trainable tokens"
    assert wte["bytes_before"] == 3 * 32 * 4
    lm = next(m for m in doc["modules"] if m["module"] == "lm_head")
    assert lm["converted_from"] == "tied"
    human = CliRunner().invoke(app, ["convert", *args[:1], str(tmp_path / "h"), *args[2:]])
    assert human.exit_code == 0, human.output
    assert "trainable tokens->lora, 3 rows changed, rank 3" in human.stdout
    refused = CliRunner().invoke(
        app, ["convert", str(adapter), str(tmp_path / "x"), "--embeddings-to-lora"]
    )
    assert refused.exit_code == 2
    assert "--embeddings-to-lora needs --base" in refused.output


def test_not_finite_copy_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    base, adapter, _ = cases["llama_save"]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.lm_head.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][40, 2] = np.nan  # a row training did not change
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterctlError, match=r"lm_head\.weight` holds NaN or infinite"):
        convert_adapter(bad, tmp_path / "out", base=base, embeddings_to_lora=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("indices", "problem"),
    [
        (["a", 3, 21], "not a list of integers"),
        ([7, 3, 1.7], "not a list of integers"),
        ([7, True, 21], "not a list of integers"),
        ({"embed_tokens": 5}, r"trainable_token_indices\['embed_tokens'\] is 5"),
        ({"embed_tokens": [[1], 3, 21]}, "not a list of integers"),
        ({"embed_tokens": [7, 3, 21], "lm_head": ["x"]}, r"\['lm_head'\]"),
        ("7", "is str, not a list or a dict"),
        ([7, 3, 64], "token index 64 is outside the base's 64 rows"),
        ([7, -1, 21], "token index -1 is outside the base's 64 rows"),
    ],
)
def test_untrusted_token_indices_refused(
    indices: Any, problem: str, cases: dict[str, Case], tmp_path: Path
) -> None:
    """The config's trainable_token_indices: anything but lists of in-range integers is a clear
    refusal (no ValueError / TypeError, no silent truncation of 1.7)."""
    import shutil

    base, adapter, _ = cases["llama_tokens"]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["trainable_token_indices"] = indices
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterctlError, match=problem):
        convert_adapter(bad, tmp_path / "out", base=base, embeddings_to_lora=True)
    assert not (tmp_path / "out").exists()


def test_copy_and_token_delta_of_one_module_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    """embed_tokens both copied whole (modules_to_save) and with a trainable-token delta: two
    conversions would write the same keys; refused by name."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    base, adapter, _ = cases["llama_save"]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    tensors[key] = np.ones((len(TOKENS), 32), dtype=np.float32)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    config = json.loads((bad / "adapter_config.json").read_text())
    config["trainable_token_indices"] = TOKENS
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterctlError, match=r"both a modules_to_save copy and trainable-token deltas for `model\.embed_tokens`"):  # fmt: skip
        convert_adapter(bad, tmp_path / "out", base=base, embeddings_to_lora=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("exclude", "problem"),
    [
        ("(", '`exclude_modules` "\\(" is not a valid regular expression'),
        ("(.*.*){1,32000}[bc]", "`exclude_modules` .* takes too long to match"),
        (r".*embed_tokens", r"exclude_modules excludes `model\.embed_tokens`"),
        (["embed_tokens"], r"exclude_modules excludes `model\.embed_tokens`"),
    ],
)
def test_exclude_modules_matched_within_the_budget(
    exclude: Any, problem: str, cases: dict[str, Case], tmp_path: Path
) -> None:
    """The config's exclude_modules regex goes through the bounded matcher: a malformed or
    catastrophic one is a ConfigError (not re.error, not a hang); one excluding a converted
    module is refused."""
    import shutil
    import time

    base, adapter, _ = cases["llama_save"]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["exclude_modules"] = exclude
    (bad / "adapter_config.json").write_text(json.dumps(config))
    start = time.monotonic()
    with pytest.raises(AdapterctlError, match=problem):
        convert_adapter(bad, tmp_path / "out", base=base, embeddings_to_lora=True)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()
