"""The one benchmark harness: build-once cached fixtures, measured children, interleaved rounds,
medians, the side-by-side ratio table, targets, and the results file.

Every benchmark is a module of this package, run from the repository root as
`python -m benchmarks.NAME` (or through `make bench*`). Whatever it measures runs in a fresh child
interpreter: an adapterctl command, or a function of the benchmark module called through
`python -m benchmarks.child MODULE:FUNCTION` (`run_child`). Peak RSS is GNU time's `%M`, the
child's own ru_maxrss: a Python parent's `os.wait4` would carry the parent's high-water mark into
the child's through the vfork+exec subprocess uses.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

# every benchmark runs offline (set at import, before anything from Hugging Face is imported,
# here or in any child): nothing it measures may touch the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"  # git-ignored: fixtures, bytecode and results
PYTHON = sys.executable
ADAPTERCTL = str(Path(PYTHON).with_name("adapterctl"))
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

#: The 170M-parameter Llama the benchmarks build on (random init).
LLAMA_170M = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
}
#: the same Llama at toy sizes, for every benchmark's `--quick` smoke run
TOY_LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 4000,
}
LLAMA_170M_DIR = OUT / "llama-170m"  # its weights, built once by `llama_170m()`
#: Llama's seven linear layers.
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DISTRIBUTIONS = ("adapterctl", "peft", "safetensors", "torch", "transformers", "typer", "rich")

K = TypeVar("K")
Figures = dict[str, float]

# -- children ------------------------------------------------------------------------------------


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
    """Run `argv` in a fresh process, in the repository root; returns (wall seconds, peak RSS
    MiB, stdout if `capture`). A child that fails stops the benchmark with its exit code and
    the end of its stderr."""
    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        rss_file, out_file, err_file = (Path(d) / n for n in ("rss", "stdout", "stderr"))
        cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv] if GNU_TIME else argv
        with open(err_file, "wb") as err, open(out_file if capture else os.devnull, "wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=ROOT
            )
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            stderr = err_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(argv[:4])} exited {code}:\n{stderr}")
        # Without GNU time, ru_maxrss includes this process's own high-water mark (~10 MiB).
        peak_kib = int(rss_file.read_text().split()[-1]) if GNU_TIME else usage.ru_maxrss
        stdout = out_file.read_text() if capture else ""
    return wall, peak_kib / 1024, stdout


def child_argv(function: Callable[..., Any], *args: str) -> list[str]:
    """The argv that calls `function(*args)` of a benchmarks module in a fresh interpreter."""
    module = function.__module__
    if module == "__main__":  # the benchmark run as `python -m benchmarks.NAME`
        module = sys.modules["__main__"].__spec__.name  # type: ignore[union-attr]
    return [PYTHON, "-m", "benchmarks.child", f"{module}:{function.__name__}", *args]


def run_child(
    function: Callable[..., Any], *args: str, env: dict[str, str]
) -> tuple[Any, float, float]:
    """`function(*args)` in a measured child: (what it returned, wall seconds, peak RSS MiB)."""
    wall, peak, stdout = run_measured(child_argv(function, *args), env, capture=True)
    lines = stdout.splitlines()
    return (json.loads(lines[-1]) if lines else None), wall, peak


# -- fixtures ------------------------------------------------------------------------------------


def cached(
    name: str,
    spec: Mapping[str, Any],
    build: Callable[..., Mapping[str, Any] | None],
    *args: str,
    rebuild: bool = False,
    root: Path = OUT,
) -> tuple[Path, dict[str, Any]]:
    """OUT/`name` and its manifest, built once by `build(folder, *args)` in a child process (so
    that no benchmark process imports torch to build) and kept while `spec` is unchanged, or until
    `rebuild`. The manifest is `{"spec": spec, **what build returned}`. The folder is built aside
    and renamed into place whole: an interrupted build leaves no half cache behind. `root` puts
    the folder elsewhere than OUT (e.g. a large fixture on another disk)."""
    folder = root / name
    manifest_path = folder / "manifest.json"
    spec = json.loads(json.dumps(spec))  # as it reads back from the manifest
    if not rebuild and manifest_path.is_file():
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if manifest.get("spec") == spec:
            return folder, manifest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    print(f"building {_shown(folder)} (once; cached while its spec holds) ...", file=sys.stderr)
    try:
        done = subprocess.run(
            child_argv(build, str(tmp), *args),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        lines = done.stdout.splitlines()
        manifest = {"spec": spec, **(json.loads(lines[-1]) if lines else {})}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, manifest


def _shown(path: Path) -> str:
    """`path` relative to the repository root where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def require_disk(path: Path, needed: int, what: str) -> None:
    """Stop the benchmark, before writing anything, unless the filesystem holding `path` has
    `needed` bytes free plus 1 GB to spare (other users of the disk keep some room)."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    print(f"{_shown(path)}: {free / 1e9:.1f} GB free; {what}: {needed / 1e9:.1f} GB",
          file=sys.stderr)  # fmt: skip
    if free < needed + 10**9:
        raise SystemExit(
            f"not enough disk space under {path} for {what}: {free / 1e9:.1f} GB free, "
            f"{needed / 1e9:.1f} GB needed plus 1 GB to spare"
        )


def _build_llama_170m(dest: str) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_170M))
    model.save_pretrained(dest)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def llama_170m() -> Path:
    """The 170M Llama's weights (random init, seed 0, float32), built once."""
    folder, _ = cached(LLAMA_170M_DIR.name, {"llama": LLAMA_170M, "seed": 0}, _build_llama_170m)
    return folder


