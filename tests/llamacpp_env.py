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
oracle tests skip, naming this command, when the folder is missing. `run_many` runs the
converter on many adapters in one subprocess (`python tests/llamacpp_env.py convert-many
JOB.json`, standard library at module level) and reads back each GGUF it writes with the
extracted gguf-py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

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


def convert_many(job_path: str) -> None:
    """Run the converter on each (adapter, base, outfile) of the job in this one process (the
    imports of torch and transformers once, not per adapter); writes {adapter: {"rc": exit
    status, "errors": its ERROR log lines and exception, "gguf": what it wrote (`_summary`)},
    ...] (in the job's order) to the job's output."""
    import json
    import logging
    import runpy

    job = json.loads(Path(job_path).read_text())
    script = str(folder() / "convert_lora_to_gguf.py")
    sys.path.insert(0, str(folder()))
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger().addHandler(Collect())
    result = []
    for adapter, base, outfile in job["runs"]:
        errors.clear()
        sys.argv = [script, "--base", base, "--outfile", outfile, adapter]
        rc = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # the converter refuses by raising, too
            rc = 1
            errors.append(f"{type(e).__name__}: {e}")
        done: dict[str, Any] = {"rc": rc, "errors": list(errors)}
        if rc == 0:
            done["gguf"] = _summary(outfile)
        result.append(done)
    Path(job["output"]).write_text(json.dumps(result))


def run_many(runs: list[tuple[Path, Path, Path]], work: Path) -> list[dict[str, Any]]:
    """`convert_many` in a subprocess: per run, {"rc": exit status, "errors": [...]}."""
    import json

    job = work / "llamacpp-job.json"
    out = work / "llamacpp-result.json"
    job.write_text(json.dumps({"runs": [[str(p) for p in r] for r in runs], "output": str(out)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the extracted gguf-py, not an installed one
    subprocess.run(
        [sys.executable, __file__, "convert-many", str(job)],
        check=True, capture_output=True, env=env, cwd=folder(), timeout=600,
    )  # fmt: skip
    result: list[dict[str, Any]] = json.loads(out.read_text())
    return result


def _summary(path: str) -> dict[str, Any]:
    """A written GGUF's adapter keys and {tensor name: shape (ggml order: ne0 first)}."""
    from gguf import GGUFReader  # type: ignore[import-not-found]  # the extracted gguf-py

    reader = GGUFReader(path)
    keys = {n: f.contents() for n, f in reader.fields.items() if n.startswith("adapter.")}
    tensors = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    return {"keys": keys, "tensors": tensors}


if __name__ == "__main__":
    if sys.argv[1:2] == ["convert-many"]:
        convert_many(sys.argv[2])
    else:
        given = sys.argv[sys.argv.index("--sdist") + 1] if "--sdist" in sys.argv else None
        print(f"llama.cpp converter: {build(Path(given) if given else None)}", flush=True)
