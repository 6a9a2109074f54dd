"""Re-check the engine rule tables of `adapterctl/ops/engines/` against the engines' released code.

vLLM: downloads the sdist of the last patch of every minor release from 0.4 on (PyPI's simple
index; 7-50 MB each, about 0.9 GB in all), extracts only `vllm/lora/*`, `vllm/config.py` and
`vllm/config/lora.py`, reads from each the facts the rules encode (the `--max-lora-rank`
choices, the extra vocabulary, which features `PEFTHelper` refuses, whether the scale follows
rank_pattern/alpha_pattern, which tensor names load, whether PEFT's embedding copies are skipped)
and compares them with what the `vllm` table says for that release:

    python -m tests.engine_sources vllm DIR      # DIR: where the sdists are extracted (reused)

llama.cpp: from a folder holding the converter (`python -m tests.llamacpp_env` extracts it),
compares `TEXT_MODEL_MAP` of `conversion/__init__.py` with `llamacpp_architectures.py`:

    python -m tests.engine_sources llama.cpp CONVERTER_DIR

Each prints one line per mismatch and exits 1 if there is any. Network: PyPI only.
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from adapterctl.ops.engines import TABLES
from adapterctl.ops.engines.llamacpp_architectures import LLAMACPP_ARCHITECTURES
from adapterctl.ops.engines.vllm import _extra_vocab, max_lora_ranks

INDEX = "https://pypi.org/simple/vllm/"
_SDIST = re.compile(r"vllm-(\d+)\.(\d+)\.(\d+)\.tar\.gz$")


def _sdists() -> dict[str, tuple[str, str]]:
    """Minor release -> (file name, URL) of its last patch's sdist (0.4 on)."""
    request = urllib.request.Request(
        INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    best: dict[str, tuple[int, str, str]] = {}
    for f in files:
        m = _SDIST.match(f["filename"])
        if not m or f.get("yanked") or (int(m[1]), int(m[2])) < (0, 4):
            continue
        minor = f"{m[1]}.{m[2]}"
        if minor not in best or int(m[3]) > best[minor][0]:
            best[minor] = (int(m[3]), f["filename"], f["url"])
    return {k: (name, url) for k, (_, name, url) in best.items()}


def _wanted(name: str, top: str) -> bool:
    rel = name.removeprefix(f"{top}/")
    return rel.startswith("vllm/lora/") or rel in ("vllm/config.py", "vllm/config/lora.py")


def fetch(root: Path) -> dict[str, Path]:
    """Minor release -> its extracted folder under `root` (downloaded where missing)."""
    found = {}
    for minor, (name, url) in sorted(_sdists().items()):
        top = name.removesuffix(".tar.gz")
        folder = root / top
        if not (folder / "vllm").is_dir():
            with urllib.request.urlopen(url, timeout=600) as response:
                data = io.BytesIO(response.read())
            with tarfile.open(fileobj=data) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name, top)]
                tar.extractall(root, members=members, filter="data")
        found[minor] = folder
    return found


def _text(folder: Path, *parts: str) -> str:
    return "\n".join(
        p.read_text(errors="replace") for part in parts for p in sorted(folder.glob(part))
    )


def vllm_facts(folder: Path) -> dict[str, object]:
    """What one release's code does, for each thing a rule encodes."""
    config = _text(folder, "vllm/config.py", "vllm/config/lora.py")
    helper = _text(folder, "vllm/lora/peft_helper.py")
    utils = _text(folder, "vllm/lora/utils.py")
    lora = _text(folder, "vllm/lora/*.py", "vllm/lora/layers/*.py", "vllm/lora/layers.py")
    ranks = re.search(
        r"possible_max_ranks = \(([^)]*)\)|MaxLoRARanks = Literal\[([^\]]*)\]", config
    )
    return {
        "max_lora_ranks": tuple(int(x) for x in (ranks[1] or ranks[2]).split(",")) if ranks else (),
        "extra_vocab": "lora_config.lora_extra_vocab_size" in lora,
        "dora_refused": "not yet support DoRA" in helper,
        "rslora_refused": "not yet support RSLoRA" in helper,
        "modules_to_save_refused": "modules_to_save being" in helper,
        "heads_allowed": '"classifier", "score"' in helper,
        "bias_refused": "Adapter bias is not supported" in helper,
        "bias_needs_flag": "without --enable-lora-bias" in lora,
        "features_refused": "Activated LoRA" in helper,
        "patterns_honoured": "get_rank_and_scaling" in helper,
        "rslora_read": "use_rslora" in helper,
        "copies_skipped": re.search(r"if is_base_embed+ing_weights\(", lora) is not None,
        "bias_names_load": 'parts[-1] == "bias":' in utils or "parts[-1] == 'bias':" in utils,
    }


def _applies(rule_id: str, version: str, first: str | None = None) -> bool:
    return any(
        r.id == rule_id
        and r.applies(version)
        and (first is None or (r.releases or ("",))[0] == first)
        for r in TABLES["vllm"].rules
    )


#: fact -> what the vllm table says about it for a release
EXPECTED: dict[str, Callable[[str], object]] = {
    "max_lora_ranks": max_lora_ranks,
    "extra_vocab": lambda v: _extra_vocab(v) > 0,
    "dora_refused": lambda v: _applies("vllm.dora", v),
    "rslora_refused": lambda v: _applies("vllm.rslora", v),
    "modules_to_save_refused": lambda v: _applies("vllm.modules_to_save", v),
    "heads_allowed": lambda v: _applies("vllm.modules_to_save", v, first="0.31"),
    "bias_refused": lambda v: _applies("vllm.bias", v, first="0.11"),
    "bias_needs_flag": lambda v: _applies("vllm.bias", v, first="0.6"),
    "features_refused": lambda v: _applies("vllm.features", v),
    "patterns_honoured": lambda v: not _applies("vllm.patterns", v),
    "rslora_read": lambda v: not _applies("vllm.patterns", v, first="0.4"),
    "copies_skipped": lambda v: _applies("vllm.resized_embeddings", v),
    "bias_names_load": lambda v: _applies("vllm.bias", v, first="0.6"),
}


def check_vllm(root: Path) -> list[str]:
    wrong = []
    releases = TABLES["vllm"].releases
    for minor, folder in fetch(root).items():
        if minor not in releases:
            wrong.append(f"vllm {minor}: released, not covered by the table ({releases[-1]} last)")
            continue
        facts = vllm_facts(folder)
        for fact, value in facts.items():
            expected = EXPECTED[fact](minor)
            if value != expected:
                wrong.append(
                    f"vllm {minor} ({folder.name}): {fact} is {value!r}, table says {expected!r}"
                )
    return wrong


def check_llamacpp(folder: Path) -> list[str]:
    tree = ast.parse((folder / "conversion" / "__init__.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if getattr(target, "id", None) == "TEXT_MODEL_MAP" and node.value is not None:
                names = set(ast.literal_eval(node.value))
    return [
        f"llama.cpp maps {n}, the table does not" for n in sorted(names - LLAMACPP_ARCHITECTURES)
    ] + [
        f"the table lists {n}, llama.cpp does not map it"
        for n in sorted(LLAMACPP_ARCHITECTURES - names)
    ]


if __name__ == "__main__":
    engine, where = sys.argv[1], Path(sys.argv[2])
    where.mkdir(parents=True, exist_ok=True)
    problems = check_vllm(where) if engine == "vllm" else check_llamacpp(where)
    print("\n".join(problems) or f"{engine}: the table matches the sources")
    sys.exit(1 if problems else 0)
