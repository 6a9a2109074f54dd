"""`adapterctl.extract`: tiny Llama and GPT-2 "fine-tunes" made as BASE + a known low-rank change
(+ noise), saved by transformers with other shard layouts than BASE; the extracted adapter read
back (the recovered change), loaded by PEFT onto BASE (TUNED's logits at full rank), and the
refusals (grown vocabulary, tensors in one checkpoint only, an existing output untouched)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterctl.errors import AdapterctlError
from adapterctl.ops.extract import ExtractResult, VerificationFailed, extract
from tests.fixtures import _quiet, merge_inputs, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.slow
P = "base_model.model."
LOW_RANK = 3


def _linear(name: str, p: Any) -> bool:
    return p.ndim == 2 and not any(s in name for s in ("embed", "wte", "wpe", "lm_head"))


def _tune(
    model: Any, *, noise: float, seed: int, wte: bool = False, norm: bool = False,
    bias: bool = False,
) -> Any:  # fmt: skip
    """Every linear layer += 0.05·B·A (rank 3) + noise; optionally GPT-2's (tied) wte changed
    in a few rows, one RMSNorm, every bias; returns {param name: the change made} (float64)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    made: dict[str, Any] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _linear(name, p):
                b = torch.randn(p.shape[0], LOW_RANK, generator=g)
                a = torch.randn(LOW_RANK, p.shape[1], generator=g)
                d = 0.05 * b @ a + noise * torch.randn(p.shape, generator=g)
            elif wte and name.endswith("wte.weight"):
                d = torch.zeros(p.shape)
                d[[1, 5, 9]] = 0.1 * torch.randn(3, p.shape[1], generator=g)
            elif norm and name == "model.layers.0.input_layernorm.weight":
                d = 0.1 * torch.randn(p.shape, generator=g)
            elif bias and name.endswith(".bias"):
                d = 0.05 * torch.randn(p.shape, generator=g)
            else:
                continue
            before = p.detach().double().clone()
            p.add_(d)
            made[name] = (p.detach().double() - before).numpy()
    return made


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(merge_inputs()).logits


class Pair:
    def __init__(self, root: Path, fn: Any, **tune: Any) -> None:
        def run() -> None:
            model = fn()
            self.base, self.tuned = root / "base", root / "tuned"
            model.save_pretrained(str(self.base))
            self.changes = _tune(model, **tune)
            model.save_pretrained(str(self.tuned), max_shard_size="20KB")  # shards, unlike BASE
            self.logits = _logits(model)

        _quiet(run)
        self.fn = fn


