"""The r-th smallest of a large TIES store (the |τ| values the threshold pass kept inside a
key's bracket) by a narrower band: a sample of the store brackets the r-th value again, one
vector pass counts the values below that band and packs those inside it (:func:`_band_block`),
and the histogram selection (:func:`.ties_kth.kth_abs`) runs on the band alone, about a tenth
of the store. Exact: a band that misses (or overflows its room) falls back to the whole store.

Why: the histogram's round over a whole store (one scattered increment per value, then a
filtering pass) cost about 1.1 ns a value here; the band pass packs 16 values per step, as the
threshold pass does, and the histogram then sees a tenth of them.
"""
from __future__ import annotations

import numpy as np

from . import HAVE_NUMBA
from . import ties_kth

BAND_MIN = 1 << 16     # stores of fewer values are selected from whole
BAND_SAMPLE = 1 << 12  # the sample of a store that places its band
LANES = 16             # values per step (8 with AVX2's table permutes)

if HAVE_NUMBA:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from .vectors import compress, count, load, loop, splat, table_permute
    from .vectors import store as store_vector

    @intrinsic
    def _band_block(typingctx, vals, o, c, lo, hi, out, k, table):
        """Values [o, o + c) of the float32 ``vals`` (c > 0, a multiple of the step): returns
        (how many are below ``lo``, ``k`` + how many are in [lo, hi]), those stored in order at
        ``out[k:]`` (a vector compress, or AVX2's table permute where ``table`` is given; each
        step writes all its slots, so ``out`` needs that many spare). NaN counts as neither.
        Contiguous arrays only (read at data pointer + index)."""
        if any(a.layout != "C" for a in (vals, out)):
            return None
        permute = not isinstance(table, types.NoneType)
        lanes = 8 if permute else LANES
        pair = types.UniTuple(types.int64, 2)
        sig = pair(vals, types.int64, types.int64, lo, hi, out, types.int64, table)
        pack = table_permute if permute else compress

        def gen(context, builder, sig, args):
            i64 = ir.IntType(64)
            va, _, c_, lo_, hi_, oa, k0, tb = args
            src = builder.gep(context.make_array(sig.args[0])(context, builder, va).data, [args[1]])
            dst = context.make_array(sig.args[5])(context, builder, oa).data
            tbl = context.make_array(sig.args[7])(context, builder, tb).data if permute else None
            lo_v, hi_v = splat(builder, lo_, lanes), splat(builder, hi_, lanes)
            entry, j, close = loop(builder, "band_block")
            k, below = builder.phi(i64), builder.phi(i64)
            k.add_incoming(k0, entry)
            below.add_incoming(ir.Constant(i64, 0), entry)
            x = load(builder, src, j, lanes)
            lt = builder.fcmp_ordered("<", x, lo_v)
            inside = builder.and_(builder.fcmp_ordered(">=", x, lo_v), builder.fcmp_ordered("<=", x, hi_v))
            store_vector(builder, pack(builder, x, inside, tbl), dst, k)
            k_next, below_next = builder.add(k, count(builder, inside)), builder.add(below, count(builder, lt))
            end = close(lanes, c_)
            k.add_incoming(k_next, end)
            below.add_incoming(below_next, end)
            return context.make_tuple(builder, sig.return_type, [below_next, k_next])
        return sig, gen

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _band(vals, lo, hi, out, table, lanes):
        """(how many of ``vals`` are below ``lo``, how many are in [lo, hi]); those stored in
        ``out`` while it has room (``out.size`` − ``lanes`` values; the caller compares). Blocks
        of 2048 go to :func:`_band_block` while the room holds a whole block, the rest one value
        at a time."""
        n = vals.size
        cap = out.size - lanes
        below = 0
        k = 0
        o = 0
        while o < n:
            c = min(2048, n - o)
            fast = min(c, cap - k)
            fast -= fast % lanes
            if fast > 0:
                b, k = _band_block(vals, o, fast, lo, hi, out, k, table)
                below += b
            for j in range(o + max(fast, 0), o + c):
                x = vals[j]
                if x < lo:
                    below += 1
                elif x <= hi:
                    if k < cap:
                        out[k] = x
                    k += 1
            o += c
        return below, k


_UNIFORM = np.random.default_rng(20261128).random(BAND_SAMPLE)   # the sample's places in [0, 1)


def kth_in_store(vals: np.ndarray, r: int, lo: float, hi: float) -> float:
    """The r-th smallest (1-based) of the float32 magnitudes ``vals``, all in [lo, hi] (a store
    and its bracket): exactly ``ties_kth.kth_abs(vals, [r], lo, hi)[0]``, through a band for a
    store of :data:`BAND_MIN` values or more (see the module)."""
    m = vals.size
    if m < BAND_MIN or not HAVE_NUMBA or not vals.flags.c_contiguous:
        return ties_kth.kth_abs(vals, [r], lo, hi)[0]
    sample = vals[(_UNIFORM * m).astype(np.int64)]
    ranks = ties_kth.bracket_ranks(r, m, sample.size)
    ends = iter(ties_kth.kth_abs(sample, [x for x in ranks if x is not None]))
    band_lo, band_hi = (next(ends) if x is not None else end for x, end in zip(ranks, (lo, hi)))
    first, last = ranks[0] or 1, ranks[1] or sample.size
    room = ties_kth.room_for(m, (last - first + 1) / sample.size)
    permute = ties_kth.PERMUTE8
    lanes = 8 if permute else LANES
    out = np.empty(room + lanes, np.float32)
    below, inside = _band(vals, np.float32(band_lo), np.float32(band_hi), out,
                          ties_kth.LANE_TABLE if permute else None, lanes)
    rank = r - below
    if inside > room or not 1 <= rank <= inside:    # overflowed, or the band missed: the whole store
        return ties_kth.kth_abs(vals, [r], lo, hi)[0]
    return ties_kth.kth_abs(out[:inside], [rank], float(band_lo), float(band_hi))[0]
