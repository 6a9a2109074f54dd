"""`adapterctl inspect --engine`: the verdict table, the JSON `engines`, --check and --base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.helpers import P, Q, V, lora_tensors, write_adapter

runner = CliRunner()
ENV = {"NO_COLOR": "1", "COLUMNS": "200"}


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], prog_name="adapterctl", env=ENV)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "plain")


@pytest.fixture
def patterned(tmp_path: Path) -> Path:
    tensors = {**lora_tensors(), **lora_tensors(V, r=24)}
    config = {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 24}}
    return write_adapter(tmp_path / "patterned", tensors, config)


def test_the_verdict_table_follows_the_report(patterned: Path) -> None:
    result = invoke("inspect", patterned, "--engine", "vllm@0.11", "-e", "llama.cpp", "-e", "peft")
    assert result.exit_code == 0, result.output
    plain_report = invoke("inspect", patterned).stdout
    assert result.stdout.startswith(plain_report)  # the report as without --engine, then:
    rest = result.stdout[len(plain_report) :].splitlines()
    assert rest[1].split() == ["engine", "version", "loads", "same", "as", "PEFT", "needs"]
    assert rest[2].split()[:4] == ["vllm", "0.11", "yes", "no"]
    assert rest[2].endswith("--enable-lora; --max-lora-rank 32")
    assert rest[3].split()[2:4] == ["yes", "yes"]  # llama.cpp: alpha / its own rank is PEFT's
    assert rest[4].split()[:4] == ["peft", "0.21.2", "yes", "yes"]
    assert rest[5].startswith("vllm warning [vllm.patterns]: takes one scale per adapter")


def test_json_engines_per_adapter(patterned: Path) -> None:
    result = invoke("inspect", patterned, "--json", "-e", "vllm@0.11", "-e", "tgi")
    assert result.exit_code == 0
    (adapter,) = json.loads(result.stdout)["adapters"]
    vllm, tgi = adapter["engines"]
    assert vllm == {
        "engine": "vllm",
        "version": "0.11",
        "loads": True,
        "same_as_peft": False,
        "findings": [
            {
                "level": "warning",
                "rule": "vllm.patterns",
                "message": vllm["findings"][0]["message"],
            }
        ],
        "needs": ["--enable-lora", "--max-lora-rank 32"],
    }
    assert "ignores rank_pattern/alpha_pattern" in vllm["findings"][0]["message"]
    assert (tgi["engine"], tgi["loads"], tgi["same_as_peft"]) == ("tgi", True, False)


def test_without_engine_the_document_is_unchanged(plain: Path) -> None:
    doc = json.loads(invoke("inspect", plain, "--json").stdout)
    assert "engines" not in doc["adapters"][0]
    with_engine = json.loads(invoke("inspect", plain, "--json", "-e", "peft").stdout)
    del with_engine["adapters"][0]["engines"]
    assert with_engine == doc


def test_check_fails_when_an_engine_would_not_serve_it(plain: Path, patterned: Path) -> None:
    assert invoke("inspect", plain, "-e", "vllm@0.11", "-e", "llama.cpp", "--check").exit_code == 0
    assert invoke("inspect", patterned, "-e", "llama.cpp", "--check").exit_code == 0
    failed = invoke("inspect", patterned, "-e", "llama.cpp", "-e", "vllm@0.11", "--check")
    assert failed.exit_code == 1
    assert failed.stderr.startswith(
        "error: adapter `default` fails the check: vllm 0.11 computes something else than PEFT"
    )
    as_json = invoke("inspect", patterned, "-e", "vllm@0.11", "--check", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stderr)["error"]["type"] == "CheckFailed"
    # without --check the same verdicts exit 0: the report is the answer
    assert invoke("inspect", patterned, "-e", "vllm@0.11").exit_code == 0


def test_check_fails_when_an_engine_refuses_it(tmp_path: Path) -> None:
    tensors = {**lora_tensors(), f"{P}{Q}.lora_magnitude_vector": lora_tensors()[
        f"{P}{Q}.lora_B.weight"][:, 0].copy()}  # fmt: skip
    path = write_adapter(tmp_path / "dora", tensors, {"use_dora": True})
    result = invoke("inspect", path, "-e", "vllm@0.11", "--check")
    assert result.exit_code == 1
    assert "vllm 0.11 does not load: does not support DoRA" in result.stderr
    assert invoke("inspect", path, "-e", "peft", "--check").exit_code == 0


def test_base_config_is_read(tmp_path: Path) -> None:
    tensors = {**lora_tensors(), **lora_tensors("lm_head")}
    path = write_adapter(tmp_path / "a", tensors, {"target_modules": ["q_proj", "lm_head"]})
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True})
    )
    result = invoke("inspect", path, "-e", "llama.cpp", "--base", base, "--json")
    (verdict,) = json.loads(result.stdout)["adapters"][0]["engines"]
    assert (verdict["loads"], verdict["findings"][0]["rule"]) == (False, "llama.cpp.tied_lm_head")
    without = json.loads(invoke("inspect", path, "-e", "llama.cpp", "--json").stdout)
    assert without["adapters"][0]["engines"][0]["loads"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-e", "trt"], "unknown engine `trt`"),
        (["-e", "vllm@0.2"], "no rules for vllm 0.2"),
        (["--base", "x"], "--base is read only with --engine"),
    ],
)
def test_usage_errors_exit_2(plain: Path, args: list[str], message: str) -> None:
    result = invoke("inspect", plain, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_untrusted_names_are_escaped(tmp_path: Path) -> None:
    evil = "model.layers.0.mlp.ev\x1b[31mil"
    tensors = {**lora_tensors(), **lora_tensors(evil)}
    path = write_adapter(tmp_path / "a", tensors, {"target_modules": ["q_proj", "il"]})
    result = invoke("inspect", path, "-e", "tgi")
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout
    assert "tgi warning [tgi.layer_types]" in result.stdout


@pytest.mark.slow
def test_a_hub_base_is_read_for_its_config_only(tmp_path: Path) -> None:
    from tests.hub.test_hub import TOKENS, cli, client_env
    from tests.hubserver import FakeHub

    tensors = {**lora_tensors(), **lora_tensors("lm_head")}
    path = write_adapter(tmp_path / "a", tensors, {"target_modules": ["q_proj", "lm_head"]})
    config = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}
    with FakeHub(TOKENS) as hub:
        hub.put(
            "org/base",
            {"config.json": json.dumps(config).encode(), "model.safetensors": b"\0" * 4096},
        )
        env = client_env(hub, tmp_path / "hf")
        result = cli(env, "inspect", path, "-e", "llama.cpp", "--base", "org/base", "--json")
        assert result.returncode == 0, result.stderr
        (verdict,) = json.loads(result.stdout)["adapters"][0]["engines"]
        assert verdict["findings"][0]["rule"] == "llama.cpp.tied_lm_head"
        fetched = {e.path.rsplit("/", 1)[-1] for e in hub.log if "/resolve/" in e.path}
        assert fetched == {"config.json"}


def test_an_older_peft_release(plain: Path) -> None:
    result = invoke("inspect", plain, "-e", "peft@0.10", "-e", "peft@0.14", "--check")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(line.split()[:4] == ["peft", "0.10", "no", "no"] for line in lines)
    assert any(line.split()[:4] == ["peft", "0.14", "yes", "yes"] for line in lines)
    assert "PEFT 0.10 raises TypeError" in result.stderr


def test_vllm_defaults_to_the_newest_release_and_takes_one(patterned: Path) -> None:
    """vLLM 0.32 and later scale each module as PEFT does; `vllm@X.Y[.Z]` picks a release."""
    doc = json.loads(
        invoke("inspect", patterned, "--json", "-e", "vllm", "-e", "vllm@0.31.0").stdout
    )
    new, old = doc["adapters"][0]["engines"]
    assert (new["version"], new["same_as_peft"], new["findings"]) == ("0.34", True, [])
    assert (old["version"], old["same_as_peft"]) == ("0.31", False)
    assert [f["rule"] for f in old["findings"]] == ["vllm.patterns"]


def test_engine_completion_offers_each_vllm_release() -> None:
    from adapterctl.cli.choices import engines

    offered = engines()
    assert {"vllm", "vllm@0.4", "vllm@0.31", "vllm@0.34", "peft@0.10"} <= set(offered)
    assert "vllm@0.3" not in offered
