"""A writer held at a known point, for the crash-safety tests (tests/cli/test_crash.py,
tests/cli/test_data_loss.py): runs adapterctl's CLI in a child process whose writer pauses once,

- `--after N`: once N bytes of output data have been written (counted where the tensor writer
  reports progress: per tensor in `write_safetensors`, per chunk in `copy_stream`), or
- `--at-swap`: between the two renames of a --force replace (just after the old output was
  renamed aside),

then creates the `--marker` file and waits until the `--until` file exists (without `--until`,
until it is killed). The product carries no hook for this: the child wraps
`adapterctl.format.tensors`' write functions and `os.rename` before the CLI is imported, so every
caller (importing those names at its own import) gets the wrapped ones.

    python -m tests.held_writer --marker P [--until Q] (--after N | --at-swap) -- ARGS...
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ASIDE = ".adapterctl-old-"  # the name an old output is renamed to during a --force replace


def command(
    args: list[str],
    *,
    marker: Path,
    after: int | None = None,
    at_swap: bool = False,
    until: Path | None = None,
) -> list[str]:
    """The argv of a child running `adapterctl ARGS` held at one point (run it from the
    repository root, where `tests` is importable)."""
    if (after is None) == (not at_swap):
        raise ValueError("give exactly one of `after` and `at_swap`")
    where = ["--at-swap"] if at_swap else ["--after", str(after)]
    wait = ["--until", str(until)] if until is not None else []
    held = [sys.executable, "-m", "tests.held_writer", "--marker", str(marker), *where, *wait]
    return [*held, "--", *args]


class _Hold:
    """Pause once: create the marker, then wait for the go-ahead file (or forever)."""

    def __init__(self, marker: Path, until: Path | None) -> None:
        self.marker, self.until, self.done = marker, until, False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        self.marker.touch()
        while self.until is None or not self.until.exists():
            time.sleep(0.01)


def _counting(original: Callable[..., Any], hold: _Hold, after: int) -> Callable[..., Any]:
    """`original` (a writer taking a `progress(nbytes)` callback) that holds once `after` bytes
    have been reported, before passing each report on."""
    signature = inspect.signature(original)
    written = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        progress = bound.arguments.get("progress")

        def count(n: int) -> None:
            nonlocal written
            written += n
            if written >= after:
                hold()
            if progress is not None:
                progress(n)

        bound.arguments["progress"] = count
        return original(*bound.args, **bound.kwargs)

    return wrapper


def _swap_holding(hold: _Hold) -> Callable[..., None]:
    real = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real(src, dst, *args, **kwargs)
        if _ASIDE in os.path.basename(os.fspath(dst)):
            hold()

    return rename


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.held_writer", description=__doc__)
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("--until", type=Path)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--after", type=int, metavar="BYTES")
    where.add_argument("--at-swap", action="store_true")
    if "--" not in argv:
        parser.error("give the adapterctl arguments after `--`")
    cut = argv.index("--")
    opts = parser.parse_args(argv[:cut])
    hold = _Hold(opts.marker, opts.until)
    if opts.at_swap:
        os.rename = _swap_holding(hold)
    else:
        from adapterctl.format import tensors

        tensors.write_safetensors = _counting(tensors.write_safetensors, hold, opts.after)
        tensors.copy_stream = _counting(tensors.copy_stream, hold, opts.after)
    from adapterctl.cli.main import main as cli_main

    sys.argv = ["adapterctl", *argv[cut + 1 :]]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
