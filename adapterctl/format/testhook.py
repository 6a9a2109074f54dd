"""A test-only hook: pause a write after N bytes, so tests can kill or race a process at a known
point in the middle of a large write. Inert unless ADAPTERCTL_TEST_PAUSE_AFTER is set.

ADAPTERCTL_TEST_PAUSE_AFTER=N     pause once N bytes of output data have been written
ADAPTERCTL_TEST_PAUSE_MARKER=P    then create file P (the test waits for it)
ADAPTERCTL_TEST_PAUSE_UNTIL=Q     and wait until file Q exists (default: wait until killed)
ADAPTERCTL_TEST_PAUSE_AT=NAME     pause (marker, wait) at the named point instead, e.g. `swap`:
                                  between the two renames of a --force replace
"""

from __future__ import annotations

import os
import time

_AFTER = os.environ.get("ADAPTERCTL_TEST_PAUSE_AFTER")
_AT = os.environ.get("ADAPTERCTL_TEST_PAUSE_AT")
_written = 0
_paused = False


def wrote(n: int) -> None:
    """Count `n` bytes written to an output; pause here once the threshold is passed."""
    global _written, _paused
    if _AFTER is None or _paused:
        return
    _written += n
    if _written < int(_AFTER):
        return
    _pause()


def at(point: str) -> None:
    """Pause at the named point when ADAPTERCTL_TEST_PAUSE_AT names it."""
    global _paused
    if point == _AT and not _paused:
        _pause()


def _pause() -> None:
    global _paused
    _paused = True
    marker = os.environ.get("ADAPTERCTL_TEST_PAUSE_MARKER")
    if marker:
        with open(marker, "w"):
            pass
    until = os.environ.get("ADAPTERCTL_TEST_PAUSE_UNTIL")
    while until is None or not os.path.exists(until):
        time.sleep(0.01)
