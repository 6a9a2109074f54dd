"""One BLAS thread for the small products of rank reduction and verification.

numpy's OpenBLAS runs every r x r-sized product and QR on all cores. Those problems are far too
small to share: on a busy machine the threads wait on each other much longer than the work takes
(a 14336 x 64 QR: 19 ms on one thread, 115 ms on two; its Gram matrix: 2 ms against 24 ms).
`one_blas_thread()` sets the OpenBLAS that numpy loaded to one thread for a block and restores
its count afterwards: through ctypes, as threadpoolctl does; a no-op where no OpenBLAS is found
(another BLAS, or a system without /proc). The setting is process-wide while the block runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator

#: (getter, setter) names: numpy's bundled scipy-openblas (64-bit ints), then plain OpenBLAS
_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


@functools.cache
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    import numpy  # noqa: F401 - loads its BLAS, so that it is mapped below

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {
                line.split(maxsplit=5)[-1].strip()
                for line in f
                if "openblas" in line.lower() and "/" in line
            }
    except OSError:
        return None
    for path in sorted(paths, key=lambda p: "numpy" not in p):  # numpy's own first
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            getter, setter = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if getter is not None and setter is not None:
                getter.restype = ctypes.c_int
                getter.argtypes = []
                setter.restype = None
                setter.argtypes = [ctypes.c_int]
                return getter, setter
    return None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    found = _openblas()
    if found is None:
        yield
        return
    getter, setter = found
    before = getter()
    if before == 1:
        yield
        return
    setter(1)
    try:
        yield
    finally:
        setter(before)
