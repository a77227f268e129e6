"""Fused CPU kernels through ``torch.compile`` (Inductor's C++ backend), the eager path as fallback.

Eager torch runs an N-model method as a dozen passes over memory per element (convert, subtract,
trim, sign, sums …); on a 2-core CPU those passes, not the arithmetic, are the cost. Compiled, the
same expression becomes one loop that reads each input once and writes the result once (TIES,
base + 4 SD1.5-sized models: 17 ms instead of 170 ms per 15 M-element key).

Used only for CPU tensors of at least :data:`MIN_NUMEL` elements (the GPU path is eager and
already bound by host→device copies; small tensors are not worth a kernel call). Compiling needs
a C++ compiler: where there is none, or compilation fails for any other reason, one warning is
printed and every later call takes the fallback, eager torch. TIES uses numba's kernels
(:mod:`.kernels`, which need no compiler) first, and this only where numba is missing or a dtype
has no kernel view. ``SDMW_COMPILE=0`` turns every fused kernel off (the eager reference path).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

MIN_NUMEL = 1 << 16
_broken: list[str] = []          # why compiling failed in this process (then never tried again)


def enabled() -> bool:
    """Fused kernels are on (``SDMW_COMPILE=0`` turns them all off: the eager reference path)."""
    return os.environ.get("SDMW_COMPILE", "1") != "0"


def usable(t: torch.Tensor, compiler: bool = True) -> bool:
    """Whether a fused kernel should run on (a key shaped like) ``t``; ``compiler=False``: one
    that needs no C++ compiler (numba's, :mod:`.kernels`), so compilation failures do not count."""
    return t.device.type == "cpu" and t.numel() >= MIN_NUMEL and not (compiler and _broken) and enabled()


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled on first use with dynamic shapes (one kernel for every tensor size). The
    returned callable gives None instead of raising when compilation is impossible here."""
    holder: list[Callable] = []

    def call(*args):
        if _broken:
            return None
        if not holder:
            import torch._dynamo
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):   # a variant per model count/dtype
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 64))
            holder.append(torch.compile(fn, dynamic=True))
        try:
            return holder[0](*args)
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported platform …: stay eager
            _broken.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            print(f"note: compiled CPU kernels are off ({_broken[0]}); merging with numba's kernels where "
                  "there are some, else eager torch", file=sys.stderr)
            return None
    return call
