"""`adapterctl.combine` against PEFT 0.21.2's `add_weighted_adapter` on tiny Llama and GPT-2
adapters (where PEFT is right: equal ranks and alphas, no rslora), against the weighted sum of the
sources' deltas where PEFT is wrong (mixed ranks, alphas, patterns, rslora: peft#3761), and its
refusals."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterctl
from adapterctl.errors import (
    AdapterctlError,
    ConversionError,
    IncompatibleModelError,
    InvalidOptionError,
    UnsupportedVariantError,
)
from adapterctl.format.rawtensor import to_float64
from tests.fixtures import peft_save, tiny_gpt2, tiny_llama
from tests.helpers import P, Q, V, lora_deltas, lora_tensors, read_raw, write_adapter

pytestmark = pytest.mark.slow

WEIGHTS = [0.7, -0.4]
TARGETS = ["q_proj", "v_proj"]


def _quiet(fn: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder with two Llama adapters, `default` (root) and `b`, equal r and alpha, on
    Linear layers and the embedding (Embedding LoRA); `b` also targets up_proj (a module only one
    source has)."""
    root = tmp_path_factory.mktemp("combine") / "pair"
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": [*TARGETS, "embed_tokens"]}
    b = {**cfg, "target_modules": [*TARGETS, "embed_tokens", "up_proj"]}
    return peft_save(tiny_llama, root, {"default": cfg, "b": b})


@pytest.fixture(scope="session")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("combine") / "gpt2"
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}
    return peft_save(tiny_gpt2, root, {"default": cfg, "b": cfg})


