"""format/peftversions.py: the key table of PEFT 0.6 .. 0.21, `for_release` (convert
--peft-version) and `peft_version_findings` (inspect --engine peft@X.Y). The table is checked
against the installed PEFT 0.21.2 here, and against PEFT 0.10, 0.14 and 0.17 (key sets, loading,
logits) in the slow tests, which need the environments of tests/peft_envs.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapterctl.errors import ConversionError, InvalidOptionError
from adapterctl.format.config import LoraConfig
from adapterctl.format.peftversions import (
    KEYS,
    RELEASES,
    for_release,
    is_on,
    knows,
    peft_version_findings,
    release,
    release_json,
)
from tests import peft_envs
from tests.fixtures import TINY_LLAMA

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
MODULES = [Q0, V0, Q1]


def cfg(**fields: Any) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **fields})


def rules(findings: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(level, rule) for level, rule, _ in findings]


# --- the table ---------------------------------------------------------------------------------


def test_releases_are_every_minor_from_0_6_to_0_21() -> None:
    assert tuple(f"0.{n}" for n in range(6, 22)) == RELEASES


def test_keys_of_0_21_are_the_installed_peft_lora_config_fields() -> None:
    from peft import LoraConfig as PeftLoraConfig

    fields = {f.name: f for f in dataclasses.fields(PeftLoraConfig)}
    assert {k for k in KEYS if knows("0.21", k)} == set(fields)
    for name, f in fields.items():
        if name in ("runtime_config", "peft_type"):  # a factory object; set by __post_init__
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert KEYS[name].default == default, name


def test_knows_follows_the_first_release() -> None:
    assert knows("0.13", "exclude_modules") is False
    assert knows("0.14", "exclude_modules") is True
    assert knows("0.21", "kasa_config")
    assert not knows("0.20", "kasa_config")
    assert all(knows(v, "r") for v in RELEASES)
    assert not knows("0.21", "no_such_key")


@pytest.mark.parametrize("given", ["0.10", "0.10.0", "0.10.3", " 0.10 "])
def test_release_accepts_minor_and_patch(given: str) -> None:
    assert release(given) == "0.10"


@pytest.mark.parametrize("given", ["0.5", "0.22", "1.0", "0.x", "", "0.10.0.1"])
def test_release_refuses_others(given: str) -> None:
    with pytest.raises(InvalidOptionError, match="unknown PEFT version"):
        release(given)


def test_is_on_tells_defaults_from_features() -> None:
    assert not is_on("use_dora", False)
    assert is_on("use_dora", True)
    assert not is_on("exclude_modules", None)
    assert not is_on("exclude_modules", [])
    assert is_on("exclude_modules", ["k_proj"])
    assert not is_on("peft_version", "0.21.2")  # metadata
    assert not is_on("eva_config", {"rho": 2})  # initialisation only
    assert not is_on("monteclora_config", None)
    assert is_on("monteclora_config", {})


# --- for_release -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", RELEASES)
def test_written_config_holds_only_the_release_keys(version: str) -> None:
    out, notes = for_release(cfg(), version, MODULES)
    written = json.loads(release_json(out, version))
    assert set(written) == {k for k in KEYS if knows(version, k)} - {"runtime_config"}
    assert notes == []
    assert LoraConfig.from_dict(written).to_json() == cfg().to_json()  # same meaning


@pytest.mark.parametrize(
    ("key", "value", "since"),
    [
        ("lora_bias", True, "0.14"),
        ("use_dora", True, "0.9"),
        ("layer_replication", [[0, 1]], "0.10"),
        ("trainable_token_indices", [1, 2], "0.15"),
    ],
)
def test_a_feature_on_is_refused_by_a_release_without_it(key: str, value: Any, since: str) -> None:
    before = RELEASES[RELEASES.index(since) - 1]
    with pytest.raises(ConversionError) as e:
        for_release(cfg(**{key: value}), before, MODULES)
    assert (
        str(e.value) == f"`{key}` is on and PEFT {before} does not know it (first in PEFT {since})"
    )
    out, _ = for_release(cfg(**{key: value}), since, MODULES)
    assert json.loads(release_json(out, since))[key] == value
    out, _ = for_release(cfg(**{key: KEYS[key].default}), before, MODULES)  # off: dropped
    assert key not in json.loads(release_json(out, before))


def test_rslora_is_refused_with_the_portable_hint() -> None:
    with pytest.raises(ConversionError, match=r"first in PEFT 0\.8") as e:
        for_release(cfg(use_rslora=True), "0.7", MODULES)
    assert e.value.hint is not None
    assert "--portable" in e.value.hint
    out, _ = for_release(cfg(use_rslora=True), "0.8", MODULES)
    assert out.use_rslora is True


def test_exclude_modules_resolved_to_the_modules_the_weights_hold() -> None:
    config = cfg(target_modules=["q_proj", "v_proj", "k_proj"], exclude_modules=["k_proj"])
    out, notes = for_release(config, "0.13", MODULES)
    written = json.loads(release_json(out, "0.13"))
    assert written["target_modules"] == sorted(MODULES)
    assert "exclude_modules" not in written
    assert "target_modules written as the 3 modules" in notes[0]
    kept, notes = for_release(config, "0.14", MODULES)
    assert kept.exclude_modules == ["k_proj"]
    assert notes == []


def test_all_linear_resolved_before_0_8_only() -> None:
    out, _ = for_release(cfg(target_modules="all-linear"), "0.7", MODULES)
    assert out.target_modules == sorted(MODULES)
    out, _ = for_release(cfg(target_modules="all-linear"), "0.8", MODULES)
    assert out.target_modules == "all-linear"


def test_layers_to_transform_resolved_for_older_releases() -> None:
    config = cfg(layers_to_transform=[0], layers_pattern="layers")
    out, _ = for_release(config, "0.19", [Q0, V0])
    assert (out.target_modules, out.layers_to_transform, out.layers_pattern) == (
        [Q0, V0],
        None,
        None,
    )
    out, _ = for_release(config, "0.21", [Q0, V0])
    assert out.layers_to_transform == [0]


def test_resolving_without_modules_is_refused() -> None:
    with pytest.raises(ConversionError, match="hold no LoRA module"):
        for_release(cfg(target_modules="all-linear"), "0.7", [])


def test_plain_init_written_as_true_residual_refused() -> None:
    out, notes = for_release(cfg(init_lora_weights="eva"), "0.13", MODULES)
    assert out.init_lora_weights is True
    assert 'init_lora_weights "eva" written as true' in notes[0]
    out, _ = for_release(cfg(init_lora_weights="eva"), "0.14", MODULES)
    assert out.init_lora_weights == "eva"
    with pytest.raises(ConversionError, match=r'"pissa_niter_4" \(first in PEFT 0.11\)') as e:
        for_release(cfg(init_lora_weights="pissa_niter_4"), "0.10", MODULES)
    assert e.value.hint is not None
    assert "--initial or --base" in e.value.hint
    for_release(cfg(init_lora_weights="pissa_niter_4"), "0.11", MODULES)


#: read by PEFT 0.21.2 as Q0: 2, Q1: 3 and V0: alpha 16; by PEFT <= 0.14 as Q0: 3 and V0: 4 (the
#: suffix keys are tried first, a whole name only when no key matches)
WHOLE_NAMES = {"rank_pattern": {Q0: 2, "q_proj": 3}, "alpha_pattern": {V0: 16, "v_proj": 4}}


def test_pattern_keys_rewritten_before_0_15() -> None:
    config = cfg(**WHOLE_NAMES)
    out, notes = for_release(config, "0.14", MODULES)
    assert out.rank_pattern == {Q0: 2, Q1: 3}
    assert out.alpha_pattern == {V0: 16}
    assert notes == ["PEFT 0.14: rank_pattern/alpha_pattern written as one key per module"]
    assert peft_version_findings(out, "0.14", MODULES) == []  # read as PEFT 0.21.2 reads it
    assert [(out.rank_for(m), out.alpha_for(m)) for m in MODULES] == [
        (config.rank_for(m), config.alpha_for(m)) for m in MODULES
    ]
    same, notes = for_release(config, "0.15", MODULES)
    assert same.rank_pattern == WHOLE_NAMES["rank_pattern"]
    assert notes == []
    alone = cfg(rank_pattern={Q0: 2}, alpha_pattern={"v_proj": 16})  # read alike by every release
    assert for_release(alone, "0.6", MODULES) == (alone, [])


def test_pattern_keys_are_tried_in_file_order() -> None:
    """Both keys match v_proj: the file's first wins. Read as they stand, every release agrees;
    written sorted (as every config is), the other key would win, so each module gets its own."""
    config = cfg(r=4, rank_pattern={"v_proj": 3, "self_attn.v_proj": 5})
    assert peft_version_findings(config, "0.14", [V0]) == []
    out, notes = for_release(config, "0.14", [V0])
    assert out.rank_pattern == {V0: 3}
    assert len(notes) == 1


def test_pattern_keys_that_cannot_name_one_module_are_refused() -> None:
    inner, outer = "a.q", "x.a.q"  # `.*\.a.q$` matches both: no key names `a.q` alone
    config = cfg(target_modules=["q"], rank_pattern={"^a.q": 2})  # PEFT 0.21.2: `a.q` only
    with pytest.raises(ConversionError, match=r"no keys give `x\.a\.q` its rank"):
        for_release(config, "0.14", [inner, outer])
    assert for_release(config, "0.15", [inner, outer]) == (config, [])


def test_keys_no_release_knows_are_dropped_with_a_note() -> None:
    config = LoraConfig.from_dict({**cfg().raw, "from_the_future": 1})
    out, notes = for_release(config, "0.17", MODULES)
    assert "from_the_future" not in out.raw
    assert "`from_the_future`, which no PEFT release knows" in notes[0]


# --- peft_version_findings ---------------------------------------------------------------------


def saved_by_0_21(**fields: Any) -> dict[str, Any]:
    """A config as PEFT 0.21.2 saves it: every field written."""
    return json.loads(cfg(**fields).to_json())  # type: ignore[no-any-return]


def test_unknown_keys_are_an_error_before_0_14_only() -> None:
    found = peft_version_findings(saved_by_0_21(), "0.13", MODULES)
    assert rules(found) == [("error", "peft-unknown-key")]
    assert "`exclude_modules` (PEFT 0.14)" in found[0][2]
    assert peft_version_findings(saved_by_0_21(), "0.14", MODULES) == []
    known = {k: v for k, v in saved_by_0_21().items() if knows("0.13", k)}
    assert peft_version_findings(known, "0.13", MODULES) == []


def test_a_dropped_feature_is_a_warning() -> None:
    found = peft_version_findings(saved_by_0_21(target_parameters=["experts.w"]), "0.16")
    assert rules(found) == [("warning", "peft-dropped-feature")]
    assert "`target_parameters` (first in PEFT 0.17)" in found[0][2]
    assert peft_version_findings(saved_by_0_21(target_parameters=["experts.w"]), "0.17") == []


#: the keys PEFT 0.6 knows: only the init value is new
OLORA = {"peft_type": "LORA", "r": 4, "init_lora_weights": "olora"}


def test_init_value_unknown_is_an_error() -> None:
    found = peft_version_findings(saved_by_0_21(init_lora_weights="orthogonal"), "0.15")
    assert rules(found) == [("error", "peft-init-value")]
    assert peft_version_findings(saved_by_0_21(init_lora_weights="orthogonal"), "0.16") == []
    assert peft_version_findings({**OLORA, "init_lora_weights": "eva"}, "0.6") == []  # as true
    found = peft_version_findings(OLORA, "0.6")
    assert rules(found) == [("warning", "peft-init-value")]
    assert "base weights are not rewritten" in found[0][2]
    assert rules(peft_version_findings(OLORA, "0.7")) == [("error", "peft-init-value")]


def test_all_linear_before_0_8_is_an_error() -> None:
    config = {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}
    assert rules(peft_version_findings(config, "0.7")) == [("error", "peft-all-linear")]
    assert peft_version_findings(config, "0.8") == []


def test_pattern_keys_before_0_15() -> None:
    ranks = saved_by_0_21(rank_pattern=WHOLE_NAMES["rank_pattern"])
    found = peft_version_findings(ranks, "0.14", MODULES)
    assert rules(found) == [("error", "peft-pattern-rank")]
    assert f"`{Q0}` rank 3, not 2" in found[0][2]
    assert peft_version_findings(ranks, "0.15", MODULES) == []
    alphas = saved_by_0_21(alpha_pattern=WHOLE_NAMES["alpha_pattern"])
    found = peft_version_findings(alphas, "0.14", MODULES)
    assert rules(found) == [("warning", "peft-pattern-alpha")]
    assert f"`{V0}` lora_alpha 4, not 16" in found[0][2]
    assert peft_version_findings(saved_by_0_21(rank_pattern={Q0: 2}), "0.14", MODULES) == []


def test_nested_layer_index_before_0_20() -> None:
    expert = "model.layers.1.mlp.experts.3.w1"
    config = saved_by_0_21(target_modules=["w1"], layers_to_transform=[1])
    found = peft_version_findings(config, "0.19", [expert])
    assert rules(found) == [("warning", "peft-layer-index")]
    assert "layer 3 of" in found[0][2]
    assert peft_version_findings(config, "0.20", [expert]) == []
    assert peft_version_findings(config, "0.19", [Q1]) == []


# --- against old PEFT releases (slow) ----------------------------------------------------------

OLD = tuple(peft_envs.ENVS)
LLAMA = TINY_LLAMA
IDS = [[1, 5, 9, 2, 33, 7, 60, 11]]
#: PEFT 0.21.2 configs exercising what --peft-version rewrites
CASES: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {Q0: 2, "q_proj": 3},  # sorted: as saved
        "alpha_pattern": {"model.layers.1.self_attn.v_proj": 16, "v_proj": 4},
    },
    "alphas": {  # PEFT 0.14 loads it with v_proj's alpha 4 on layer 1: a warning
        "r": 4,
        "target_modules": ["q_proj", "v_proj"],
        "alpha_pattern": {"model.layers.1.self_attn.v_proj": 16, "v_proj": 4},
    },
    "all-linear": {
        "r": 4,
        "target_modules": "all-linear",
        "exclude_modules": ["down_proj"],
        "init_lora_weights": "eva",
    },
    "layers": {
        "r": 4,
        "target_modules": ["q_proj", "v_proj", "gate_proj"],
        "exclude_modules": ["gate_proj"],
        "layers_to_transform": [1],
    },
}


def need_env(version: str) -> Path:
    if not peft_envs.ready(version):
        pytest.skip(
            f"no PEFT {version} environment under {peft_envs.cache_root()}: build it with "
            f"`.venv/bin/python -m tests.peft_envs {version}` (package registries only)"
        )
    return peft_envs.env_python(version)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama's weights, one PEFT 0.21.2 adapter per case, and their logits."""
    if not any(peft_envs.ready(v) for v in OLD):
        need_env(OLD[0])  # skips before anything is built
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import save_file

    from tests.fixtures import _quiet, _randomize_lora, tiny_llama

    root = tmp_path_factory.mktemp("peftversions")
    model = tiny_llama(attn_implementation="eager")
    weights = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    ids = torch.tensor(IDS)
    adapters, logits = {}, {}
    for name, config in CASES.items():

        def run(config: dict[str, Any] = config, name: str = name) -> Any:
            pm = get_peft_model(tiny_llama(attn_implementation="eager"), PeftLoraConfig(**config))
            _randomize_lora(pm)
            pm.save_pretrained(str(root / name))
            with torch.no_grad():
                return pm.eval()(ids).logits

        logits[name] = _quiet(run)
        adapters[name] = root / name
    with torch.no_grad():
        base = model(ids).logits
    return {"root": root, "weights": weights, "adapters": adapters, "logits": logits, "base": base}


