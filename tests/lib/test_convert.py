"""`convert_adapter` against PEFT: every residual init to plain LoRA, `--base`, dtype, rank."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterctl.errors import AdapterctlError, ConversionError
from adapterctl.format.config import LoraConfig
from adapterctl.ops.convert import convert_adapter
from tests.fixtures import residual_pair, tiny_gpt2, tiny_llama
from tests.helpers import lora_deltas, read_raw

pytestmark = pytest.mark.slow

ST = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits


def _peft_load(model_fn: Any, adapter: Path) -> Any:
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model_fn(), str(adapter)).eval()


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "pissa_patterns_lm_head": ("pissa", None, {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"],
        "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"down_proj": 12},
    }),
    "pissa_niter": ("pissa_niter_4", None, {"r": 4, "target_modules": LLAMA_ALL}),
    "olora": ("olora", None, {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj"]}),
    "corda_ipm": ("corda", "ipm", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "corda_kpm": ("corda", "kpm", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "pissa_rslora": ("pissa", None, {"r": 4, "use_rslora": True, "target_modules": LLAMA_ALL}),
    "pissa_rslora_patterns": ("pissa", None, {
        "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"q_proj": 12},
    }),
    "pissa_dora_embed_mts": ("pissa", None, {
        "r": 4, "target_modules": ["q_proj", "embed_tokens"], "use_dora": True,
        "modules_to_save": ["lm_head"],
    }),
}  # fmt: skip


@pytest.mark.parametrize("case", list(METHODS))
def test_to_plain_lora_like_peft(case: str, tmp_path: Path) -> None:
    init, corda, cfg = METHODS[case]
    trained_model, init_dir, trained, peft_dir = residual_pair(tmp_path, init, corda=corda, **cfg)
    result = convert_adapter(trained, tmp_path / "ours", initial=init_dir, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    assert result.verification.worst is not None
    assert result.verification.worst.error <= 1e-6
    ours = read_raw(tmp_path / "ours")
    config = LoraConfig.from_file(tmp_path / "ours" / CONFIG)
    if peft_dir is not None:
        theirs = read_raw(peft_dir)
        for key, t in theirs.items():  # every factor PEFT writes, bit for bit
            assert ours[key].shape == t.shape, key
            assert ours[key].data.tobytes() == t.data.tobytes(), key
        peft_config = LoraConfig.from_file(peft_dir / CONFIG)
        for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
            assert getattr(config, field) == getattr(peft_config, field), field
    else:  # PEFT refuses rslora with patterns: α ×√2 everywhere keeps α/√r
        assert config.lora_alpha == pytest.approx(8 * math.sqrt(2))
        assert config.alpha_pattern == {"q_proj": pytest.approx(12 * math.sqrt(2))}
        assert config.rank_pattern == {"v_proj": 12}
    assert config.init_lora_weights is True
    # PEFT loads our output on the ORIGINAL base and computes what the trained model computed
    loaded = _peft_load(tiny_llama, tmp_path / "ours")
    assert (_logits(loaded) - _logits(trained_model)).abs().max().item() <= 1e-4


def _spread(model: Any) -> Any:
    """Give every 2-D weight geometric singular values (ratio 1/0.7): a PiSSA base whose top-r
    subspaces are well defined, as in trained models (random init has none)."""
    import torch

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                u, _, vh = torch.linalg.svd(torch.randn(p.shape, generator=g), full_matrices=False)
                values = 0.7 ** torch.arange(min(p.shape), dtype=torch.float32)
                p.copy_(u @ torch.diag(values) @ vh)
    return model


def spread_llama() -> Any:
    return _spread(tiny_llama())


def spread_gpt2() -> Any:
    return _spread(tiny_gpt2())


def _gap_ok(base_weight: Any, r: int) -> bool:
    s = np.linalg.svd(base_weight, compute_uv=False)
    return bool(s[r - 1] / s[r] >= 1.1)


@pytest.mark.parametrize(
    ("init", "model_fn", "targets"),
    [
        ("pissa", spread_llama, LLAMA_ALL),
        ("olora", tiny_llama, [*LLAMA_ALL, "lm_head"]),
        ("pissa", spread_gpt2, ["c_attn", "c_proj", "c_fc"]),  # Conv1D, square c_proj too
    ],
    ids=["pissa", "olora", "pissa_gpt2_conv1d"],
)
def test_base_rebuilds_the_initial_adapter(
    init: str, model_fn: Any, targets: list[str], tmp_path: Path
) -> None:
    trained_model, init_dir, trained, _ = residual_pair(
        tmp_path, init, model_fn=model_fn, r=4, lora_alpha=8, target_modules=targets
    )
    base = tmp_path / "base"
    model_fn().save_pretrained(str(base))
    convert_adapter(trained, tmp_path / "from_init", initial=init_dir)
    result = convert_adapter(trained, tmp_path / "from_base", base=base, verify_output=True)
    assert result.method == init
    assert result.verification is not None
    assert result.verification.passed
    weights = {k: v.detach().double().numpy() for k, v in model_fn().state_dict().items()}
    a, b = lora_deltas(tmp_path / "from_init"), lora_deltas(tmp_path / "from_base")
    assert set(a) == set(b)
    compared = 0
    for module in a:
        w = weights[f"{module}.weight"]
        w = w.T if model_fn is spread_gpt2 else w  # Conv1D stores (in, out)
        if init == "pissa" and not _gap_ok(w, 4):
            continue  # the top-4 subspace is ill-defined: any choice is as good
        compared += 1
        assert np.linalg.norm(a[module] - b[module]) <= 1e-4 * np.linalg.norm(a[module]), module
    assert compared >= len(a) // 2
    if compared == len(a):
        loaded = _peft_load(model_fn, tmp_path / "from_base")
        assert (_logits(loaded) - _logits(trained_model)).abs().max().item() <= 1e-4


def test_dtype_cast_is_bit_equal_to_torch(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    import torch

    src = peft_adapters["llama_bias"]
    for name, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        result = convert_adapter(src, tmp_path / name, dtype=name, verify_output=True)
        assert result.verification is not None
        assert result.verification.passed
        from safetensors.torch import load_file

        before, after = load_file(src / ST), load_file(tmp_path / name / ST)
        assert set(before) == set(after)
        for key, t in before.items():
            expected = t.to(torch_dtype)
            assert after[key].dtype == torch_dtype
            assert torch.equal(after[key].view(torch.int16), expected.view(torch.int16)), key
        assert LoraConfig.from_file(tmp_path / name / CONFIG) == LoraConfig.from_file(src / CONFIG)
    # and back up: bf16 -> float32 is exact
    convert_adapter(tmp_path / "bfloat16", tmp_path / "up", dtype="float32")
    bf, up = load_file(tmp_path / "bfloat16" / ST), load_file(tmp_path / "up" / ST)
    assert all(torch.equal(bf[k].float(), up[k]) for k in bf)


def test_bin_becomes_safetensors(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    src = peft_adapters["llama_bin"]
    result = convert_adapter(src, tmp_path / "out", verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    before = torch.load(src / "adapter_model.bin", weights_only=True)
    after = load_file(tmp_path / "out" / ST)
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "case", ["llama_basic", "llama_embed", "llama_bias", "gpt2_bias_all", "bert_seq_cls"]
)
def test_full_rank_reduction_keeps_the_model(
    case: str, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """At the adapter's own rank nothing is dropped: only the scaling moves into the factors."""
    from tests.fixtures import CASES

    model_fn = CASES[case][0]
    src = peft_adapters[case]
    result = convert_adapter(src, tmp_path / "out", rank=4, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    config = LoraConfig.from_file(tmp_path / "out" / CONFIG)
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 4, False)
    before, after = _peft_load(model_fn, src), _peft_load(model_fn, tmp_path / "out")
    assert (_logits(before) - _logits(after)).abs().max().item() <= 1e-5


