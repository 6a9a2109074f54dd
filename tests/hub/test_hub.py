"""The Hub end to end: the real huggingface_hub client (in `adapterctl` and PEFT subprocesses with
their own environment; huggingface_hub reads HF_* at import) against tests/hubserver.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hubserver import FakeHub

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOKENS = {"tok-alice-secret": "alice", "tok-bob-secret": "bob"}
ALICE = "tok-alice-secret"


@pytest.fixture
def hub() -> Any:
    with FakeHub(TOKENS) as server:
        yield server


def client_env(
    hub: FakeHub, home: Path, *, xet: bool = False, token: str | None = ALICE
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    if token:
        env["HF_TOKEN"] = token
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    return env


def cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterctl", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=180, check=False,
    )  # fmt: skip


def python(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=300, check=False,
    )  # fmt: skip


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def adapter(peft_adapters: dict[str, Path], tmp_path: Path) -> Path:
    """A PEFT adapter with training leftovers beside it that must never be uploaded."""
    src = tmp_path / "run"
    shutil.copytree(peft_adapters["llama_basic"], src)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    (src / "optimizer.pt").write_bytes(b"\0" * 64)
    (src / "trainer_state.json").write_text("{}")
    (src / "README.md").write_text("---\ntags:\n- mine\n---\n# My adapter\n")
    return src


@pytest.mark.parametrize("mode", ["lfs", "regular"])
def test_push_and_push_again(mode: str, hub: FakeHub, adapter: Path, tmp_path: Path) -> None:
    hub.upload_mode = "auto" if mode == "lfs" else "regular"
    env = client_env(hub, tmp_path / "hf", xet=mode == "regular")
    hub.put("alice/tiny", {"README.md": b"---\ntags:\n- remote-tag\n---\nold card\n"})
    before = tree_digest(adapter)
    result = cli(env, "push", adapter, "alice/tiny", "--base-model", "org/tiny-llama", "--json")
    assert result.returncode == 0, result.stderr
    for line in result.stderr.splitlines():  # under --json, stderr holds only JSON lines
        assert set(json.loads(line)) <= {"warning"}, result.stderr
    doc = json.loads(result.stdout)
    assert doc["changed"] is True
    assert doc["commit_url"].startswith(f"{hub.url}/alice/tiny/commit/")
    files = hub.files("alice/tiny")
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (
        files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    )
    # the config goes up as it is but for the base model, which names the card's Hub id
    pushed = json.loads(files["adapter_config.json"])
    local = json.loads((adapter / "adapter_config.json").read_text())
    assert pushed == {**local, "base_model_name_or_path": "org/tiny-llama"}
    card = files["README.md"].decode()
    assert "library_name: peft" in card
    assert "base_model: org/tiny-llama" in card
    assert "- mine" in card  # the local card's tags are kept
    assert "- remote-tag" in card  # and the repo's card's
    assert "pipeline_tag: text-generation" in card  # the adapter's task type is CAUSAL_LM
    assert "# My adapter" in card
    assert tree_digest(adapter) == before  # the source is never written to
    puts = [e for e in hub.log if e.method == "PUT"]
    assert bool(puts) == (mode == "lfs")  # LFS objects are PUT; regular files come inline
    commits = len(hub.commits)
    again = cli(env, "push", adapter, "alice/tiny", "--base-model", "org/tiny-llama")
    assert again.returncode == 0, again.stderr
    assert "no commit" in again.stdout
    assert len(hub.commits) == commits


def test_dry_run_uses_no_network(hub: FakeHub, adapter: Path, tmp_path: Path) -> None:
    env = client_env(hub, tmp_path / "hf")
    result = cli(env, "push", adapter, "alice/tiny", "--base-model", "org/m", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "adapter_model.safetensors" in result.stdout
    assert "optimizer.pt" not in result.stdout
    assert "library_name: peft" in result.stdout
    assert "dry run: nothing uploaded" in result.stdout
    assert hub.log == []


def test_card_needs_a_hub_base_model(hub: FakeHub, adapter: Path, tmp_path: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "my-local-base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = cli(client_env(hub, tmp_path / "hf"), "push", adapter, "alice/tiny")
    assert result.returncode == 1
    assert result.stderr.startswith("error: the adapter's base model is the local path")
    assert "hint: pass --base-model" in result.stderr
    assert hub.log == []


def test_push_chooses_adapters_and_leaves_trainer_checkpoints_out(
    hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    """A training run's folder: the adapter at the root, a second adapter `beta/`, and a Trainer
    checkpoint `checkpoint-10/` (an adapter with optimizer state beside it). Without --adapter
    the checkpoint is left out with a warning; --adapter chooses exactly what goes up."""
    shutil.copytree(adapter, adapter / "beta", ignore=shutil.ignore_patterns("optimizer.pt", "trainer_state.json", "README.md"))  # fmt: skip
    shutil.copytree(adapter, adapter / "checkpoint-10", ignore=shutil.ignore_patterns("README.md"))
    env = client_env(hub, tmp_path / "hf")

    def pushed(*args: str) -> tuple[list[str], str]:
        result = cli(env, "push", adapter, "alice/run", "--base-model", "org/m", *args, "--json")
        assert result.returncode == 0, result.stderr
        return [f["path"] for f in json.loads(result.stdout)["files"]], result.stderr

    paths, err = pushed("--dry-run")
    assert paths == ["adapter_config.json", "adapter_model.safetensors", "beta/adapter_config.json", "beta/adapter_model.safetensors", "README.md"]  # fmt: skip
    assert "left out 1 Trainer checkpoint folder(s) (checkpoint-10)" in err
    paths, _ = pushed("--dry-run", "--adapter", "beta")
    assert paths == ["beta/adapter_config.json", "beta/adapter_model.safetensors", "README.md"]
    paths, _ = pushed("--adapter", "checkpoint-10")  # a real push of the one chosen
    assert paths == ["checkpoint-10/adapter_config.json", "checkpoint-10/adapter_model.safetensors", "README.md"]  # fmt: skip
    assert sorted(hub.files("alice/run")) == sorted(paths)
    only = tmp_path / "only-checkpoints"
    shutil.copytree(adapter / "checkpoint-10", only / "checkpoint-10")
    refused = cli(env, "push", only, "alice/run", "--base-model", "org/m")
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"error: `{only}` holds only Trainer checkpoints")


def test_pushed_config_names_the_hub_base(hub: FakeHub, adapter: Path, tmp_path: Path) -> None:
    """A config naming a local base is uploaded naming --base-model (so that PEFT's AutoPeftModel
    finds the base from the repo), everything else as the file has it: key order too, where
    overlapping rank_pattern keys mean something (docs/peft-format.md, Trap T1), and a BOM is no
    problem; the local file stays as it is."""
    from adapterctl.format.config import LoraConfig

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "my-local-base")
    patterns = {"q_proj": 4, "layers.0.self_attn.q_proj": 4}  # unsorted: file order decides
    config["rank_pattern"] = patterns
    (adapter / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())
    before = tree_digest(adapter)
    env = client_env(hub, tmp_path / "hf")
    result = cli(env, "push", adapter, "alice/tiny", "--base-model", "org/m")
    assert result.returncode == 0, result.stderr
    assert "is uploaded naming base model `org/m`" in result.stderr
    raw = hub.files("alice/tiny")["adapter_config.json"]
    pushed = json.loads(raw)
    assert pushed == {**config, "base_model_name_or_path": "org/m"}
    assert list(pushed) == list(config)  # key order kept
    assert list(pushed["rank_pattern"]) == list(patterns)
    assert LoraConfig.from_json(raw).base_model_name_or_path == "org/m"
    assert tree_digest(adapter) == before


def test_push_refuses_adapters_naming_different_bases(
    hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    shutil.copytree(adapter, adapter / "beta", ignore=shutil.ignore_patterns("optimizer.pt", "trainer_state.json", "README.md"))  # fmt: skip
    for folder, base in ((adapter, "org/a"), (adapter / "beta", "org/b")):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))  # fmt: skip
    env = client_env(hub, tmp_path / "hf")
    result = cli(env, "push", adapter, "alice/tiny", "--dry-run")
    assert result.returncode == 1
    assert result.stderr.startswith("error: the adapters name different base models (org/a, org/b)")
    forced = cli(env, "push", adapter, "alice/tiny", "--dry-run", "--base-model", "org/a", "--json")
    assert forced.returncode == 0, forced.stderr
    assert "`beta/adapter_config.json` is uploaded naming base model `org/a`" in forced.stderr


@pytest.mark.parametrize("where", ["local", "remote", "remote-not-utf8"])
def test_a_card_that_cannot_be_updated_is_an_error_line(
    where: str, hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    broken = b"---\ntags: [unclosed\n---\n# card\n"
    if where == "remote-not-utf8":
        hub.put("alice/tiny", {"README.md": b"---\ntags:\n- caf\xe9\n---\n"})
    elif where == "local":
        (adapter / "README.md").write_bytes(broken)
    else:
        hub.put("alice/tiny", {"README.md": broken})
    result = cli(client_env(hub, tmp_path / "hf"), "push", adapter, "alice/tiny", "--base-model", "org/m")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    named = f"`{adapter / 'README.md'}`" if where == "local" else "the repo's README.md"
    assert errors[0].startswith(f"error: {named} is not a model card adapterctl can update"), errors
    assert errors[1].startswith("hint: "), errors
    assert (
        "adapter_config.json" not in hub.files("alice/tiny") if "alice/tiny" in hub.repos else True
    )


def test_push_never_overwrites_a_commit_that_landed_meanwhile(
    hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    hub.put("alice/tiny", {"notes.txt": b"v1"})
    hub.interject = (r"^POST /api/models/alice/tiny/preupload/", "alice/tiny", {"notes.txt": b"v2"})
    result = cli(client_env(hub, tmp_path / "hf"), "push", adapter, "alice/tiny", "--base-model", "org/m")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert errors[0].startswith("error: Hub repo `alice/tiny` changed while pushing"), errors
    assert errors[1:] == ["hint: push again"]
    assert hub.files("alice/tiny") == {"notes.txt": b"v2"}  # theirs, and nothing of ours
    again = cli(client_env(hub, tmp_path / "hf"), "push", adapter, "alice/tiny", "--base-model", "org/m")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert hub.files("alice/tiny")["notes.txt"] == b"v2"


@pytest.mark.parametrize("how", ["dropped", "dropped-once", "refused"])
def test_push_stops_when_the_repo_card_cannot_be_read(
    how: str, hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    """The repo's card holds tags to keep: if it cannot be fetched (the connection dropped while
    asking for it, or the server gone just before), nothing is committed: a push on would replace
    it without them."""
    hub.put("alice/tiny", {"README.md": b"---\ntags:\n- remote-tag\n---\n"})
    if how == "dropped":
        hub.die_on = r"/alice/tiny/resolve/[0-9a-f]{40}/README.md"  # at the parent commit
    elif how == "dropped-once":  # and the server goes on answering: the commit would succeed
        hub.drop_once = r"/alice/tiny/resolve/[0-9a-f]{40}/README.md"  # at the parent commit
    else:
        hub.stop_after = r"^GET /api/models/alice/tiny/revision/main"
    result = cli(client_env(hub, tmp_path / "hf"), "push", adapter, "alice/tiny", "--base-model", "org/m")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert errors[0].startswith("error: "), errors
    assert "lost the connection to the Hub" in errors[0] or "the Hub cannot be reached" in errors[0]
    assert "✓" not in result.stdout
    assert sorted(hub.files("alice/tiny")) == ["README.md"]


def test_peft_and_adapterctl_load_what_was_pushed(
    hub: FakeHub, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT's from_pretrained by repo id (subfolder too) computes what the local files compute;
    then, with the server gone and HF_HUB_OFFLINE set, AdapterModel loads the subfolder from the
    warm cache (PEFT cannot: docs/peft-format.md, Trap T6)."""
    multi = peft_adapters["multi"]
    env = client_env(hub, tmp_path / "hf")
    assert cli(env, "push", multi, "alice/multi", "--base-model", "org/tiny-llama").returncode == 0
    code = f"""
import json, sys, torch, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(ROOT)!r})
from tests.fixtures import tiny_llama
x = torch.arange(12).reshape(2, 6) % 64
def logits(m):
    with torch.no_grad():
        return m(input_ids=x).logits
out = {{}}
if sys.argv[-1] == "online":
    from peft import PeftModel
    out["peft_root"] = logits(PeftModel.from_pretrained(tiny_llama(), "alice/multi")).tolist()
    out["peft_beta"] = logits(PeftModel.from_pretrained(tiny_llama(), "alice/multi", subfolder="beta")).tolist()
from adapterctl import AdapterModel
out["ours_beta"] = logits(AdapterModel.from_pretrained(tiny_llama(), "alice/multi", subfolder="beta")).tolist()
out["ours_root"] = logits(AdapterModel.from_pretrained(tiny_llama(), "alice/multi")).tolist()
print(json.dumps(out))
"""
    online = subprocess.run([sys.executable, "-c", code, "online"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)  # fmt: skip
    assert online.returncode == 0, online.stderr[-3000:]
    got = json.loads(online.stdout.splitlines()[-1])
    import torch

    from tests.fixtures import tiny_llama

    def local(sub: str) -> Any:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(tiny_llama(), str(multi / sub) if sub else str(multi))
        with torch.no_grad():
            return model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits

    root, beta = local(""), local("beta")
    for key, ref in (
        ("peft_root", root),
        ("ours_root", root),
        ("peft_beta", beta),
        ("ours_beta", beta),
    ):
        assert (torch.tensor(got[key]) - ref).abs().max().item() <= 1e-5, key
    hub.stop()
    offline = subprocess.run([sys.executable, "-c", code, "offline"], capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=ROOT, timeout=300, check=False)  # fmt: skip
    assert offline.returncode == 0, offline.stderr[-3000:]
    got = json.loads(offline.stdout.splitlines()[-1])
    assert (torch.tensor(got["ours_beta"]) - beta).abs().max().item() <= 1e-5


def test_remote_inspect_reads_headers_only(hub: FakeHub, tmp_path: Path) -> None:
    """Two adapters of 1 MiB each (more than the client's first 100 kB range): only ranges are
    served, and far less than the weights."""
    from tests.helpers import Q, V, lora_tensors, write_adapter

    big = {
        **lora_tensors(Q, r=16, d_in=4096, d_out=4096),
        **lora_tensors(V, r=16, d_in=4096, d_out=4096),
    }
    multi = write_adapter(
        tmp_path / "multi", big, {"target_modules": ["q_proj", "v_proj"], "r": 16}
    )
    write_adapter(multi / "beta", big, {"target_modules": ["q_proj", "v_proj"], "r": 16})
    env = client_env(hub, tmp_path / "hf")
    assert cli(env, "push", multi, "alice/multi", "--base-model", "org/m").returncode == 0
    hub.log.clear()
    remote = cli(env, "inspect", "alice/multi", "--json")
    assert remote.returncode == 0, remote.stderr
    local = cli(env, "inspect", multi, "--json")
    r, lo = json.loads(remote.stdout), json.loads(local.stdout)
    assert r["source"] == "hf://alice/multi"
    assert [a["name"] for a in r["adapters"]] == [a["name"] for a in lo["adapters"]]
    for a, b in zip(r["adapters"], lo["adapters"], strict=True):
        assert a["tensors"] == b["tensors"]
        assert a["modules"] == b["modules"]
        assert a["config"] == {**b["config"], "base_model_name_or_path": "org/m"}  # as pushed
    weights = [e for e in hub.log if e.path.endswith(".safetensors")]
    assert weights, "no header reads logged"
    sizes = {p: len(d) for p, d in hub.files("alice/multi").items()}
    for e in weights:  # only ranges, and never a whole file
        assert e.range is not None, e
        assert e.status == 206, e
    for name in ("adapter_model.safetensors", "beta/adapter_model.safetensors"):
        sent = sum(e.sent for e in weights if e.path.endswith(f"/resolve/main/{name}"))
        assert 0 < sent <= 100_001 < sizes[name] // 10, (name, sent, sizes[name])
    one = cli(env, "inspect", "alice/multi", "--adapter", "beta", "--check")
    assert one.returncode == 0, one.stderr
    assert "hf://alice/multi/beta" in one.stdout


def test_private_repos_branches_and_pull_requests(
    hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    env = client_env(hub, tmp_path / "hf")
    push = ["push", adapter, "alice/secret", "--base-model", "org/m"]
    assert cli(env, *push, "--private").returncode == 0
    assert hub.repos["alice/secret"].private
    assert cli(env, "inspect", "alice/secret").returncode == 0
    anonymous = cli(client_env(hub, tmp_path / "hf2", token=None), "inspect", "alice/secret")
    hidden = "has no repo `alice/secret` (or it is private and the token given cannot see it)"
    assert anonymous.returncode == 1
    assert hidden in anonymous.stderr.splitlines()[0], anonymous.stderr
    bob = cli(client_env(hub, tmp_path / "hf3", token="tok-bob-secret"), "inspect", "alice/secret")
    assert bob.returncode == 1
    assert hidden in bob.stderr.splitlines()[0], bob.stderr
    # a branch
    (adapter / "adapter_config.json").write_text(
        (adapter / "adapter_config.json").read_text().replace('"lora_dropout": 0.0', '"lora_dropout": 0.1')
    )  # fmt: skip
    dev = cli(env, *push, "--revision", "dev", "--json")
    assert dev.returncode == 0, dev.stderr
    assert json.loads(dev.stdout)["revision"] == "dev"
    assert b"0.1" in hub.files("alice/secret", "dev")["adapter_config.json"]
    assert b"0.1" not in hub.files("alice/secret", "main")["adapter_config.json"]
    fetched = cli(env, "select", "alice/secret", tmp_path / "dev-copy", "--adapter", "default", "--revision", "dev")  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert b"0.1" in (tmp_path / "dev-copy" / "adapter_config.json").read_bytes()
    # a pull request against main
    (adapter / "adapter_config.json").write_text(
        (adapter / "adapter_config.json").read_text().replace('"lora_dropout": 0.1', '"lora_dropout": 0.2')
    )  # fmt: skip
    main_before = hub.repos["alice/secret"].branches["main"]
    pr = cli(env, *push, "--create-pr", "--commit-message", "try dropout 0.2")
    assert pr.returncode == 0, pr.stderr
    assert f"pull request {hub.url}/alice/secret/discussions/1" in pr.stdout
    assert b"0.2" in hub.files("alice/secret", "refs/pr/1")["adapter_config.json"]
    assert hub.repos["alice/secret"].branches["main"] == main_before
    assert hub.commits[hub.repos["alice/secret"].branches["refs/pr/1"]].message == "try dropout 0.2"


@pytest.mark.parametrize(
    "token", [None, "tok-wrong", "tok-bob-secret"], ids=["missing", "wrong", "not-owner"]
)
def test_authentication_failures(
    token: str | None, hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    env = client_env(hub, tmp_path / "hf", token=token)
    result = cli(env, "push", adapter, "alice/tiny", "--base-model", "org/m")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "error: authentication failed for alice/tiny"
    assert result.stderr.splitlines()[1].startswith("hint: pass --token")
    assert "Traceback" not in result.stderr
    if token:
        assert token not in result.stdout + result.stderr
    assert "alice/tiny" not in hub.repos or len(hub.files("alice/tiny")) == 0
    # --token on the command line beats HF_TOKEN, and is never echoed
    ok = cli(
        env, "push", adapter, "alice/tiny", "--base-model", "org/m", "--token", ALICE, "--json"
    )
    assert ok.returncode == 0, ok.stderr
    assert ALICE not in ok.stdout + ok.stderr


def test_unknown_repo_revision_and_file(hub: FakeHub, adapter: Path, tmp_path: Path) -> None:
    env = client_env(hub, tmp_path / "hf")
    assert cli(env, "push", adapter, "alice/tiny", "--base-model", "org/m").returncode == 0
    cases = [
        (["inspect", "alice/nope"], "has no repo `alice/nope`"),
        (["inspect", "alice/tiny", "--revision", "nope"], "has no revision `nope`"),
        (["select", "alice/tiny", tmp_path / "o", "--adapter", "default", "--revision", "nope"], "has no revision `nope`"),
        (["inspect", "alice/tiny", "--subfolder", "nope"], "has no `adapter_config.json` in `nope`"),
        (["convert", "alice/tiny", tmp_path / "o", "--dtype", "bfloat16", "--subfolder", "nope"], "has no adapter in `nope`"),
    ]  # fmt: skip
    for args, message in cases:
        result = cli(env, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith("error: "), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["lfs-put", "commit"])
def test_server_dying_mid_upload_is_never_a_success(
    where: str, hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    env = client_env(hub, tmp_path / "hf", xet=False)
    hub.die_on = (
        r"^PUT /lfs-upload/" if where == "lfs-put" else r"^POST /api/models/alice/tiny/commit/"
    )
    result = cli(env, "push", adapter, "alice/tiny", "--base-model", "org/m")
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert errors[0].startswith(
        ("error: lost the connection to the Hub", "error: upload to `alice/tiny` failed")
    ), errors
    assert "✓" not in result.stdout
    assert "Traceback" not in result.stderr
    assert hub.files("alice/tiny") == {}


def test_offline_from_a_warm_cache(
    hub: FakeHub, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    env = client_env(hub, tmp_path / "hf")
    assert (
        cli(env, "push", peft_adapters["multi"], "alice/multi", "--base-model", "org/m").returncode
        == 0
    )
    warm = cli(
        env,
        "convert",
        "alice/multi",
        tmp_path / "beta16",
        "--subfolder",
        "beta",
        "--dtype",
        "float16",
    )
    assert warm.returncode == 0, warm.stderr
    every = ["--adapter", "default", "--adapter", "alpha", "--adapter", "beta"]
    assert cli(env, "select", "alice/multi", tmp_path / "all", *every).returncode == 0
    hub.stop()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    again = cli(
        offline,
        "convert",
        "alice/multi",
        tmp_path / "again",
        "--subfolder",
        "beta",
        "--dtype",
        "float16",
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "beta16" / "adapter_model.safetensors"
    ).read_bytes()
    inspect = cli(offline, "inspect", "alice/multi", "--json")
    assert inspect.returncode == 0, inspect.stderr
    assert {a["name"] for a in json.loads(inspect.stdout)["adapters"]} == {
        "default",
        "alpha",
        "beta",
    }
    cold = cli(offline, "inspect", "alice/never-fetched")
    assert cold.returncode == 1
    assert "not in the local cache and HF_HUB_OFFLINE is set" in cold.stderr


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    from tests.fixtures import tiny_llama

    base = tmp_path / "base"
    tiny_llama().save_pretrained(str(base))
    return base


def test_load_and_save_with_a_hub_base(
    hub: FakeHub, base_dir: Path, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    hub.put_folder("org/tiny-llama", base_dir)
    hub.put_folder("alice/tiny", peft_adapters["llama_basic"])
    env = client_env(hub, tmp_path / "hf")
    loaded = cli(env, "load", "org/tiny-llama", "alice/tiny", "--device", "cpu", "--json")
    assert loaded.returncode == 0, loaded.stderr
    doc = json.loads(loaded.stdout)
    assert doc["adapter"]["missing_keys"] == []
    assert doc["adapter"]["unexpected_keys"] == []
    saved = cli(env, "save", "org/tiny-llama", tmp_path / "new", "--r", "2", "--target", "q_proj")
    assert saved.returncode == 0, saved.stderr
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"  # the id, not the cache folder
    assert "base_model: org/tiny-llama" in (tmp_path / "new" / "README.md").read_text()


def test_convert_from_hub_pairs_and_base(hub: FakeHub, base_dir: Path, tmp_path: Path) -> None:
    from tests.fixtures import residual_pair

    _, init, trained, _ = residual_pair(
        tmp_path / "pair", "pissa", r=4, target_modules=["q_proj", "v_proj"]
    )
    hub.put_folder("org/tiny-llama", base_dir)
    hub.put_folder("alice/init", init)
    hub.put_folder("alice/trained", trained)
    env = client_env(hub, tmp_path / "hf")
    remote = cli(
        env, "convert", "alice/trained", tmp_path / "r1", "--initial", "alice/init", "--json"
    )
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["source"] == "alice/trained"
    local = cli(env, "convert", trained, tmp_path / "l1", "--initial", init)
    assert local.returncode == 0, local.stderr
    name = "adapter_model.safetensors"
    assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "l1" / name).read_bytes()
    remote = cli(env, "convert", "alice/trained", tmp_path / "r2", "--base", "org/tiny-llama")
    local = cli(env, "convert", trained, tmp_path / "l2", "--base", base_dir)
    assert remote.returncode == 0, remote.stderr
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "r2" / name).read_bytes() == (tmp_path / "l2" / name).read_bytes()


def test_push_shows_upload_bars_on_a_terminal(hub: FakeHub, tmp_path: Path) -> None:
    """On a terminal, a large file's upload shows huggingface_hub's progress bar on stderr, drawn
    as it is (no spinner of ours over it, which would capture and mangle it)."""
    import fcntl
    import pty
    import struct
    import termios

    from tests.helpers import Q, lora_tensors, write_adapter

    big = write_adapter(tmp_path / "big", lora_tensors(Q, r=256, d_in=8192, d_out=8192), {"r": 256})
    env = client_env(hub, tmp_path / "hf")
    del env["HF_HUB_DISABLE_PROGRESS_BARS"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterctl", "push", str(big), "alice/big", "--base-model", "org/m"],
        stdin=follower, stdout=follower, stderr=follower, env=env, cwd=ROOT,
    )  # fmt: skip
    os.close(follower)
    import select
    import time

    seen = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=30) == 0, seen.decode(errors="replace")
    finally:
        proc.kill()
        os.close(leader)
    text = seen.decode(errors="replace")
    assert any(e.method == "PUT" for e in hub.log)  # the weights went up as an LFS object
    assert "adapter_model.safetensors: 100%|" in text, text
    assert "16.8M/16.8M" in text, text
    assert "\x1b[" not in text.split("adapter_model.safetensors: 100%|", 1)[1].split("\n", 1)[0]


@pytest.mark.parametrize(
    ("action", "first_line"),
    [
        ("read", "`alice/x` is not a local path, and the Hub at"),
        ("write to", "authentication failed for alice/x"),
    ],
)
def test_repo_not_found_on_a_write_is_an_authentication_failure(
    action: str, first_line: str
) -> None:
    """On https URLs the client turns the Hub's 401 for a repo into RepositoryNotFoundError
    (a rule the http:// test server never triggers): for a write, that is a token problem."""
    import httpx2
    from huggingface_hub import errors

    from adapterctl.errors import AdapterctlError
    from adapterctl.ops.hub import hub_errors

    response = httpx2.Response(
        401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    )
    with pytest.raises(AdapterctlError) as info, hub_errors("alice/x", action=action):
        raise errors.RepositoryNotFoundError("401 Client Error", response=response)
    assert info.value.message.startswith(first_line)


def test_a_hub_snapshots_card_links_into_its_blobs_and_is_read(
    hub: FakeHub, adapter: Path, tmp_path: Path
) -> None:
    """huggingface_hub's cache keeps README.md in snapshots/REV as a link to ../../blobs/HASH:
    that link leaves the adapter directory but stays in the repo's cache folder, so it is read."""
    (adapter / "README.md").write_text("# Snapshot card\n")
    hub.put_folder("alice/carded", adapter)
    env = client_env(hub, tmp_path / "hf")
    result = cli(env, "convert", "alice/carded", tmp_path / "out", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    (cached,) = (tmp_path / "hf").rglob("snapshots/*/README.md")
    assert cached.is_symlink()
    assert "/blobs/" in os.readlink(cached)
    assert "# Snapshot card" in (tmp_path / "out" / "README.md").read_text()