def run_old(python: Path, made: dict[str, Any], adapters: dict[str, Path]) -> dict[str, Any]:
    root: Path = made["root"]
    job = root / f"job-{len(list(root.glob('job-*')))}.json"
    output = job.with_suffix(".out.json")
    job.write_text(
        json.dumps(
            {
                "config": LLAMA,
                "weights": str(made["weights"]),
                "input_ids": IDS,
                "adapters": {k: str(v) for k, v in adapters.items()},
                "output": str(output),
            }
        )
    )
    script = Path(peft_envs.__file__)
    subprocess.run(
        [str(python), str(script), "logits", str(job)], check=True, timeout=600, cwd=root
    )
    return json.loads(output.read_text())  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("version", OLD)
def test_old_peft_key_sets_match_the_table(version: str) -> None:
    python = need_env(version)
    code = "import dataclasses, json, peft; print(json.dumps([f.name for f in dataclasses.fields(peft.LoraConfig)]))"  # fmt: skip
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) == {
        k for k in KEYS if knows(version, k)
    }


@pytest.mark.slow
@pytest.mark.parametrize("version", OLD)
def test_old_peft_reads_the_converted_config_with_the_same_logits(
    version: str, made: dict[str, Any]
) -> None:
    """Each case converted for `version` loads there and gives PEFT 0.21.2's logits (fp32,
    1e-5); each unconverted source fails to load there exactly when the findings say "error",
    gives PEFT 0.21.2's logits when there are no findings at all, and other logits when there
    are only warnings."""
    import torch

    from adapterctl.ops.convert import convert_adapter

    python = need_env(version)
    jobs: dict[str, Path] = {}
    for name, source in made["adapters"].items():
        out = made["root"] / f"{name}-for-{version}"
        convert_adapter(source, out, peft_version=version)
        jobs[f"{name}-converted"] = out
        jobs[f"{name}-source"] = source
    result = run_old(python, made, jobs)
    base = torch.tensor(result["base"])
    torch.testing.assert_close(base, made["base"], rtol=0, atol=1e-5)  # the same base there
    for name, source in made["adapters"].items():
        ours = made["logits"][name]
        converted = result["adapters"][f"{name}-converted"]
        assert "error" not in converted, (name, converted)
        torch.testing.assert_close(torch.tensor(converted["logits"]), ours, rtol=0, atol=1e-5)
        saved = json.loads((source / "adapter_config.json").read_text())
        modules = list(_modules(source))
        findings = peft_version_findings(saved, version, modules)
        loaded = result["adapters"][f"{name}-source"]
        errors = [f for f in findings if f[0] == "error"]
        assert bool(errors) == ("error" in loaded), (name, findings, loaded.get("error"))
        if not findings:
            torch.testing.assert_close(torch.tensor(loaded["logits"]), ours, rtol=0, atol=1e-5)
        elif not errors:  # loads, and computes something else
            assert not torch.allclose(torch.tensor(loaded["logits"]), ours, rtol=0, atol=1e-5)


def _modules(adapter: Path) -> list[str]:
    from adapterctl.format.header import read_header
    from adapterctl.format.keys import classify

    header = read_header(adapter / "adapter_model.safetensors")
    found = {classify(k).module for k in header.tensors if classify(k).kind == "lora_A"}
    return sorted(found)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
