"""Float8 widened by table: each stored byte looks up its value in a 256-entry table made by
torch's own conversion, so the result is torch's bit for bit (NaN patterns included).

torch has no float8 arithmetic, so every float8 input of a merge is converted first (to float32,
or exactly to model A's float16/bfloat16: every float8 value is one of theirs). On the CPU torch
converts 0.16-0.37 G values/s on 2 cores here; the table loop does 1.8 G/s on one thread (it
was measured at 10x torch's ``copy_`` on the same chunk), so a full Flux fp8 merge no longer
spends most of its time converting. Small tensors, other devices and strided views keep torch's
conversion, as does every tensor where numba is missing.
"""
from __future__ import annotations

import numpy as np
import torch

from ..tensor_ops import is_fp8
from . import HAVE_NUMBA, VIEWS, as_numpy, available, compile_failed, split_for

_tables: dict[tuple[torch.dtype, torch.dtype], np.ndarray] = {}

if HAVE_NUMBA:
    from numba import njit

    @njit(nogil=True, boundscheck=False, cache=True)
    def _lookup(raw, table, out):
        for j in range(raw.size):
            out[j] = table[raw[j]]


def table(src: torch.dtype, dst: torch.dtype) -> np.ndarray:
    """The 256 values of ``src``'s bit patterns in ``dst``, by torch's conversion, as the kernel
    view of ``dst`` (:data:`..kernels.VIEWS`)."""
    key = (src, dst)
    if key not in _tables:
        every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(src)
        _tables[key] = as_numpy(every.to(dst)).copy()
    return _tables[key]


def widen(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x`` (float8, on the CPU, contiguous) in ``dtype`` (float32, float16 or bfloat16), into
    ``out`` when given (same number of elements, contiguous); None where the table path does not
    apply (then the caller converts with torch: the same values)."""
    from ..compiled import enabled
    if (not is_fp8(x.dtype) or dtype not in VIEWS or x.device.type != "cpu" or not x.is_contiguous()
            or not available() or not enabled()):
        return None
    res = out if out is not None else torch.empty(x.shape, dtype=dtype)
    into = as_numpy(res) if res.dtype == dtype and res.numel() == x.numel() else None
    if into is None:
        return None
    raw = x.reshape(-1).view(torch.uint8).numpy()
    tab = table(x.dtype, dtype)
    parts, run = split_for(raw.size)
    try:
        for _ in run(lambda p: _lookup(raw[p[0]:p[1]], tab, into[p[0]:p[1]]), parts):
            pass
    except Exception as e:
        if not compile_failed(e):
            raise
        return None
    return res


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, by table where ``x`` is float8 (:func:`widen`)."""
    if x.dtype == dtype:
        return x
    got = widen(x, dtype)
    return got if got is not None else x.to(dtype)


def copy_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out.copy_(x)``, by table where ``x`` is float8 (:func:`widen`)."""
    got = widen(x, out.dtype, out) if out.is_contiguous() else None
    return got if got is not None else out.copy_(x)