@pytest.fixture(scope="session")
def llama_exact(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return Pair(tmp_path_factory.mktemp("extract-llama-exact"), tiny_llama, noise=0.0, seed=1)


@pytest.fixture(scope="session")
def llama_noisy(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("extract-llama-noisy")
    return Pair(root, tiny_llama, noise=1e-3, seed=2, norm=True)


@pytest.fixture(scope="session")
def gpt2_noisy(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("extract-gpt2")
    return Pair(root, tiny_gpt2, noise=1e-3, seed=3, wte=True, bias=True)


def _read(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def _peft_logits(fn: Any, adapter: Path) -> Any:
    def run() -> Any:
        from peft import PeftModel

        return _logits(PeftModel.from_pretrained(fn(), str(adapter)).eval())

    return _quiet(run)


def test_the_checkpoints_are_laid_out_differently(llama_noisy: Pair, gpt2_noisy: Pair) -> None:
    for pair in (llama_noisy, gpt2_noisy):
        assert (pair.base / "model.safetensors").is_file()
        assert (pair.tuned / "model.safetensors.index.json").is_file()
        assert not (pair.tuned / "model.safetensors").exists()


def test_a_low_rank_change_is_recovered_at_its_rank(llama_exact: Pair, tmp_path: Path) -> None:
    r = extract(llama_exact.base, llama_exact.tuned, tmp_path / "out", rank=LOW_RANK)
    tensors = _read(tmp_path / "out")
    assert len(r.modules) == len(llama_exact.changes) == 14
    for name, change in llama_exact.changes.items():
        module = name.removesuffix(".weight")
        b, a = tensors[f"{P}{module}.lora_B.weight"], tensors[f"{P}{module}.lora_A.weight"]
        assert a.shape == (LOW_RANK, change.shape[1])
        assert b.dtype == np.float32  # TUNED's dtype
        np.testing.assert_allclose(b.astype(np.float64) @ a, change, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (3, 3, {})
    assert config["base_model_name_or_path"] == str(llama_exact.base)
    assert config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(n[:-7] for n in llama_exact.changes)
    assert r.unchanged == 0
    assert r.changed_not_stored == []
    assert all(m.relative_error < 1e-6 and not m.capped for m in r.modules)
    assert (tmp_path / "out" / "README.md").read_text().startswith("---\n")


def test_a_lower_rank_reports_the_error_it_leaves(llama_noisy: Pair, tmp_path: Path) -> None:
    r = extract(llama_noisy.base, llama_noisy.tuned, tmp_path / "out", rank=2, verify=True)
    tensors = _read(tmp_path / "out")
    for m in r.modules:
        change = llama_noisy.changes[m.module + ".weight"]
        got = tensors[f"{P}{m.module}.lora_B.weight"] @ tensors[f"{P}{m.module}.lora_A.weight"]
        actual = np.linalg.norm(got - change) / np.linalg.norm(change)
        assert m.rank == 2
        assert m.relative_error > 0.01
        assert actual == pytest.approx(m.relative_error, rel=1e-3)
    assert r.verification is not None
    assert r.verification.passed


@pytest.mark.parametrize(
    ("pair", "options"),
    [
        ("llama_noisy", {"modules_to_save": ["input_layernorm"]}),
        ("gpt2_noisy", {"targets": ["c_attn", "c_proj", "c_fc", "wte"], "bias": "all"}),
    ],
)
def test_full_rank_reproduces_tuned_through_peft(
    pair: str, options: dict[str, Any], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    p: Pair = request.getfixturevalue(pair)
    r = extract(p.base, p.tuned, tmp_path / "out", rank=1000, verify=True, **options)
    assert all(m.capped and m.rank <= min(m.shape) for m in r.modules)
    got = _peft_logits(p.fn, tmp_path / "out")
    assert float((got - p.logits).abs().max()) < 1e-4
    base_logits = _quiet(lambda: _logits(p.fn()))
    assert float((base_logits - p.logits).abs().max()) > 1e-2  # the change is visible


def test_gpt2_conv1d_changes_are_transposed(gpt2_noisy: Pair, tmp_path: Path) -> None:
    r = extract(gpt2_noisy.base, gpt2_noisy.tuned, tmp_path / "out", rank=1000)
    tensors = _read(tmp_path / "out")
    m = next(m for m in r.modules if m.module == "transformer.h.0.mlp.c_fc")
    assert m.kind == "conv1d"
    assert m.shape == (32, 128)
    b = tensors[f"{P}transformer.h.0.mlp.c_fc.lora_B.weight"]
    a = tensors[f"{P}transformer.h.0.mlp.c_fc.lora_A.weight"]
    change = gpt2_noisy.changes["transformer.h.0.mlp.c_fc.weight"]
    assert b.shape[0] == 128
    assert a.shape[1] == 32
    np.testing.assert_allclose(b.astype(np.float64) @ a, change.T, atol=1e-6)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert "transformer.h.0.mlp.c_fc.bias" in r.changed_not_stored
    assert "transformer.wte.weight" in r.changed_not_stored  # an embedding: not a default target
    r = extract(gpt2_noisy.base, gpt2_noisy.tuned, tmp_path / "bias", rank=2, bias="all")
    stored = _read(tmp_path / "bias")
    assert f"{P}transformer.h.0.mlp.c_fc.base_layer.bias" in stored  # targeted: PEFT's T12 name
    assert f"{P}transformer.h.0.ln_1.bias" in stored
    assert not [n for n in r.changed_not_stored if n.endswith(".bias")]


def test_tied_embeddings_are_one_change(gpt2_noisy: Pair, tmp_path: Path) -> None:
    """GPT-2 stores wte once (lm_head is tied): targeting it, or lm_head, factors the change once
    and writes it as the embedding's LoRA and the head's."""
    calls: list[int] = []
    import adapterctl.ops.extract.deltas as deltas

    real = deltas.factor

    def counting(delta: Any, target: Any) -> Any:
        calls.append(delta.shape[0])
        return real(delta, target)

    for target in ("wte", "lm_head"):
        calls.clear()
        out = tmp_path / target
        deltas.factor = counting
        try:
            r = extract(gpt2_noisy.base, gpt2_noisy.tuned, out, rank=3, targets=[target])
        finally:
            deltas.factor = real
        assert len(calls) == 1
        [m] = r.modules
        assert (m.module, m.kind, m.tied, m.rank) == (
            "transformer.wte",
            "embedding",
            ("lm_head",),
            3,
        )
        t = _read(out)
        emb_b, emb_a = (
            t[f"{P}transformer.wte.lora_embedding_B"],
            t[f"{P}transformer.wte.lora_embedding_A"],
        )
        head_b, head_a = t[f"{P}lm_head.lora_B.weight"], t[f"{P}lm_head.lora_A.weight"]
        change = gpt2_noisy.changes["transformer.wte.weight"]
        np.testing.assert_allclose((emb_b @ emb_a).T, change, atol=1e-6)
        np.testing.assert_allclose(head_b @ head_a, change, atol=1e-6)
        config = json.loads((out / "adapter_config.json").read_text())
        assert sorted(config["target_modules"]) == ["lm_head", "transformer.wte"]


def test_changed_norms_are_reported_and_stored_when_named(
    llama_noisy: Pair, tmp_path: Path
) -> None:
    norm = "model.layers.0.input_layernorm.weight"
    r = extract(llama_noisy.base, llama_noisy.tuned, tmp_path / "plain", rank=2)
    assert r.changed_not_stored == [norm]
    assert norm not in str(_read(tmp_path / "plain").keys())
    r = extract(
        llama_noisy.base, llama_noisy.tuned, tmp_path / "saved", rank=2,
        modules_to_save=["input_layernorm"],
    )  # fmt: skip
    assert r.changed_not_stored == []
    layers = [f"{P}model.layers.{i}.input_layernorm.weight" for i in (0, 1)]
    assert r.modules_to_save == layers
    t = _read(tmp_path / "saved")
    want = np.asarray(_quiet(lambda: tiny_llama()).model.layers[0].input_layernorm.weight.detach())
    np.testing.assert_array_equal(t[layers[0]], want + llama_noisy.changes[norm].astype(np.float32))
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["input_layernorm"]


def test_energy_picks_each_rank_and_writes_patterns(llama_noisy: Pair, tmp_path: Path) -> None:
    r = extract(llama_noisy.base, llama_noisy.tuned, tmp_path / "out", energy=0.9999, max_rank=20)
    ranks = {m.module: m.rank for m in r.modules}
    assert all(m.energy >= 0.9999 or m.rank == 20 for m in r.modules)
    assert len(set(ranks.values())) > 1
    from adapterctl.format.config import LoraConfig

    config = LoraConfig.from_file(tmp_path / "out" / "adapter_config.json")
    for module, k in ranks.items():
        assert config.rank_for(module) == k
        assert config.scaling(config.alpha_for(module), k) == 1.0


def test_dtype_casts_the_factors(llama_exact: Pair, tmp_path: Path) -> None:
    extract(llama_exact.base, llama_exact.tuned, tmp_path / "out", rank=3, dtype="bfloat16")
    header_len = int.from_bytes(
        (tmp_path / "out" / "adapter_model.safetensors").read_bytes()[:8], "little"
    )
    header = json.loads(
        (tmp_path / "out" / "adapter_model.safetensors").read_bytes()[8 : 8 + header_len]
    )
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_verify_catches_a_planted_error(
    llama_exact: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapterctl.ops.extract.deltas as deltas

    real = deltas.factor

    def off(delta: Any, target: Any) -> Any:  # B 1 % too large, the reported error unchanged
        from dataclasses import replace

        f = real(delta, target)
        return replace(f, b=f.b * 1.01) if delta.shape == (16, 32) else f

    monkeypatch.setattr(deltas, "factor", off)
    with pytest.raises(VerificationFailed, match=r"v_proj|k_proj"):
        extract(llama_exact.base, llama_exact.tuned, tmp_path / "out", rank=3, verify=True)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temp sibling either
    extract(llama_exact.base, llama_exact.tuned, tmp_path / "unverified", rank=3)


@pytest.fixture(scope="session")
def grown(tmp_path_factory: pytest.TempPathFactory, llama_exact: Pair) -> Path:
    def run() -> Path:
        import torch

        model = tiny_llama()
        model.resize_token_embeddings(72)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
        out = tmp_path_factory.mktemp("extract-grown") / "tuned"
        model.save_pretrained(str(out))
        return out

    result: Path = _quiet(run)
    return result


def test_a_grown_vocabulary_is_refused_naming_both_sizes(
    llama_exact: Pair, grown: Path, tmp_path: Path
) -> None:
    with pytest.raises(AdapterctlError, match=r"from 64 \(BASE\) to 72 \(TUNED\)") as e:
        extract(llama_exact.base, grown, tmp_path / "out", rank=2)
    assert "--modules-to-save embed_tokens,lm_head" in (e.value.hint or "")
    r = extract(
        llama_exact.base, grown, tmp_path / "out", rank=2,
        modules_to_save=["embed_tokens", "lm_head"],
    )  # fmt: skip
    t = _read(tmp_path / "out")
    assert t[f"{P}model.embed_tokens.weight"].shape == (72, 32)
    assert t[f"{P}lm_head.weight"].shape == (72, 32)
    assert [m.module for m in r.modules] == ["model.layers.0.self_attn.q_proj"]
    assert r.unchanged == 13


def _lonely(pair: Pair, root: Path) -> Path:
    """TUNED with one tensor more than BASE."""
    import shutil

    from safetensors.numpy import load_file, save_file

    out = root / "lonely"
    shutil.copytree(pair.base, out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.extra.weight"] = np.ones((4, 4), np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_refusals_leave_an_existing_output_untouched(
    llama_exact: Pair, grown: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    extract(llama_exact.base, llama_exact.tuned, out, rank=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    lonely = _lonely(llama_exact, tmp_path)

    def shrink(t: dict[str, np.ndarray]) -> None:
        t["model.norm.weight"] = t["model.norm.weight"][:16].copy()

    other = _rewritten(llama_exact.tuned, tmp_path / "other", shrink)
    cases = [
        (grown, {}, "vocabulary grew"),
        (lonely, {}, "`model.extra.weight` is only in TUNED"),
        (other, {}, r"`model.norm.weight` is \[32\] in BASE and \[16\] in TUNED"),
        (llama_exact.tuned, {"targets": ["nope"]}, "--target 'nope' matches no 2-D weight"),
        (llama_exact.tuned, {"rank": None}, "pass --rank N or --energy E"),
        (
            llama_exact.base,
            {},
            r"no targeted weight differs between BASE and TUNED \(14 compared\)",
        ),
    ]
    for tuned, options, message in cases:
        kwargs: dict[str, Any] = {"rank": 2, **options}
        with pytest.raises(AdapterctlError, match=message):
            extract(llama_exact.base, tuned, out, force=True, **kwargs)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(AdapterctlError, match="already exists"):
        extract(llama_exact.base, llama_exact.tuned, out, rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lonely", "other", "out"]


def test_to_dict_shape(llama_exact: Pair, tmp_path: Path) -> None:
    r: ExtractResult = extract(llama_exact.base, llama_exact.tuned, tmp_path / "out", rank=3)
    d = r.to_dict()
    assert set(d) == {
        "schema_version", "base", "tuned", "output", "dtype", "config", "modules", "unchanged",
        "changed_not_stored", "modules_to_save", "bytes", "seconds", "peak_memory", "warnings",
        "verification",
    }  # fmt: skip
    assert set(d["modules"][0]) == {
        "module", "kind", "shape", "rank", "method", "energy", "relative_error", "capped", "tied",
    }  # fmt: skip
    assert d["bytes"] == (tmp_path / "out" / "adapter_model.safetensors").stat().st_size
    assert d["peak_memory"] > 0
    assert not math.isnan(d["seconds"])
    json.dumps(d, allow_nan=False)


def test_no_torch_for_safetensors_checkpoints(llama_exact: Pair, tmp_path: Path) -> None:
    code = (
        "import sys, adapterctl\n"
        f"adapterctl.extract({str(llama_exact.base)!r}, {str(llama_exact.tuned)!r}, "
        f"{str(tmp_path / 'out')!r}, rank=2, verify=True)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def _rewritten(src: Path, dst: Path, edit: Any) -> Path:
    """`src`'s tensors (any shards) as one model.safetensors in `dst`, `edit`ed; config kept."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    return dst


def test_an_lm_head_equal_to_the_embedding_in_the_files_is_tied(
    llama_exact: Pair, tmp_path: Path
) -> None:
    """tie_word_embeddings false, but lm_head holds the embedding's values in BASE and TUNED
    alike: one change, written to both."""
    rng = np.random.default_rng(0)
    change = np.zeros((64, 32), np.float32)
    change[[3, 7]] = rng.standard_normal((2, 32)).astype(np.float32)

    def tie(t: dict[str, np.ndarray], delta: Any = None) -> None:
        if delta is not None:
            t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] + delta
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    base = _rewritten(llama_exact.base, tmp_path / "base", tie)
    tuned = _rewritten(llama_exact.tuned, tmp_path / "tuned", lambda t: tie(t, change))
    r = extract(base, tuned, tmp_path / "out", rank=2, targets=["embed_tokens"])
    [m] = r.modules
    assert (m.module, m.kind, m.tied, m.method) == (
        "model.embed_tokens",
        "embedding",
        ("lm_head",),
        "exact",
    )
    t = _read(tmp_path / "out")
    np.testing.assert_allclose(
        t[f"{P}lm_head.lora_B.weight"] @ t[f"{P}lm_head.lora_A.weight"], change, atol=1e-6
    )
    assert "lm_head.weight" not in r.changed_not_stored
    assert len(r.changed_not_stored) == 14  # the linear layers, not targeted

    def apart(t: dict[str, np.ndarray]) -> None:
        tie(t, change)
        t["lm_head.weight"] = t["lm_head.weight"] * 2

    untied = _rewritten(llama_exact.tuned, tmp_path / "untied", apart)
    r = extract(base, untied, tmp_path / "out2", rank=2, targets=["embed_tokens"])
    assert [m.tied for m in r.modules] == [()]
    assert "lm_head.weight" in r.changed_not_stored


def test_rank_options_reach_the_factoring(
    llama_exact: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapterctl.ops.extract.deltas as deltas
    from adapterctl.ops.convert import Target

    seen: list[Any] = []
    real = deltas.factor

    def spy(delta: Any, target: Any) -> Any:
        seen.append(target)
        return real(delta, target)

    monkeypatch.setattr(deltas, "factor", spy)
    extract(llama_exact.base, llama_exact.tuned, tmp_path / "a", rank=2, exact=True, seed=7)
    extract(llama_exact.base, llama_exact.tuned, tmp_path / "b", energy=0.5, max_rank=4)
    assert set(seen) == {
        Target(rank=2, exact=True, seed=7),
        Target(energy=0.5, max_rank=4),
    }


def test_portable_pads_every_module_to_one_rank_with_the_same_change(
    llama_noisy: Pair, tmp_path: Path
) -> None:
    """--energy gives each module its own rank (patterns); --portable writes the same B·A at
    the largest rank R with r = lora_alpha = R and no patterns, which every engine scales as
    PEFT does."""
    from adapterctl.ops.engines import judge
    from adapterctl.ops.inspect import inspect_adapter

    kw: dict[str, Any] = {"energy": 0.9999, "max_rank": 20, "verify": True}
    engines = ["vllm@0.11", "tgi", "lorax", "llama.cpp"]
    mixed = extract(llama_noisy.base, llama_noisy.tuned, tmp_path / "mixed", **kw)
    one = extract(llama_noisy.base, llama_noisy.tuned, tmp_path / "one", portable=True, **kw)
    top = max(m.rank for m in mixed.modules)
    assert len({m.rank for m in mixed.modules}) > 1
    assert {m.rank for m in one.modules} == {top}
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (top, top)
    assert not config["rank_pattern"]
    assert not config["alpha_pattern"]
    a, b = _read(tmp_path / "mixed"), _read(tmp_path / "one")
    for key in a:
        if key.endswith("lora_B.weight"):
            a_key = key.replace("lora_B", "lora_A")
            assert b[key].shape[1] == top
            np.testing.assert_array_equal(b[key] @ b[a_key], a[key] @ a[a_key])
    report = {
        path: [v.same_as_peft for v in judge(inspect_adapter(tmp_path / path), engines).verdicts[0]]
        for path in ("mixed", "one")
    }
    # scale 1 everywhere is one scaling for vLLM too, and LoRAX pads the ranks; TGI stacks the
    # modules' factors (one rank) and llama.cpp scales by the global alpha over each tensor's rank
    assert report == {"mixed": [True, False, True, False], "one": [True, True, True, True]}


def _ckpt(root: Path, tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    """A tiny synthetic checkpoint: `tensors` name -> float array, or (dtype code, raw bytes,
    shape) for other dtypes."""
    from adapterctl.format.dtypes import DTYPES
    from adapterctl.format.tensors import TensorSource, write_safetensors

    root.mkdir(parents=True)
    sources = []
    for name, v in tensors.items():
        if isinstance(v, tuple):
            code, raw, shape = v
        else:
            code, raw, shape = "F32", np.asarray(v, np.float32).tobytes(), np.shape(v)
        sources.append(TensorSource(name, DTYPES[code], tuple(shape), lambda raw=raw: raw))
    with open(root / "model.safetensors", "wb") as f:
        write_safetensors(f, sources)
    (root / "config.json").write_text(json.dumps(config))
    return root


_W = np.random.default_rng(1).standard_normal((8, 8))
_CAUSAL = {"architectures": ["XForCausalLM"]}


def _plan(base: Path, tuned: Path, targets: list[str]) -> Any:
    from adapterctl.format.checkpoint import BaseCheckpoint
    from adapterctl.ops.extract.plan import plan

    with BaseCheckpoint(base) as b, BaseCheckpoint(tuned) as t:
        return plan(b, t, targets=targets, modules_to_save=[], bias="none", code=None)


def test_bias_all_of_a_module_whose_weight_did_not_change_is_stored_plain(
    tmp_path: Path,
) -> None:
    """PEFT loads `<module>.base_layer.bias` only for a LoRA module: q's weight is unchanged
    (no LoRA), so its changed bias goes under `q.bias` as PEFT's bias="all" saves it."""
    base = {"m.q.weight": _W, "m.q.bias": np.zeros(8), "m.k.weight": _W, "m.k.bias": np.zeros(8)}
    tuned = {"m.q.weight": _W, "m.q.bias": np.ones(8), "m.k.weight": _W + 1, "m.k.bias": np.ones(8)}
    r = extract(
        _ckpt(tmp_path / "b", base, _CAUSAL),
        _ckpt(tmp_path / "t", tuned, _CAUSAL),
        tmp_path / "out",
        rank=1,
        bias="all",
    )
    assert sorted(r.modules_to_save) == [f"{P}m.k.base_layer.bias", f"{P}m.q.bias"]
    t = _read(tmp_path / "out")
    np.testing.assert_array_equal(t[f"{P}m.q.bias"], np.ones(8))
    assert [m.module for m in r.modules] == ["m.k"]


def test_only_transformers_conv1d_modules_are_conv1d(tmp_path: Path) -> None:
    """GPT-2's task heads (score, classifier, qa_outputs, summary) are nn.Linear."""
    rng = np.random.default_rng(2)
    names = {
        "h.0.attn.c_attn.weight": (8, 24),
        "h.0.mlp.c_fc.weight": (8, 32),
        "score.weight": (2, 8),
        "multiple_choice_head.summary.weight": (1, 8),
    }
    tensors = {k: rng.standard_normal(s) for k, s in names.items()}
    base = _ckpt(tmp_path / "b", tensors, {"model_type": "gpt2"})
    kinds = {j.module: (j.kind, j.out_in) for j in _plan(base, base, []).jobs}
    assert kinds == {
        "h.0.attn.c_attn": ("conv1d", (24, 8)),
        "h.0.mlp.c_fc": ("conv1d", (32, 8)),
        "score": ("linear", (2, 8)),
        "multiple_choice_head.summary": ("linear", (1, 8)),
    }


def test_tied_heads_follow_the_one_tied_embedding_list(tmp_path: Path) -> None:
    """word_embeddings ties as embed_tokens does: targeting lm_head writes it from the
    embedding's change."""
    e = np.random.default_rng(3).standard_normal((10, 8))
    cfg = {"tie_word_embeddings": True}
    base = _ckpt(tmp_path / "b", {"t.word_embeddings.weight": e, "lm_head.weight": e}, cfg)
    tuned = _ckpt(tmp_path / "t", {"t.word_embeddings.weight": e + 1, "lm_head.weight": e + 1}, cfg)
    [job] = _plan(base, tuned, ["lm_head"]).jobs
    assert (job.module, job.kind, job.heads) == ("t.word_embeddings", "embedding", ("lm_head",))


def test_an_explicit_untied_config_wins_over_a_missing_head(tmp_path: Path) -> None:
    e = np.random.default_rng(4).standard_normal((10, 8))
    tensors = {"embed_tokens.weight": e, "layers.0.q.weight": _W}
    untied = _ckpt(tmp_path / "u", tensors, {"tie_word_embeddings": False})
    p = _plan(untied, untied, ["embed_tokens"])
    assert not p.tied
    assert [j.heads for j in p.jobs] == [()]
    silent = _ckpt(tmp_path / "s", tensors, {})
    p = _plan(silent, silent, ["embed_tokens"])
    assert p.tied
    assert [j.heads for j in p.jobs] == [("lm_head",)]


def test_several_tied_embeddings_and_idle_targets_are_refused(tmp_path: Path) -> None:
    from adapterctl.errors import ConversionError, InvalidOptionError

    e = np.random.default_rng(5).standard_normal((10, 8))
    cfg = {"tie_word_embeddings": True}
    two = {"enc.embed_tokens.weight": e, "dec.embed_tokens.weight": e, "x.q.weight": _W}
    base = _ckpt(tmp_path / "b", two, cfg)
    with pytest.raises(ConversionError, match="2 input embeddings") as err:
        _plan(base, base, ["embed_tokens"])
    assert "--target dec.embed_tokens" in (err.value.hint or "")  # a path, in file order
    assert [j.heads for j in _plan(base, base, ["enc.embed_tokens"]).jobs] == [("lm_head",)]
    # a tied lm_head with no input embedding to take its change from
    head = _ckpt(tmp_path / "h", {"lm_head.weight": e, "x.q.weight": _W}, cfg)
    with pytest.raises(InvalidOptionError, match="--target 'lm_head'"):
        _plan(head, head, ["lm_head", "q"])


def test_a_negative_seed_is_refused(tmp_path: Path) -> None:
    from adapterctl.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="--seed"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "out", rank=2, seed=-1)
    assert not (tmp_path / "out").exists()


def test_non_float_tensors_in_differing_dtypes_are_changed(tmp_path: Path) -> None:
    """Compared tensors whose dtypes differ and are not both float (F4, integers) are reported
    as changed rather than crashing; a non-float weight's refusal names its checkpoint."""
    ids = np.arange(4, dtype=np.int32)
    base = {
        "m.q.weight": _W,
        "m.ids": ("I32", ids.tobytes(), (4,)),
        "m.packed": ("F4", bytes(4), (8,)),
    }
    tuned = {
        "m.q.weight": _W + 1,
        "m.ids": ("I64", ids.astype(np.int64).tobytes(), (4,)),
        "m.packed": np.zeros(8),
    }
    r = extract(
        _ckpt(tmp_path / "b", base, {}), _ckpt(tmp_path / "t", tuned, {}), tmp_path / "o", rank=1
    )
    assert sorted(r.changed_not_stored) == ["m.ids", "m.packed"]
    from adapterctl.errors import ConversionError

    quantized = {**base, "m.q.weight": ("I8", bytes(64), (8, 8))}
    with pytest.raises(ConversionError, match=r"`m.q.weight` is \S+ in BASE: not a float"):
        _plan(_ckpt(tmp_path / "qb", quantized, {}), tmp_path / "t", [])


def test_verify_off_by_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row-piece error equals the whole-matrix one, a tied head's transposed too."""
    from adapterctl.ops.extract import verify

    monkeypatch.setattr(verify, "_PIECE", 10)  # pieces of one or two rows
    rng = np.random.default_rng(6)
    b, a, want = (
        rng.standard_normal((7, 2)),
        rng.standard_normal((2, 5)),
        rng.standard_normal((7, 5)),
    )
    whole = np.linalg.norm(0.5 * b @ a - want) ** 2
    assert verify._off_by(0.5, b, a, want, False) == pytest.approx(whole)
    assert verify._off_by(0.5, b, a, want.T, True) == pytest.approx(whole)
