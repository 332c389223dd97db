"""Numpy's linear algebra on one thread for the small matrices of decomposition.

Weight matrices are small (a few hundred rows), and on a loaded machine OpenBLAS's spinning
worker threads made a 192 x 192 SVD 100x slower (1 s instead of 10 ms) and a 384 x 1536 one
take 7 s. :func:`single_threaded_blas` sets the thread count of numpy's bundled OpenBLAS
(``numpy.libs/libscipy_openblas*``) to 1 for its body and restores it; with another BLAS it
does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


@functools.cache
def _openblas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of numpy's bundled OpenBLAS, or None if not found."""
    libs = Path(np.__file__).parent.with_name("numpy.libs")
    for path in sorted(libs.glob("libscipy_openblas*")) if libs.is_dir() else []:
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by numpy: the same handle
            get, put = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
        except (OSError, AttributeError):
            continue
        get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
        return get, put
    return None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the body with numpy's OpenBLAS on one thread (a no-op when it cannot be found)."""
    threads = _openblas_threads()
    if threads is None:
        yield
        return
    get, put = threads
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


def limit_blas_threads(threads: int) -> None:
    """Set numpy's OpenBLAS to ``threads`` threads for the rest of this process (a calibration
    worker: N workers each on all cores would oversubscribe them). A no-op with another BLAS."""
    found = _openblas_threads()
    if found is not None:
        found[1](max(1, threads))
