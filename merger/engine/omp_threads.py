"""One torch thread in a helper thread, without touching anyone else's thread count.

``torch.set_num_threads(n)`` is not a per-thread setting, whatever it looks like. ATen keeps one
process-wide count and sets each thread's OpenMP count from it lazily, at that thread's first
parallel op (``at::internal::lazy_init_num_threads``). Calling it in a worker thread's
initializer therefore did two things nobody asked for (both measured: README, the paragraph
below the test command):

- every thread started afterwards (a Gradio handler, the XYZ runner) ran torch on one core, and
- a worker whose first parallel op came after someone reset the count (``torch.set_num_threads(2)``
  in the main thread) took that count after all, and opened an OpenMP team of its own. libgomp
  then manages more threads than there are cores and stops spinning between parallel regions:
  every other thread's torch kernels ran 1.5-2x slower for the rest of the process.

:func:`one_torch_thread` first lets ATen do the calling thread's lazy set-up (``torch.get_num_threads``
does it), then sets the OpenMP count of this thread alone through the OpenMP runtime torch loaded.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

import torch


@functools.lru_cache(maxsize=1)
def _openmp_runtime():
    """torch's OpenMP runtime as a ctypes library (libgomp, libiomp5 or libomp, the one already
    loaded), or None where none is found (then torch's own setter is used)."""
    names = ("libgomp", "libiomp", "libomp", "vcomp")
    candidates: list[str] = []
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps") as maps:
                candidates = sorted({line.split()[-1] for line in maps
                                     if any(n in os.path.basename(line.split()[-1]) for n in names)})
        except OSError:
            pass
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates += sorted(p for n in names for p in glob.glob(os.path.join(lib_dir, n + "*")))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            lib.omp_get_max_threads.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def one_torch_thread() -> None:
    """Make torch's CPU ops in the calling thread single-threaded, leaving ATen's process-wide
    count (which threads started later copy) as it was."""
    torch.get_num_threads()                      # ATen's lazy per-thread set-up happens here, now
    lib = _openmp_runtime()
    if lib is not None:
        lib.omp_set_num_threads(1)
        if lib.omp_get_max_threads() == 1 and torch.get_num_threads() == 1:
            return
    torch.set_num_threads(1)                     # no runtime found: at least this thread is right
