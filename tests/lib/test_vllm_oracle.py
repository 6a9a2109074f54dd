"""vLLM's own loading code (tests/vllm_env.py: `PEFTHelper`, `validate_legal`,
`LoRAModel.from_local_checkpoint` of vLLM 0.34.0 and 0.11.2, on CPU) as the oracle of the `vllm`
table: on the golden table's PEFT-made adapters and a few more, vLLM loads exactly what `loads`
says it loads, with the `--max-lora-rank` our `needs` names (and refuses it one choice lower).

One vLLM process per release runs every case (about 20 s in all); each release skips when its
side environment is not built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapterctl.ops.engines import Verdict, judge, read_base_config
from adapterctl.ops.engines.vllm import DEFAULT_MAX_RANK, max_lora_ranks
from adapterctl.ops.inspect import inspect_adapter
from tests import vllm_env
from tests.lib.test_engines import MATRIX

pytestmark = pytest.mark.slow

QV = ["q_proj", "v_proj"]
EMB = ["q_proj", "embed_tokens"]
#: extra cases: name -> (the adapter's tiny_llama overrides, the base's, LoraConfig kwargs)
EXTRA: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "embeddings, resized base": ({"vocab_size": 72}, {}, {"r": 8, "target_modules": EMB}),
    "embeddings, larger base": ({}, {"vocab_size": 72}, {"r": 8, "target_modules": EMB}),
    "all linear and embeddings": ({}, {}, {"r": 8, "target_modules": [*QV, "embed_tokens",
                                  "lm_head", "k_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj"]}),
    "rslora with patterns": ({}, {}, {"r": 8, "target_modules": QV, "use_rslora": True,
                             "rank_pattern": {"q_proj": 32}}),
    "init pissa": ({}, {}, {"r": 8, "target_modules": QV, "init_lora_weights": "pissa"}),
    "init gaussian": ({}, {}, {"r": 8, "target_modules": QV, "init_lora_weights": "gaussian"}),
    "layer_replication": ({}, {}, {"r": 8, "target_modules": QV,
                          "layer_replication": [[0, 2], [1, 2]]}),
}  # fmt: skip
CASES = {name: (overrides, overrides, cfg) for name, (overrides, cfg) in MATRIX.items()} | EXTRA


def _needed(verdict: Verdict, flag: str) -> int | None:
    for need in verdict.needs:
        if need.startswith(f"{flag} "):
            return int(need.split()[1])
    return None


def _max_lora_rank(verdict: Verdict, version: str) -> int:
    """The `--max-lora-rank` our needs name; the largest choice where we say it does not load
    (so that vLLM's refusal is not ours); the default otherwise."""
    needed = _needed(verdict, "--max-lora-rank")
    if needed is not None:
        return needed
    return DEFAULT_MAX_RANK if verdict.loads else max_lora_ranks(version)[-1]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every case: (the PEFT-made adapter, its base's config)."""
    from tests.fixtures import peft_save, tiny_llama

    work = tmp_path_factory.mktemp("vllm-adapters")
    found = {}
    for i, (name, (overrides, base_overrides, cfg)) in enumerate(CASES.items()):
        base = work / f"base{i}"
        tiny_llama(**base_overrides).save_pretrained(str(base))
        task = {"default": {"task_type": "CAUSAL_LM", **cfg}}
        adapter = peft_save(lambda o=overrides: tiny_llama(**o), work / f"m{i}", task)
        found[name] = (adapter, read_base_config(base))
    return found


@pytest.fixture(scope="session", params=vllm_env.VERSIONS)
def oracle(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, tuple[Verdict, dict[str, Any]]]]:
    """(the release; every case: our verdict for it with the base's config, vLLM's result); and
    for each case whose needs raise `--max-lora-rank`, `NAME (one lower)`: vLLM at the choice
    below."""
    version: str = request.param
    if not vllm_env.ready(version):
        pytest.skip(
            f"vLLM {version}'s side environment is not built: "
            f".venv/bin/python -m tests.vllm_env --version {version}"
        )
    adapters: dict[str, tuple[Path, dict[str, Any]]] = request.getfixturevalue("adapters")
    minor = version.rsplit(".", 1)[0]
    verdicts: dict[str, Verdict] = {}
    jobs: dict[str, dict[str, Any]] = {}
    for name, (adapter, base) in adapters.items():
        ((verdict,),) = judge(inspect_adapter(adapter), [f"vllm@{minor}"], base).verdicts
        verdicts[name] = verdict
        rank = _max_lora_rank(verdict, minor)
        job = {"adapter": str(adapter), "max_lora_rank": rank, "vocab_size": base["vocab_size"],
               "extra_vocab": _needed(verdict, "--lora-extra-vocab-size")}  # fmt: skip
        jobs[name] = job
        choices = max_lora_ranks(minor)
        if rank > DEFAULT_MAX_RANK and verdict.loads:
            jobs[f"{name} (one lower)"] = {**job, "max_lora_rank": choices[choices.index(rank) - 1]}
            verdicts[f"{name} (one lower)"] = verdict
    work = tmp_path_factory.mktemp(f"vllm-{version}")
    results = vllm_env.run_many(list(jobs.values()), work, version)
    (work / "cases.json").write_text(json.dumps(dict(zip(jobs, results, strict=True)), indent=1))
    return version, {n: (verdicts[n], r) for n, r in zip(jobs, results, strict=True)}


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_loads_what_loads_says(oracle: Any, case: str) -> None:
    verdict, result = oracle[1][case]
    assert result["loads"] == verdict.loads, (verdict.findings, result)


def test_the_needed_max_lora_rank_is_the_smallest(oracle: Any) -> None:
    """Where our needs raise --max-lora-rank, vLLM refuses the adapter one choice lower (up to
    0.31 validate_legal reads `r` only: a larger rank_pattern rank overflows the GPU buffers,
    which is not run here)."""
    version, found = oracle
    lower = [n for n in found if n.endswith("(one lower)")]
    assert {n.removesuffix(" (one lower)") for n in lower} >= {"patterns", "r=24", "r=64"}
    if version == "0.11.2":
        lower = [n for n in lower if n.startswith("r=")]
    for name in lower:
        _, result = found[name]
        assert (result["loads"], result["stage"]) == (False, "validate_legal"), name
        assert "greater than max_lora_rank" in result["error"]


@pytest.mark.parametrize(
    ("case", "rule", "stage"),
    [
        ("dora", "vllm.dora", "validate_legal"),
        ("bias", "vllm.bias", "validate_legal"),
        ("modules_to_save", "vllm.modules_to_save", "validate_legal"),
        ("lora_bias", "vllm.features", "validate_legal"),
        ("init pissa", "vllm.features", "validate_legal"),
        ("layer_replication", "vllm.features", "validate_legal"),
        ("r=600", "vllm.max_rank", "validate_legal"),
        ("embeddings, resized base", "vllm.vocab", "from_local_checkpoint"),
        ("embeddings, larger base", "vllm.vocab", "from_local_checkpoint"),
    ],
)
def test_the_refusal_is_the_rule_we_name(oracle: Any, case: str, rule: str, stage: str) -> None:
    """vLLM 0.34 refuses where our finding says, at the stage the rule cites (lora_bias: also
    `vllm.tensors` for its lora_B biases, which vLLM never reaches after validate_legal)."""
    version, found = oracle
    if version != vllm_env.VERSION:
        pytest.skip("the rules of 0.34")
    verdict, result = found[case]
    assert rule in [f.rule for f in verdict.findings if f.level == "error"]
    assert (result["loads"], result["stage"]) == (False, stage), result
