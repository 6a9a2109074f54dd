"""Regenerate the key table of `adapterctl/format/peftversions.py` from PEFT's own sources.

For each release, the dataclass fields (with defaults) of `LoraConfig` in
`src/peft/tuners/lora/config.py` and of its bases `PeftConfig`/`PeftConfigMixin` in
`src/peft/config.py`, read with `ast` (nothing of PEFT is imported). Sources: a git mirror of
github.com/huggingface/peft (tags v0.X.0) or an unpacked wheel (`--wheel X.Y=DIR`, DIR holding
`peft/`). Prints, per key, the first release that knows it, its default there, and the release
that removed it (if any):

    python -m tests.peft_sources MIRROR_GIT_DIR --wheel 0.21=DIR
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

RELEASES = [f"0.{n}" for n in range(6, 22)]
CLASSES = {"PeftConfigMixin", "PeftConfig", "LoraConfig"}
_FACTORIES = {"dict": {}, "list": [], "set": []}


def _default(value: ast.expr | None) -> object:
    if value is None:
        return "<required>"
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                return _default(kw.value)
            if kw.arg == "default_factory":
                name = ast.unparse(kw.value)
                return _FACTORIES.get(name, f"<{name}()>")
        return "<required>"
    try:
        return ast.literal_eval(value)
    except ValueError:
        return f"<{ast.unparse(value)}>"


def fields(source: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in CLASSES:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    out[stmt.target.id] = _default(stmt.value)
    return out


def release_fields(mirror: str, wheels: dict[str, Path], release: str) -> dict[str, object]:
    paths = ["src/peft/config.py", "src/peft/tuners/lora/config.py"]
    if release in wheels:
        texts = [(wheels[release] / p.removeprefix("src/")).read_text() for p in paths]
    else:
        texts = [
            subprocess.run(
                ["git", "-C", mirror, "show", f"v{release}.0:{p}"],
                check=True, capture_output=True, text=True,
            ).stdout
            for p in paths
        ]  # fmt: skip
    out: dict[str, object] = {}
    for text in texts:  # the base classes first, LoraConfig's own fields override them
        out.update(fields(text))
    return out


def table(mirror: str, wheels: dict[str, Path]) -> dict[str, dict[str, object]]:
    per = {r: release_fields(mirror, wheels, r) for r in RELEASES}
    keys: dict[str, dict[str, object]] = {}
    for r in RELEASES:
        for k, d in per[r].items():
            if k not in keys:
                keys[k] = {"since": r, "default": d}
            elif keys[k].get("removed") and keys[k]["removed"] != r:
                raise SystemExit(f"{k} came back in {r}")
    for k, info in keys.items():
        later = RELEASES[RELEASES.index(str(info["since"])) :]
        gone = [r for r in later if k not in per[r]]
        if gone:
            info["removed"] = gone[0]
        changed = {r: per[r][k] for r in later if k in per[r] and per[r][k] != info["default"]}
        if changed:
            info["default_changed"] = changed
    return keys


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.peft_sources")
    parser.add_argument("mirror", help="a git clone of github.com/huggingface/peft (its tags)")
    parser.add_argument(
        "--wheel", action="append", default=[], metavar="X.Y=DIR",
        help="read release X.Y from an unpacked wheel (DIR holds peft/)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    wheels = {v: Path(d) for v, _, d in (w.partition("=") for w in args.wheel)}
    print(json.dumps(table(args.mirror, wheels), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
