"""CPU kernels written with numba for loops torch cannot express well.

numba compiles these Python loops with its own LLVM (no C compiler needed on the user's machine)
to vectorized machine code; compiled kernels are cached on disk (``cache=True``), so only the
first use of a signature pays the compile (about 1-3 s). Each kernel releases the GIL
(``nogil``), and the callers split the elements between their worker threads.

Tensors cross over as zero-copy numpy views whose dtype names the stored format
(:func:`as_numpy`): float16 as ``uint16``, bfloat16 as ``int16``, float32 as itself;
:mod:`.convert` reads and writes those exactly as torch's conversions do.

- :mod:`.ties_kth`: TIES's exact per-model thresholds in one pass over the inputs.
- :mod:`.ties_combine`: TIES's trim, sign election and disjoint mean, written once per element.
- :mod:`.bernoulli`: torch's CPU ``bernoulli`` masks (its MT19937 stream), bit for bit.
- :mod:`.dare`: DARE's masked weighted sum in one pass.
- :mod:`.della_mask`: DELLA's rank-dependent masks without sorting; :mod:`.ranks`: the radix ranks.
- :mod:`.median`: Weiszfeld's iterations and Model Stock's Gram matrix, a pass each.
- :mod:`.fp8`: float8 widened by a 256-entry table (torch's values, 10x its conversion here).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..omp_threads import one_torch_thread

try:  # pinned in requirements.txt; without it the callers keep their torch paths
    import numba  # noqa: F401
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

def host_features() -> frozenset[str]:
    """The instruction-set features (LLVM's names: ``avx2``, ``avx512f``, ``f16c``…) of the CPU
    the kernels are compiled for: this one's, or none where numba is missing or
    ``NUMBA_CPU_NAME`` names another CPU (then no kernel uses a feature-specific instruction)."""
    global _features
    if _features is None:
        _features = frozenset()
        if HAVE_NUMBA:
            from numba.core import config
            if config.CPU_NAME in (None, "host"):
                import llvmlite.binding as llvm
                try:
                    _features = frozenset(k for k, on in llvm.get_host_cpu_features().items() if on)
                except RuntimeError:          # features unknown on this platform
                    pass
    return _features


_features: frozenset[str] | None = None


VIEWS = {torch.float16: np.uint16, torch.bfloat16: np.int16, torch.float32: np.float32}


_broken: list[str] = []          # why numba could not compile a kernel here (then none is used again)


def available() -> bool:
    return HAVE_NUMBA and not _broken


def compile_failed(e: Exception) -> bool:
    """Whether ``e`` is numba failing to compile a kernel on this machine (an LLVM or typing error
    in an environment nobody tested); if so, say it once and turn every kernel off, so that the
    callers take their torch paths instead of ending the merge with a traceback."""
    if not HAVE_NUMBA:
        return False
    from numba.core.errors import NumbaError
    if not isinstance(e, NumbaError):
        return False
    if not _broken:
        _broken.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        print(f"note: numba's CPU kernels are off ({_broken[0]}); merging with torch's operations",
              file=sys.stderr)
    return True


def as_numpy(t: torch.Tensor) -> np.ndarray | None:
    """The contiguous CPU tensor ``t``, flat, as the numpy view that names its dtype for the
    kernels (float16 → uint16, bfloat16 → int16, float32 → float32); None for other dtypes,
    other devices or strided tensors. Called for every input and output of every key (six per
    key of a TIES merge of four models): numpy's own float16 and float32 views, made from the
    tensor as it is, take 2.5 µs against 5.7 µs for torch's reshape and dtype view first; numpy
    has no bfloat16, so that one goes through torch's int16 view."""
    view = VIEWS.get(t.dtype)
    if view is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    if t.dtype == torch.bfloat16:
        return t.reshape(-1).view(torch.int16).numpy()
    return t.numpy().reshape(-1).view(view)


_pool: tuple[int, ThreadPoolExecutor] | None = None


def workers() -> ThreadPoolExecutor:
    """The kernels' worker threads, one per core (at most 8): each kernel call gets a share of
    the elements (:func:`parts`) or a whole tensor. torch runs single-threaded inside them
    (:func:`..omp_threads.one_torch_thread`, for this thread alone): their torch ops then open no
    OpenMP teams of their own, which slowed every other thread's kernels 1.5-2x. Made again in a
    forked child, where the parent's threads do not exist."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(min(8, os.cpu_count() or 2), thread_name_prefix="kernels",
                                                 initializer=one_torch_thread))
    return _pool[1]


def parts(total: int, align: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of ``total`` elements, one per worker, starts a multiple of ``align``."""
    step = -(-total // workers()._max_workers // align) * align
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def key_views(base: torch.Tensor, models: list[torch.Tensor], out_dtype: torch.dtype, out: torch.Tensor | None):
    """For a kernel computing one key from its inputs: (the views of ``base`` and ``models``, the
    result tensor (``out``, or a new one of base's shape in ``out_dtype``), its view); None where
    the models' dtypes differ or a dtype has no view (:func:`as_numpy`)."""
    if len({m.dtype for m in models}) != 1 or out_dtype not in VIEWS:
        return None
    views = [as_numpy(x) for x in (base, *models)]
    if any(v is None for v in views):
        return None
    res = out if out is not None else torch.empty(base.shape, dtype=out_dtype)
    into = as_numpy(res)
    return None if into is None else (views, res, into)


def split_for(total: int):
    """(element parts, their map) for a key of ``total`` elements: the workers for large keys;
    small ones on the calling thread, where handing them over costs more."""
    from ..compiled import MIN_NUMEL
    if total < MIN_NUMEL:
        return [(0, total)], map
    return parts(total, 64), workers().map


def fused_key(base: torch.Tensor, models: list[torch.Tensor], out_dtype: torch.dtype, out: torch.Tensor | None,
              body) -> torch.Tensor | None:
    """The frame of a method's fused CPU path: ``body(base view, model views, result view, element
    parts, their map)`` writes the key from the views of :func:`key_views`; returns the result.
    None (the caller's stacked path) on another device, where the kernels are off (numba missing
    or broken, ``SDMW_COMPILE=0``), for dtypes without views, or where numba cannot compile a
    kernel here (said once: :func:`compile_failed`)."""
    from ..compiled import enabled
    if base.device.type != "cpu" or not (available() and enabled()):
        return None
    got = key_views(base, models, out_dtype, out)
    if got is None:
        return None
    views, res, into = got
    try:
        body(views[0], tuple(views[1:]), into, *split_for(views[0].size))
    except Exception as e:
        if not compile_failed(e):
            raise
        return None
    return res
