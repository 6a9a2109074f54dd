"""llama.cpp's own LoRA converter, as the oracle of the `llama.cpp` engine's `loads` verdict.

The converter (`convert_lora_to_gguf.py`, the `conversion/` package it reuses from
`convert_hf_to_gguf.py`, and `gguf-py`) is taken from llama-cpp-python's sdist, which vendors
llama.cpp (0.3.36 vendors llama.cpp 0c1e570). Only those files are extracted, outside the
repository, under `$ADAPTERCTL_TEST_CACHE` (default `~/.cache/adapterctl-test`), as
`llama.cpp-<sdist version>`. Build it (one `pip download` of the 76 MB sdist, or a copy already
on disk) with

    .venv/bin/python -m tests.llamacpp_env [--sdist PATH]

The converter runs under the test environment's own Python: it needs torch, transformers,
safetensors, numpy, pyyaml, tqdm and requests, all of which the test extras install. The slow
oracle tests skip, naming this command, when the folder is missing. `python
tests/llamacpp_env.py read FILE.gguf` (standard library at module level) prints a written GGUF's
adapter keys and tensor shapes as JSON, read with the extracted gguf-py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"  # .git/modules/vendor/llama.cpp/HEAD in that sdist
#: what is extracted, relative to vendor/llama.cpp
FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


def cache_root() -> Path:
    root = os.environ.get("ADAPTERCTL_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adapterctl-test"


def folder() -> Path:
    return cache_root() / f"llama.cpp-{VERSION}"


def ready() -> bool:
    """The converter is extracted (the stamp is written last)."""
    return (folder() / ".complete").is_file()


def _download(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, "--dest", str(into)], check=True)
    (found,) = into.glob("llama_cpp_python-*.tar.gz")
    return found


def build(sdist: Path | None = None) -> Path:
    """Extract the converter files from `sdist` (downloaded when not given)."""
    out = folder()
    if ready():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        source = sdist or _download(Path(tmp))
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                rel = member.name.removeprefix(prefix)
                if member.name == rel or not member.isfile():
                    continue
                if any(rel == f or (f.endswith("/") and rel.startswith(f)) for f in FILES):
                    data = tar.extractfile(member)
                    assert data is not None
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data.read())
    (out / ".complete").write_text(f"{SDIST} (llama.cpp {LLAMA_CPP_COMMIT})\n")
    return out


def convert(adapter: Path, base: Path, outfile: Path) -> subprocess.CompletedProcess[str]:
    """Run the converter on `adapter` with `--base`; its exit status and output."""
    script = folder() / "convert_lora_to_gguf.py"
    cmd = [sys.executable, str(script), "--base", str(base), "--outfile", str(outfile)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the extracted gguf-py, not an installed one
    return subprocess.run(
        [*cmd, str(adapter)], capture_output=True, text=True, env=env, cwd=folder(), timeout=300
    )


def read(path: str) -> None:
    """Print the GGUF's adapter keys and {tensor name: shape} as JSON (run in the env folder)."""
    import json

    sys.path.insert(0, str(folder() / "gguf-py"))
    from gguf import GGUFReader  # type: ignore[import-not-found]

    reader = GGUFReader(path)
    keys = {}
    for name, fld in reader.fields.items():
        if name.startswith("adapter."):
            value = fld.contents()
            keys[name] = value if isinstance(value, (int, float, str, list)) else str(value)
    tensors = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    print(json.dumps({"keys": keys, "tensors": tensors}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["read"]:
        read(sys.argv[2])
    else:
        given = sys.argv[sys.argv.index("--sdist") + 1] if "--sdist" in sys.argv else None
        print(f"llama.cpp converter: {build(Path(given) if given else None)}", flush=True)
