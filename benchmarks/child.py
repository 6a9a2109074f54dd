"""`python -m benchmarks.child MODULE:FUNCTION [ARG ...]`: call one function of a benchmark module
in a fresh interpreter (a measured child, or a fixture build) and print what it returns as the
last line of stdout, in JSON. See `common.run_child` and `common.cached`."""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
    module, _, name = argv[0].partition(":")
    result = getattr(importlib.import_module(module), name)(*argv[1:])
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