def test_rank_reduction_reports_the_true_error(
    peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    src = peft_adapters["llama_dora_patterns"].parent / "llama_all_linear"
    before = lora_deltas(src)
    result = convert_adapter(src, tmp_path / "r2", rank=2, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    after = lora_deltas(tmp_path / "r2")
    for m in result.modules:
        full = before[m.module]
        truth = np.linalg.norm(full - after[m.module]) / np.linalg.norm(full)
        assert m.relative_error == pytest.approx(truth, rel=1e-4, abs=1e-7), m.module
        best = np.linalg.svd(full, compute_uv=False)  # Eckart-Young: nothing does better
        assert truth <= math.sqrt((best[2:] ** 2).sum()) / np.linalg.norm(full) * (1 + 1e-6)
        assert m.r == 2
        assert m.energy is not None
        assert 0 < m.energy <= 1
    energy = convert_adapter(src, tmp_path / "e", energy=0.9)
    for m in energy.modules:
        assert m.energy is not None
        assert m.energy >= 0.9 * (1 - 1e-9)
        spectrum = np.linalg.svd(before[m.module], compute_uv=False) ** 2
        kept_less = spectrum[: m.r - 1].sum() / spectrum.sum()
        assert m.r == 1 or kept_less < 0.9  # the smallest such rank
    config = LoraConfig.from_file(tmp_path / "e" / CONFIG)
    for m in energy.modules:
        assert config.rank_for(m.module) == m.r
        assert config.scaling(config.alpha_for(m.module), m.r) == 1.0
    assert len({m.r for m in energy.modules}) > 1  # so the exact-name patterns are exercised
    peft = _peft_load(tiny_llama, tmp_path / "e")  # PEFT reads the same ranks and scalings
    layers = dict(peft.base_model.model.named_modules())
    for m in energy.modules:
        layer = layers[m.module]
        assert layer.r["default"] == m.r
        assert layer.scaling["default"] == 1.0


def test_pissa_to_lora_and_rank_in_one_pass(tmp_path: Path) -> None:
    trained_model, init_dir, trained, _ = residual_pair(
        tmp_path, "pissa", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    # rank 8 = 2r: the converted adapter exactly, refactored
    convert_adapter(trained, tmp_path / "r8", initial=init_dir, rank=8, verify_output=True)
    loaded = _peft_load(tiny_llama, tmp_path / "r8")
    assert (_logits(loaded) - _logits(trained_model)).abs().max().item() <= 1e-4
    # bf16 and rank 4 at once: verification still holds with the combined bound
    result = convert_adapter(
        trained, tmp_path / "r4", initial=init_dir, rank=4, dtype="bfloat16", verify_output=True
    )
    assert result.verification is not None
    assert result.verification.passed


REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "dora_rank": ({"rank": 2}, "DoRA module"),
    "both_sources": ({"initial": "X", "base": "X"}, "not both"),
    "rank_and_energy": ({"rank": 2, "energy": 0.9}, "not both"),
    "rank_zero": ({"rank": 0}, "at least 1"),
    "energy_range": ({"energy": 1.5}, r"in \(0, 1\]"),
    "dtype": ({"dtype": "int8"}, "unknown dtype"),
    "init_alone": ({"init": "pissa"}, "does nothing without --base"),
    "nothing": ({}, "nothing to convert"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case: str, peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    kwargs, message = REFUSALS[case]
    kwargs = {k: (tmp_path if v == "X" else v) for k, v in kwargs.items()}
    with pytest.raises(AdapterctlError, match=message):
        convert_adapter(peft_adapters["llama_dora_patterns"], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_pair_refusals(tmp_path: Path) -> None:
    _, init_dir, trained, _ = residual_pair(
        tmp_path / "a", "pissa", r=4, target_modules=["q_proj", "v_proj"]
    )
    _, other_init, _, _ = residual_pair(tmp_path / "b", "pissa", r=2, target_modules=["q_proj"])
    _, niter_init, niter, _ = residual_pair(tmp_path / "c", "pissa_niter_2", r=4, target_modules=["q_proj"])  # fmt: skip
    base = tmp_path / "base"
    tiny_llama().save_pretrained(str(base))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="differ in `r`"):
        convert_adapter(trained, out, initial=other_init)
    with pytest.raises(ConversionError, match="randomized SVD"):
        convert_adapter(niter, out, base=base)
    with pytest.raises(ConversionError, match="contradicts"):
        convert_adapter(trained, out, base=base, init="olora")
    with pytest.raises(ConversionError, match="residual base"):
        convert_adapter(trained, out, rank=2)
    with pytest.raises(AdapterctlError, match="holds the input"):
        convert_adapter(trained, trained.parent, initial=init_dir, force=True)
    # the trained config says true (PEFT's docs save the initial adapter that way): --init decides
    with pytest.raises(ConversionError, match="does not say how"):
        convert_adapter(init_dir, out, base=base)
    convert_adapter(niter, out, initial=niter_init)  # pissa_niter converts from its initial
    assert (out / ST).is_file()


def test_base_from_shards_and_a_tied_lm_head(tmp_path: Path) -> None:
    """A sharded base (an index and several files) whose lm_head is tied to the embedding, so the
    checkpoint stores it once: --base finds every weight and gives --initial's deltas."""

    def tied() -> Any:
        return tiny_llama(tie_word_embeddings=True)

    _, init_dir, trained, _ = residual_pair(
        tmp_path, "olora", model_fn=tied, r=4, target_modules=["q_proj", "down_proj", "lm_head"]
    )
    base = tmp_path / "base"
    tied().save_pretrained(str(base), max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").is_file()
    assert len(list(base.glob("model-*.safetensors"))) > 2
    convert_adapter(trained, tmp_path / "from_init", initial=init_dir)
    convert_adapter(trained, tmp_path / "from_base", base=base, init="olora")
    a, b = lora_deltas(tmp_path / "from_init"), lora_deltas(tmp_path / "from_base")
    assert "lm_head" in a
    for module in a:
        assert np.linalg.norm(a[module] - b[module]) <= 1e-5 * np.linalg.norm(a[module]), module


def test_the_output_names_the_initial_base(tmp_path: Path) -> None:
    from tests.helpers import Q, lora_tensors, write_adapter

    trained = write_adapter(tmp_path / "t", lora_tensors(Q), {"init_lora_weights": "pissa", "base_model_name_or_path": "me/residual"})  # fmt: skip
    init = write_adapter(tmp_path / "i", lora_tensors(Q), {"base_model_name_or_path": "org/original"})  # fmt: skip
    result = convert_adapter(trained, tmp_path / "out", initial=init)
    assert LoraConfig.from_file(tmp_path / "out" / CONFIG).base_model_name_or_path == "org/original"
    assert any("me/residual" in w and "org/original" in w for w in result.warnings)


def test_large_tensor_paths_give_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joins and sign flips of large tensors go through numpy; forcing that path on a small
    adapter must give the same files as the byte path, through every later step."""
    from adapterctl.format import rawtensor

    _, init_dir, trained, _ = residual_pair(
        tmp_path, "pissa", r=4, target_modules=["q_proj", "v_proj", "lm_head"]
    )
    runs = {"initial": {}, "rank": {"rank": 6}, "dtype": {"dtype": "bfloat16"}}
    for name, extra in runs.items():
        convert_adapter(trained, tmp_path / f"small-{name}", initial=init_dir, **extra)
    monkeypatch.setattr(rawtensor, "_LARGE", 0)
    for name, extra in runs.items():
        result = convert_adapter(
            trained, tmp_path / f"large-{name}", initial=init_dir, verify_output=True, **extra
        )
        assert result.verification is not None
        assert result.verification.passed
        a = (tmp_path / f"small-{name}" / ST).read_bytes()
        assert a == (tmp_path / f"large-{name}" / ST).read_bytes(), name


def test_exact_name_patterns_do_not_capture_longer_paths(tmp_path: Path) -> None:
    """PEFT matches `(.*\\.)?(key)$`: an unanchored `layers\\.0\\.fc` would also claim
    `enc.layers.0.fc`; the anchored key gives each module its own rank."""
    import numpy as np

    from tests.helpers import P, write_adapter

    rng = np.random.default_rng(0)
    shapes = {"enc.layers.0.fc": (64, 32), "model.a": (64, 32), "layers.0.fc": (40, 3)}
    tensors = {}
    for module, (out_dim, in_dim) in shapes.items():
        tensors[f"{P}{module}.lora_A.weight"] = rng.standard_normal((8, in_dim)).astype(np.float32)
        tensors[f"{P}{module}.lora_B.weight"] = rng.standard_normal((out_dim, 8)).astype(np.float32)
    src = write_adapter(tmp_path / "src", tensors, {"r": 8, "target_modules": ["fc", "a"]})
    result = convert_adapter(src, tmp_path / "out", rank=6, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
    config = LoraConfig.from_file(tmp_path / "out" / CONFIG)
    out = read_raw(tmp_path / "out")
    for module in shapes:
        rows = out[f"{P}{module}.lora_A.weight"].shape[0]
        assert config.rank_for(module) == rows == (3 if module == "layers.0.fc" else 6), module


def test_bf16_residual_weight_rounded_once(tmp_path: Path) -> None:
    """A bf16 PiSSA adapter with a targeted lm_head (its saved weight is the residual), converted
    with --dtype float32 --verify: W_res + s0·B0·A0 is rounded once, to float32."""
    import torch

    def bf16() -> Any:
        return tiny_llama().to(torch.bfloat16)

    _, init_dir, trained, _ = residual_pair(
        tmp_path, "pissa", model_fn=bf16, r=4, target_modules=["q_proj", "lm_head"]
    )
    assert any(k.endswith("lm_head.base_layer.weight") for k in read_raw(trained))
    for dtype in ("float32", "bfloat16", "float16"):
        result = convert_adapter(
            trained, tmp_path / dtype, initial=init_dir, dtype=dtype, verify_output=True
        )
        assert result.verification is not None
        assert result.verification.passed, (dtype, result.verification.worst)


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("planted")
    _, init_dir, trained, _ = residual_pair(
        d, "pissa", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    )  # fmt: skip
    return init_dir, trained


Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
HEAD = "base_model.model.lm_head.weight"  # modules_to_save, as stored
PLANTS: dict[str, tuple[str, Any, str]] = {  # tensor, change to its float32 values, worst check
    "one B0 value off by 0.1%": (Q_B, lambda x: x.__setitem__((0, -1), x[0, -1] * 1.001), "q_proj"),
    "B0 without its minus sign": (Q_B, lambda x: x.__setitem__(np.s_[:, 4:], -x[:, 4:]), "q_proj"),
    "one trained A row lost": (Q_B.replace("_B", "_A"), lambda x: x.__setitem__(0, 0.0), "q_proj"),
    "a modules_to_save value off by 0.1%": (
        HEAD, lambda x: x.__setitem__((3, 3), x[3, 3] * 1.001 + 1e-3), HEAD
    ),
}  # fmt: skip


@pytest.mark.parametrize("plant", list(PLANTS))
def test_verify_catches_a_finite_error(
    plant: str, planted_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion bug that writes wrong but finite numbers (planted in the written file before
    --verify reads it) fails verification: exit path, nothing renamed into place."""
    import adapterctl.ops.convert.adapter as mod
    from adapterctl.format.header import read_header
    from adapterctl.ops.convert import VerificationFailed

    key, change, worst = PLANTS[plant]
    init_dir, trained = planted_pair
    real_write = mod._write

    def write_then_plant(plan: Any, directory: Path, total: int, progress: Any) -> int:
        n = real_write(plan, directory, total, progress)
        header = read_header(directory / ST)
        t = header.tensors[key]
        assert t.dtype.code == "F32"
        with open(directory / ST, "r+b") as f:
            f.seek(header.data_start + t.start)
            values = np.frombuffer(f.read(t.nbytes), dtype=np.float32).reshape(t.shape).copy()
            change(values)
            f.seek(header.data_start + t.start)
            f.write(values.tobytes())
        return n

    monkeypatch.setattr(mod, "_write", write_then_plant)
    with pytest.raises(VerificationFailed) as info:
        convert_adapter(trained, tmp_path / "out", initial=init_dir, verify_output=True)
    verification = info.value.result.verification
    assert verification is not None
    assert not verification.passed
    assert verification.worst is not None
    assert verification.worst.name.endswith(worst)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    monkeypatch.undo()  # and the same conversion without the plant passes
    result = convert_adapter(trained, tmp_path / "out", initial=init_dir, verify_output=True)
    assert result.verification is not None
    assert result.verification.passed
