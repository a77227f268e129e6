"""Ascending ranks of non-negative float32 values, ties by position (numba): DELLA's |τ| ranks.

DELLA's keep probability needs each element's rank among the |τᵢ| of its tensor, as
``rank[argsort(|τ|, stable=True)] = 1…N``. torch's stable argsort took 2.1 s per 15 M values here
(so about 10 minutes for an SD1.5 merge of base + 4). A non-negative float32's bit pattern, read as
an unsigned integer, orders the same way as the float, and a least-significant-digit radix sort is
stable by construction: four passes of 8 bits give the same permutation (0.32 s per 15 M values;
three of 11 bits took 0.53 s, two of 16 bits 0.54 s), and the callers rank several tensors at once
on the worker threads.
"""
from __future__ import annotations

import numpy as np

from . import HAVE_NUMBA

DIGIT = 8
PASSES = 4
BUCKETS = 1 << DIGIT

if HAVE_NUMBA:
    from numba import njit

    @njit(nogil=True, boundscheck=False, cache=True)
    def _ranks(keys, out):
        """out[j] = 1-based rank of keys[j] (uint32) in ascending order, ties by j. Each key is
        sorted packed with its position, key << 32 | j, in one uint64 array (one stream per pass
        instead of two: 0.32 s instead of 0.41 s per 15 M values)."""
        n = keys.size
        counts = np.zeros((PASSES, BUCKETS), np.int64)
        src = np.empty(n, np.uint64)
        for j in range(n):
            k = keys[j]
            src[j] = (np.uint64(k) << np.uint64(32)) | np.uint64(j)
            for d in range(PASSES):
                counts[d, (k >> (d * DIGIT)) & (BUCKETS - 1)] += 1
        dst = np.empty(n, np.uint64)
        for d in range(PASSES):
            start = 0
            for b in range(BUCKETS):
                c = counts[d, b]
                counts[d, b] = start
                start += c
            shift = np.uint64(32 + d * DIGIT)
            for j in range(n):
                v = src[j]
                b = (v >> shift) & np.uint64(BUCKETS - 1)
                at = counts[d, b]
                counts[d, b] = at + 1
                dst[at] = v
            src, dst = dst, src
        for r in range(n):
            out[src[r] & np.uint64(0xFFFFFFFF)] = r + 1


def ranks(mag: np.ndarray) -> np.ndarray:
    """The 1-based ascending ranks (int32) of the non-negative, non-NaN float32 array ``mag``, ties
    by position: ``rank[argsort(mag, stable=True)] = 1…N`` (int32 converts to float32 exactly as
    int64 does, which is all DELLA does with them)."""
    if mag.size >= 2**31:
        raise ValueError("ranks: more than 2^31 values")
    out = np.empty(mag.size, np.int32)
    _ranks(np.ascontiguousarray(mag).view(np.uint32), out)
    return out