@pytest.fixture(scope="session")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where PEFT is wrong: rslora, different ranks and alphas, rank and alpha patterns."""
    root = tmp_path_factory.mktemp("combine") / "mixed"
    return peft_save(
        tiny_llama,
        root,
        {
            "default": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": TARGETS},
            "b": {
                "r": 2,
                "lora_alpha": 16,
                "target_modules": [*TARGETS, "down_proj"],
                "rank_pattern": {"v_proj": 6},
                "alpha_pattern": {"down_proj": 3},
            },
        },
    )


def _peft(model_fn: Any, folder: Path, weights: list[float], method: str, **kw: Any) -> Any:
    """PEFT's combination of `folder`'s `default` and `b`, as `c`; returns the PeftModel."""

    def run() -> Any:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model_fn(), str(folder), adapter_name="default")
        model.load_adapter(str(folder / "b"), adapter_name="b")
        model.add_weighted_adapter(["default", "b"], weights, "c", combination_type=method, **kw)
        return model

    return _quiet(run)


def _peft_factors(model: Any, name: str = "c") -> dict[str, tuple[Any, Any, float]]:
    """module -> (A, B, scaling) of adapter `name` (float64 numpy)."""
    out = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            a = module.lora_A[name].weight.detach().double().numpy()
            b = module.lora_B[name].weight.detach().double().numpy()
            out[path] = (a, b, module.scaling[name])
        elif hasattr(module, "lora_embedding_A") and name in module.lora_embedding_A:
            a = module.lora_embedding_A[name].detach().double().numpy()
            b = module.lora_embedding_B[name].detach().double().numpy()
            out[path] = (a, b, module.scaling[name])
    return out


def _peft_deltas(model: Any, name: str = "c") -> dict[str, Any]:
    return {m: s * (b @ a) for m, (a, b, s) in _peft_factors(model, name).items()}


def _ours(folder: Path, out: Path, method: str, weights: list[float] = WEIGHTS, **kw: Any) -> Any:
    return adapterctl.combine(
        [folder / "default", folder / "b"], out, weights=weights, method=method, **kw
    )


def _rel(x: Any, y: Any) -> float:
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def _weighted_sum(folder: Path, weights: list[float]) -> dict[str, Any]:
    sources = [lora_deltas(folder), lora_deltas(folder / "b")]
    modules = sorted({m for d in sources for m in d})
    return {
        m: sum(w * d[m] for w, d in zip(weights, sources, strict=True) if m in d) for m in modules
    }


# --- against PEFT, where PEFT is right --------------------------------------------------------


def test_cat_gives_peft_deltas_exactly(pair: Path, tmp_path: Path) -> None:
    result = _ours(pair, tmp_path / "out", "cat", verify=True)
    ours = lora_deltas(tmp_path / "out")
    theirs = _peft_deltas(_peft(tiny_llama, pair, WEIGHTS, "cat"))
    assert sorted(ours) == sorted(theirs)
    for m in theirs:
        assert _rel(ours[m], theirs[m]) < 1e-6, m
    exact = _weighted_sum(pair, WEIGHTS)
    assert all(_rel(ours[m], exact[m]) < 1e-6 for m in exact)
    up = next(m for m in result.modules if m.module.endswith("up_proj"))
    assert (up.ranks_in, up.rank_out) == ((4,), 4)  # only `b` targets it: a narrower cat
    assert result.verification is not None
    assert result.verification.passed
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    assert config["target_modules"] == sorted([*TARGETS, "embed_tokens", "up_proj"])
    assert "model.embed_tokens" in ours  # Embedding LoRA, as lora_embedding_A/B
    # PEFT saved the embedding's own weight beside it (save_embedding_layers): one copy carried
    assert result.carried == [f"{P}model.embed_tokens.base_layer.weight"]
    copied = read_raw(tmp_path / "out")[result.carried[0]]
    assert bytes(copied.buffer()) == bytes(read_raw(pair)[result.carried[0]].buffer())


def test_cat_on_gpt2_conv1d_gives_peft_deltas(gpt2_pair: Path, tmp_path: Path) -> None:
    _ours(gpt2_pair, tmp_path / "out", "cat")
    ours = lora_deltas(tmp_path / "out")
    theirs = _peft_deltas(_peft(tiny_gpt2, gpt2_pair, WEIGHTS, "cat"))
    assert sorted(ours) == sorted(theirs)
    for m in theirs:
        assert _rel(ours[m], theirs[m]) < 1e-6, m
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True


def test_linear_gives_peft_factors(pair: Path, tmp_path: Path) -> None:
    _ours(pair, tmp_path / "out", "linear", verify=True)
    ours = _factors(tmp_path / "out")
    theirs = _peft_factors(_peft(tiny_llama, pair, WEIGHTS, "linear"))
    assert sorted(ours) == sorted(theirs)
    for m, (a, b, s) in theirs.items():
        assert s == 1.0
        np.testing.assert_allclose(ours[m][0], a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ours[m][1], b, rtol=1e-5, atol=1e-7)


def _factors(folder: Path) -> dict[str, tuple[Any, Any]]:
    raw = read_raw(folder)
    return {
        k.removeprefix(P).split(".lora_")[0]: (
            to_float64(t),
            to_float64(raw[k.replace("_A", "_B")]),
        )
        for k, t in raw.items()
        if k.endswith(("lora_A.weight", "lora_embedding_A"))
    }


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.6}),
        ("ties_svd", {"density": 0.5}),
        ("magnitude_prune_svd", {"density": 0.4}),
        ("dare_linear", {"density": 1.0}),  # the mask-free part: no mask at density 1
        ("dare_ties", {"density": 1.0, "majority_sign_method": "frequency"}),
        ("dare_ties_svd", {"density": 1.0}),
    ],
)
def test_task_vector_methods_give_peft_deltas(
    pair: Path, tmp_path: Path, method: str, kw: dict[str, Any]
) -> None:
    _ours(pair, tmp_path / "out", method, verify=True, **kw)
    ours = lora_deltas(tmp_path / "out")
    theirs = _peft_deltas(_peft(tiny_llama, pair, WEIGHTS, method, **kw))
    assert sorted(ours) == sorted(theirs)
    for m in theirs:
        assert _rel(ours[m], theirs[m]) < 1e-5, m


def test_svd_is_the_truncation_peft_computes(pair: Path, tmp_path: Path) -> None:
    result = _ours(pair, tmp_path / "out", "svd", rank=3, verify=True)
    ours = lora_deltas(tmp_path / "out")
    theirs = _peft_deltas(_peft(tiny_llama, pair, WEIGHTS, "svd", svd_rank=3))
    exact = _weighted_sum(pair, WEIGHTS)
    for r in result.modules:
        m = r.module
        assert r.rank_out == 3
        assert r.energy is not None
        assert 0 < r.energy < 1
        # the best rank-3 approximation: exactly the energy it reports is kept
        values = np.linalg.svd(exact[m], compute_uv=False)
        assert r.energy == pytest.approx((values[:3] ** 2).sum() / (values**2).sum(), rel=1e-9)
        dropped = float(np.sqrt((values[3:] ** 2).sum()))
        assert np.linalg.norm(ours[m] - exact[m]) <= dropped * (1 + 1e-6) + 1e-6
        assert _rel(ours[m], theirs[m]) < 1e-4, m


def test_dare_masks_by_property(pair: Path, tmp_path: Path) -> None:
    """Each kept value is the source's divided by the density; the kept fraction is about the
    density; the other elements are zero."""
    from adapterctl.ops.combine.methods import dare_linear, random_prune

    rng = np.random.default_rng(3)
    t = rng.standard_normal((200, 300))
    pruned = random_prune(t, 0.3, np.random.default_rng(0))
    kept = pruned != 0
    assert abs(kept.mean() - 0.3) < 0.01
    np.testing.assert_allclose(pruned[kept], t[kept] / 0.3)
    again = random_prune(t, 0.3, np.random.default_rng(0))
    assert np.array_equal(pruned, again)
    assert not np.array_equal(pruned, random_prune(t, 0.3, np.random.default_rng(1)))
    # two sources: each element is one of the four subset sums
    u = rng.standard_normal((50, 60))
    out = dare_linear([t[:50, :60], u], [0.5, 2.0], 0.5, [np.random.default_rng(i) for i in (0, 1)])
    options = np.stack([0 * u, t[:50, :60], 4 * u, t[:50, :60] + 4 * u])
    assert np.isclose(out[None], options).any(axis=0).all()


def test_same_seed_same_bytes(pair: Path, tmp_path: Path) -> None:
    for name, seed in (("one", 5), ("two", 5), ("three", 6)):
        _ours(pair, tmp_path / name, "dare_ties", density=0.5, seed=seed)
    data = {
        n: (tmp_path / n / "adapter_model.safetensors").read_bytes()
        for n in ("one", "two", "three")
    }
    assert data["one"] == data["two"]
    assert data["one"] != data["three"]


# --- where PEFT is wrong ----------------------------------------------------------------------


def _logits(model: Any) -> Any:
    import torch

    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        return model(ids).logits.double().numpy()


def _applied(deltas: dict[str, Any]) -> Any:
    """The tiny Llama with `deltas` added to its weights (float32)."""
    import torch

    model = tiny_llama()
    with torch.no_grad():
        for m, d in deltas.items():
            w = model.get_submodule(m).weight
            w += torch.from_numpy(d).to(w.dtype)
    return model


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_mixed_ranks_alphas_rslora_patterns_are_right(
    mixed: Path, tmp_path: Path, method: str
) -> None:
    rank = {"rank": 12} if method == "svd" else {}  # at least the sum's rank: exact
    result = _ours(mixed, tmp_path / "out", method, verify=True, **rank)
    assert result.verification is not None
    assert result.verification.passed
    exact = _weighted_sum(mixed, WEIGHTS)
    expected = _logits(_applied(exact))

    def ours() -> Any:
        from peft import PeftModel

        return _logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")))

    got = _quiet(ours)
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    # PEFT on the same case (peft#3761: only the new adapter's scaling): measurably wrong
    peft = _peft(tiny_llama, mixed, WEIGHTS, method, **({"svd_rank": 12} if rank else {}))
    peft.set_adapter("c")
    base = _logits(tiny_llama())
    wrong = _quiet(lambda: _logits(peft))
    assert _rel(wrong - base, expected - base) > 0.05


@pytest.mark.parametrize(
    ("fixture", "name"),
    [
        ("mixed", "default"),  # rslora
        ("mixed", "b"),  # rank and alpha patterns
        ("pair", "b"),  # Embedding LoRA, a saved base weight
        ("gpt2_pair", "b"),  # Conv1D (fan_in_fan_out)
    ],
)
def test_one_source_at_weight_one_reproduces_itself(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, name: str
) -> None:
    folder = request.getfixturevalue(fixture)
    source = lora_deltas(folder / name if name != "default" else folder)
    for method in ("cat", "linear", "svd"):
        out = tmp_path / method
        adapterctl.combine([folder / name], out, weights=[1.0], method=method, verify=True)
        got = lora_deltas(out)
        assert sorted(got) == sorted(source)
        for m in source:
            assert _rel(got[m], source[m]) < 1e-6, (method, m)


def test_targets_a_regex_cannot_name_are_named_in_full(tmp_path: Path) -> None:
    """A source that targets by regex or by layer: the output names each module it holds (and
    nothing more); plain lists are joined as they are."""
    a = write_adapter(tmp_path / "a", None, {"target_modules": ".*q_proj"})
    b = write_adapter(tmp_path / "b", lora_tensors(V), {"target_modules": ["v_proj"]})
    c = write_adapter(
        tmp_path / "c", lora_tensors(V), {"target_modules": ["v_proj"], "layers_to_transform": [0]}
    )
    result = adapterctl.combine([a, b], tmp_path / "ab", weights=[1, 1], method="cat")
    assert result.config.target_modules == [Q, V]
    result = adapterctl.combine([b, c], tmp_path / "bc", weights=[1, 1], method="cat")
    assert result.config.target_modules == [V]
    assert result.config.layers_to_transform is None
    plain = write_adapter(tmp_path / "plain", None, {"target_modules": ["q_proj"]})
    result = adapterctl.combine([plain, b], tmp_path / "lists", weights=[1, 1], method="cat")
    assert result.config.target_modules == ["q_proj", "v_proj"]


# --- refusals ---------------------------------------------------------------------------------


def _plain(root: Path, name: str, config: dict[str, Any] | None = None, **kw: Any) -> Path:
    return write_adapter(root / name, kw.get("tensors"), config)


def test_refusals_write_nothing_and_leave_an_existing_output(tmp_path: Path) -> None:
    a = _plain(tmp_path, "a")
    b = write_adapter(tmp_path / "b", lora_tensors(r=2), {"r": 2})
    existing = _plain(tmp_path, "existing")
    (existing / "keep.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    cases: list[tuple[type[AdapterctlError], dict[str, Any], list[Path]]] = [
        (ConversionError, {"method": "linear", "weights": [1, 1]}, [a, b]),  # ranks 4 and 2
        (InvalidOptionError, {"method": "ties", "weights": [1, 1]}, [a, b]),  # no density
        (InvalidOptionError, {"method": "ties", "weights": [1, 1], "density": 0.0}, [a, b]),
        (InvalidOptionError, {"method": "dare_linear", "weights": [1, 1], "density": 1.5}, [a, b]),
        (InvalidOptionError, {"method": "cat", "weights": [1]}, [a, b]),
        (InvalidOptionError, {"method": "cat", "weights": [1, 1], "density": 0.5}, [a, b]),
        (InvalidOptionError, {"method": "cat", "weights": [1, 1], "rank": 2}, [a, b]),
        (InvalidOptionError, {"method": "nope", "weights": [1, 1]}, [a, b]),
    ]
    for error, kw, sources in cases:
        with pytest.raises(error):
            adapterctl.combine(sources, existing, force=True, **kw)
        assert {p.name: p.read_bytes() for p in existing.iterdir()} == before, kw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "existing"]


def test_unequal_ranks_are_named(tmp_path: Path) -> None:
    a = _plain(tmp_path, "a")
    b = write_adapter(tmp_path / "b", lora_tensors(r=2), {"r": 2})
    with pytest.raises(ConversionError, match=r"rank 4 in `.*a`, 2 in `.*b`"):
        adapterctl.combine([a, b], tmp_path / "out", weights=[1, 1], method="ties", density=0.5)


def test_the_same_adapter_twice_is_refused(tmp_path: Path) -> None:
    a = _plain(tmp_path, "a")
    os.symlink(a, tmp_path / "link")
    with pytest.raises(InvalidOptionError, match="same adapter"):
        adapterctl.combine([a, tmp_path / "link"], tmp_path / "out", weights=[1, 1], method="cat")


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        ({"use_dora": True}, {f"{P}{Q}.lora_magnitude_vector": np.ones(8, np.float32)}, "DoRA"),
        ({"lora_bias": True}, {f"{P}{Q}.lora_B.bias": np.ones(8, np.float32)}, "lora_bias"),
        ({"bias": "all"}, {f"{P}{Q}.bias": np.ones(8, np.float32)}, "biases"),
        ({}, {f"{P}{Q}.bias": np.ones(8, np.float32)}, "trained bias"),
        (
            {},
            {
                f"{P}{Q}.lora_A.weight": np.ones((4, 8, 1, 1), np.float32),
                f"{P}{Q}.lora_B.weight": np.ones((8, 4, 1, 1), np.float32),
            },
            "convolution",
        ),
    ],
)
def test_what_cannot_be_combined_is_refused(
    tmp_path: Path, config: dict[str, Any], tensors: dict[str, Any], match: str
) -> None:
    a = _plain(tmp_path, "a")
    bad = write_adapter(tmp_path / "bad", {**lora_tensors(), **tensors}, config)
    with pytest.raises(UnsupportedVariantError, match=match):
        adapterctl.combine([a, bad], tmp_path / "out", weights=[1, 1], method="cat")
    assert not (tmp_path / "out").exists()


def test_different_bases_are_refused(tmp_path: Path) -> None:
    a = _plain(tmp_path, "a")
    wide = write_adapter(tmp_path / "wide", lora_tensors(d_in=16))
    with pytest.raises(IncompatibleModelError, match="different base models"):
        adapterctl.combine([a, wide], tmp_path / "out", weights=[1, 1], method="cat")


def test_modules_to_save_one_source_carried_several_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head = {f"{P}lm_head.weight": np.arange(32, dtype=np.float32).reshape(4, 8)}
    a = _plain(tmp_path, "a")
    s1 = write_adapter(
        tmp_path / "s1", {**lora_tensors(), **head}, {"modules_to_save": ["lm_head"]}
    )
    s2 = write_adapter(
        tmp_path / "s2", {**lora_tensors(), **head}, {"modules_to_save": ["lm_head"]}
    )
    result = adapterctl.combine([a, s1], tmp_path / "out", weights=[1, 1], method="cat")
    assert result.carried == [f"{P}lm_head.weight"]
    assert any("carried over" in w for w in result.warnings)

    np.testing.assert_array_equal(
        to_float64(read_raw(tmp_path / "out")[f"{P}lm_head.weight"]), head[f"{P}lm_head.weight"]
    )
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    with pytest.raises(ConversionError, match="modules_to_save"):
        adapterctl.combine([s1, s2], tmp_path / "out2", weights=[1, 1], method="cat")


def test_saved_base_weights_that_differ_are_refused(tmp_path: Path) -> None:
    key = f"{P}model.embed_tokens.base_layer.weight"
    one = write_adapter(tmp_path / "one", {**lora_tensors(), key: np.zeros((4, 8), np.float32)})
    two = write_adapter(tmp_path / "two", {**lora_tensors(V), key: np.ones((4, 8), np.float32)})
    with pytest.raises(ConversionError, match="different copies of a base weight"):
        adapterctl.combine([one, two], tmp_path / "out", weights=[1, 1], method="cat")
    assert not (tmp_path / "out").exists()


def test_verify_catches_a_wrong_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--verify compares with an independent recomputation: a wrong one fails, nothing written."""
    from adapterctl.ops.combine import VerificationFailed
    from adapterctl.ops.combine import verify as verify_module

    a = _plain(tmp_path, "a")
    b = write_adapter(tmp_path / "b", lora_tensors(V), {"target_modules": ["v_proj"]})
    original = verify_module.reference
    monkeypatch.setattr(verify_module, "reference", lambda *args: 1.01 * original(*args))
    with pytest.raises(VerificationFailed):
        adapterctl.combine([a, b], tmp_path / "out", weights=[1, 1], method="cat", verify=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("method", "weights", "config", "dtype"),
    [
        ("cat", [1e39, 1], {}, np.float32),  # fits float64, not the float32 output
        ("cat", [6e4, 1], {}, np.float16),
        ("svd", [1e300, 1], {"lora_alpha": 1e300}, np.float32),  # overflows float64 too
        ("ties_svd", [1e300, 1], {"lora_alpha": 1e300}, np.float32),
        ("linear", [1e300, 1], {"lora_alpha": 1e300}, np.float32),
    ],
)
def test_factors_that_overflow_are_refused_not_written(
    tmp_path: Path, method: str, weights: list[float], config: dict[str, Any], dtype: Any
) -> None:
    t = {k: v.astype(dtype) for k, v in lora_tensors().items()}
    a = _plain(tmp_path, "a", config, tensors=t)
    b = _plain(tmp_path, "b", tensors=t)
    density = 0.5 if method == "ties_svd" else None
    with pytest.raises(ConversionError, match=r"`.*q_proj`: the combined factors overflow"):
        adapterctl.combine(
            [a, b], tmp_path / "out", weights=weights, method=method, density=density
        )
    assert not (tmp_path / "out").exists()


