"""What the benchmark scripts share: targets and the versions measured."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# every benchmark runs offline (set at import, before anything from Hugging Face is imported,
# here or in any child): nothing it measures may touch the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

OUT = Path(__file__).resolve().parent / "out"
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

#: The 170M-parameter Llama both benchmarks build (random init).
LLAMA_170M = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
}

DISTRIBUTIONS = ("adapterctl", "peft", "safetensors", "torch", "transformers", "typer", "rich")


@dataclass
class Target:
    """One performance target: a measured value and the limit it must not exceed."""

    name: str
    value: float
    unit: str
    limit: float
    detail: str

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    def line(self, width: int = 36, digits: int = 3) -> str:
        """One report line: name, value against the limit, the verdict and the detail."""
        verdict = "met" if self.met else "NOT MET"
        value = f"{self.value:.{digits}f}{self.unit}"
        return (
            f"{self.name:{width}} {value:>10}  <= {self.limit}{self.unit}  {verdict}  {self.detail}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 6),
            "unit": self.unit,
            "target_max": self.limit,
            "met": self.met,
            "detail": self.detail,
        }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def child_env(bytecode_cache: bool = True) -> dict[str, str]:
    """The measured commands' environment.

    With `bytecode_cache`, every child reads and writes .pyc files under benchmarks/out/pycache
    (PYTHONPYCACHEPREFIX), as an installed package would have them, even where
    PYTHONDONTWRITEBYTECODE=1 is set: an editable checkout has no .pyc for adapterctl otherwise,
    and compiling its modules on every run would be counted against it (site-packages ship theirs).
    """
    env = dict(os.environ)
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(OUT / "pycache")
    return env


def run_measured(
    argv: list[str], env: dict[str, str], *, capture: bool = False
) -> tuple[float, float, str]:
    """Run `argv` in a fresh process; returns (wall seconds, peak RSS MiB, stdout if `capture`).

    Peak RSS comes from GNU time (`%M`, the child's own ru_maxrss): a Python parent would leak its
    own high-water mark into the child's ru_maxrss through the vfork+exec subprocess uses.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        rss_file, out_file, err_file = (Path(d) / n for n in ("rss", "stdout", "stderr"))
        cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv] if GNU_TIME else argv
        with open(err_file, "wb") as err, open(out_file if capture else os.devnull, "wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            stderr = err_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(argv[:3])} exited {code}:\n{stderr}")
        # Without GNU time, ru_maxrss includes this process's own high-water mark (~10 MiB).
        peak_kib = int(rss_file.read_text().split()[-1]) if GNU_TIME else usage.ru_maxrss
        stdout = out_file.read_text() if capture else ""
    return wall, peak_kib / 1024, stdout


#: The 170M Llama's weights, built once (random init, seed 0) for `save` and `convert`.
LLAMA_170M_DIR = OUT / "llama-170m"


def build_llama_170m() -> Path:
    """Write the 170M Llama to LLAMA_170M_DIR unless it is there already."""
    if not (LLAMA_170M_DIR / "config.json").is_file():
        code = (
            "import torch, sys\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "torch.manual_seed(0)\n"
            f"LlamaForCausalLM(LlamaConfig(**{LLAMA_170M!r})).save_pretrained(sys.argv[1])\n"
        )
        run_measured([sys.executable, "-c", code, str(LLAMA_170M_DIR)], child_env())
    return LLAMA_170M_DIR


def medians(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per engine, the median of each measured quantity over its runs."""
    return {e: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for e, rs in runs.items()}


def report_side_by_side(
    name: str,
    medians: dict[str, dict[str, float]],
    goals: list[Target],
    runs: dict[str, list[dict[str, float]]],
    **extra: Any,
) -> Path:
    """Print adapterctl's and PEFT's medians and the targets; write OUT/<name>-results.json."""
    a, p = medians["adapterctl"], medians["peft"]
    print(f"\n{'':28}{'adapterctl':>12}{'PEFT':>12}")
    for key in a:
        print(f"{key:28}{a[key]:12.3f}{p[key]:12.3f}")
    print()
    for g in goals:
        print(g.line())
    path = OUT / f"{name}-results.json"
    payload = {"schema_version": 1, "runs": runs, "medians": medians, **extra}
    payload |= {"versions": versions(), "targets": [g.to_dict() for g in goals]}
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")
    return path