def quiet_transformers() -> None:
    """In a child that loads models: no warnings, logging or progress bars in its output."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# -- measuring -----------------------------------------------------------------------------------


def interleaved(
    rounds: int,
    keys: Sequence[K],
    measure: Callable[[K, int], Figures],
    *,
    alternate: bool = False,
) -> dict[K, list[Figures]]:
    """`rounds` rounds, each measuring every key once (`measure(key, round)`), so that load drift
    hits every key alike; with `alternate` the order reverses every other round, so that no key
    always goes first. Returns each key's figures, round by round."""
    runs: dict[K, list[Figures]] = {k: [] for k in keys}
    for i in range(rounds):
        for key in keys if not alternate or i % 2 == 0 else keys[::-1]:
            runs[key].append(measure(key, i))
        print(f"  round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
    return runs


def medians(runs: Mapping[K, Sequence[Figures]]) -> dict[K, Figures]:
    """Per key, the median of each measured quantity over its runs."""
    return {k: {q: statistics.median(r[q] for r in rs) for q in rs[0]} for k, rs in runs.items()}


# -- reporting -----------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    """A figure as shown: seconds, milliseconds (`ms`: given in seconds), MiB, a ratio (`x`)."""
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value * 1e3:.1f} ms"
    if unit == "MiB":
        return f"{round(value, 1) + 0.0:.1f} MiB"  # + 0.0: no "-0.0"
    if unit == "x":
        return f"{value:.3g}x"
    return f"{value:.3g}"


def print_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], left: Sequence[int] = (0,)
) -> None:
    """Aligned columns: those in `left` (by index) to the left, the others to the right."""
    table = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


@dataclass(frozen=True)
class Row:
    """One quantity of a table: its key in the figures, its label, its unit (see `fmt`)."""

    key: str
    label: str
    unit: str


def side_by_side(figures: Mapping[str, Figures], rows: Sequence[Row]) -> None:
    """One column per engine (or variant), one row per quantity; with two columns a third, the
    ratio of the first to the second."""
    names = list(figures)
    ratio = len(names) == 2
    body = []
    for row in rows:
        values = [figures[n][row.key] for n in names]
        cells = [fmt(v, row.unit) for v in values]
        if ratio:
            cells.append(fmt(values[0] / values[1], "x") if values[1] else "-")
        body.append([row.label, *cells])
    print_table(["", *names, *(["ratio"] if ratio else [])], body)


def per_command(figures: Mapping[str, Figures], columns: Sequence[Row]) -> None:
    """One row per command (or case), one column per quantity."""
    body = [[name, *(fmt(f[c.key], c.unit) for c in columns)] for name, f in figures.items()]
    print_table(["command", *(c.label for c in columns)], body)


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 6),
            "unit": self.unit,
            "target_max": self.limit,
            "met": self.met,
            "detail": self.detail,
        }


def print_targets(goals: Sequence[Target]) -> None:
    """The targets, each met or NOT MET."""
    print()
    print_table(
        ["target", "value", "limit", "status", "detail"],
        [
            [
                g.name,
                fmt(g.value, g.unit),
                "<= " + fmt(g.limit, g.unit),
                "met" if g.met else "NOT MET",
                g.detail,
            ]
            for g in goals
        ],
        left=(0, 3, 4),
    )


# -- results -------------------------------------------------------------------------------------

_started: dict[str, Any] = {}


def begin(*, bytecode_cache: bool = True) -> dict[str, str]:
    """Start a benchmark: note the time and the load, warn when peak RSS cannot be GNU time's.
    Returns the measured children's environment (`child_env`)."""
    _started.update(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), load=os.getloadavg()[0])
    if GNU_TIME is None:
        print(
            "warning: /usr/bin/time not found; peak RSS includes this process's own",
            file=sys.stderr,
        )
    return child_env(bytecode_cache)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def git_state() -> dict[str, Any]:
    """The commit measured (adapterctl is an editable checkout), and whether it had changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "adapterctl")
    return {
        "commit": git("rev-parse", "HEAD"),
        "adapterctl_dirty": bool(status) if status is not None else None,
    }


def write_results(name: str, goals: Sequence[Target], **payload: Any) -> Path:
    """OUT/<name>-results.json: `payload` with the targets, the date, the machine and its load
    before and after, the package versions and the commit measured."""
    path = OUT / f"{name}-results.json"
    data = {
        "schema_version": 1,
        "date": _started.get("date"),
        **payload,
        "rss_method": "GNU time %M" if GNU_TIME else "os.wait4 ru_maxrss",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1m_before": round(_started["load"], 2) if "load" in _started else None,
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "versions": versions(),
        "git": git_state(),
        "targets": [g.to_dict() for g in goals],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path


def tensor_files(folder: Path) -> dict[str, Path]:
    """Each tensor of a transformers checkpoint folder -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = folder / "model.safetensors"
    with safe_open(str(single), framework="np") as f:
        return dict.fromkeys(f.keys(), single)


def warm_page_cache(*folders: Path) -> None:
    """Read every file once, so that no engine meets a cold disk (in chunks: this process stays
    small)."""
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 20):
                        pass