def test_factors_that_are_not_floats_are_refused_naming_them(tmp_path: Path) -> None:
    t = lora_tensors()
    t = {k: (v * 10).astype(np.int64) if "lora_A" in k else v for k, v in t.items()}
    a, b = _plain(tmp_path, "a", tensors=t), _plain(tmp_path, "b")
    with pytest.raises(AdapterctlError, match=r"lora_A.weight` is I64: LoRA factors are") as e:
        adapterctl.combine([a, b], tmp_path / "out", weights=[1, 1], method="cat")
    assert e.value.hint


def test_svd_rank_defaults_to_the_largest_rank_any_config_gives_as_peft(tmp_path: Path) -> None:
    """PEFT's svd_rank default is the largest r or rank_pattern value of the sources' configs,
    not the largest rank actually stored: r=4 with q_proj at rank 2 gives rank 4 (exact here)."""
    t = lora_tensors(r=2)
    cfg = {"r": 4, "rank_pattern": {"q_proj": 2}}
    a, b = _plain(tmp_path, "a", cfg, tensors=t), _plain(tmp_path, "b", cfg, tensors=t)
    result = adapterctl.combine([a, b], tmp_path / "out", weights=[1, -0.5], method="svd")
    assert [m.rank_out for m in result.modules] == [4]
    assert result.modules[0].energy == pytest.approx(1.0)


def test_the_config_names_the_base_the_sources_agree_on(tmp_path: Path) -> None:
    a = _plain(tmp_path, "a")  # names no base
    b = _plain(tmp_path, "b", {"base_model_name_or_path": "org/base"})
    adapterctl.combine([a, b], tmp_path / "out", weights=[1, 1], method="cat")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base"
