"""TIES's exact per-model thresholds on the CPU in one streamed pass over the inputs (numba).

For each model i the threshold is the k-th smallest |τᵢ| = |float32(Mᵢ) − float32(BASE)| over a
key. A fixed sample gives each model a bracket [loᵢ, hiᵢ] holding that value (``ties._bracket``);
then one pass over the key, split between the worker threads, reads BASE and every Mᵢ once per
element and, per model, counts the |τᵢ| below loᵢ and stores those inside [loᵢ, hiᵢ] (about 3% of
them) with a vector compress (AVX-512's ``vcompressps``; on AVX2 without AVX-512, table
permutes: :data:`PERMUTE8`). A histogram selection over the stored values gives the exact k-th.

Why numba: the pass is a loop torch cannot express (compaction: inductor cannot write a
data-dependent number of values) and numpy needs several passes and bool arrays for. Measured
here (2 cores), per 15 M-element fp16 key and 4 models: 14 ms for the pass, against 65 ms for
the chunked torch + numpy path it replaces (which stays as the fallback); over SD1.5's keys,
thresholds 2.6 s instead of 6.0 s key by key, and 1.6-2.1 s with every key's first
(``ties.ties_prefetch``). numba brings its own LLVM, so no C compiler is needed.

The inputs come as the numpy views of :func:`..kernels.as_numpy`; their conversions
(:mod:`.convert`) are exact, so |τ| is bit for bit torch's mixed-dtype subtraction.
"""
from __future__ import annotations

import threading

import numpy as np

from . import HAVE_NUMBA, host_features
from .magnitude import input_bits

BLOCK = 256          # |τ| values made per model before they are compressed (L1-resident)
LANES = 16           # values per compress step; a model's store buffer has LANES spare slots
HIST_BITS = 12       # histogram selection: 4096 bins over the float order keys per round
# AVX2 without AVX-512 (Zen 1-3, Intel's desktop chips): LLVM has no instruction for a vector
# compress there and expands it lane by lane; a permute by a table row does the same work
PERMUTE8 = "avx2" in host_features() and "avx512f" not in host_features()


def _lane_table() -> np.ndarray:
    """Row m: the indices of the set bits of the 8-bit mask m, in order, then zeros (the
    permutation that packs the selected lanes of 8 to the front)."""
    t = np.zeros((256, 8), np.int32)
    for m in range(256):
        idx = [j for j in range(8) if m >> j & 1]
        t[m, :len(idx)] = idx
    return t


LANE_TABLE = _lane_table()

if HAVE_NUMBA:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from .convert import f32 as _f32
    from .convert import widen
    from .magnitude import mag_max

    def _packing(lanes: int, pack):
        """The code of an intrinsic (src, off, dst, at, lo, hi, ...) that loads ``src[off:off+lanes]``
        (float32), stores those inside [lo, hi] at ``dst[at:]`` in order, packed by
        ``pack(context, builder, sig, args, values, mask)``, writing all ``lanes`` slots (``dst``
        needs that many spare), and returns how many there were plus 2³² × how many are at least
        lo (the compare is made anyway: counting the values below lo here saved a compare and a
        sum per value)."""
        def gen(context, builder, sig, args):
            s, o, d, k, lo_v, hi_v = args[:6]
            sa = context.make_array(sig.args[0])(context, builder, s)
            da = context.make_array(sig.args[2])(context, builder, d)
            vty = ir.VectorType(ir.FloatType(), lanes)
            v = builder.load(builder.bitcast(builder.gep(sa.data, [o]), vty.as_pointer()), align=4)

            def splat(x):
                one = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
                zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
                return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), zeros)
            ge = builder.fcmp_ordered(">=", v, splat(lo_v))
            mask = builder.and_(ge, builder.fcmp_ordered("<=", v, splat(hi_v)))
            packed = pack(context, builder, sig, args, v, mask)
            builder.store(packed, builder.bitcast(builder.gep(da.data, [k]), vty.as_pointer()), align=4)
            bits_t, i64 = ir.IntType(lanes), ir.IntType(64)
            pop = _declare(builder, f"llvm.ctpop.i{lanes}", bits_t, [bits_t])

            def count(m):
                return builder.zext(builder.call(pop, [builder.bitcast(m, bits_t)]), i64)
            return builder.or_(count(mask), builder.shl(count(ge), ir.Constant(i64, 32)))
        return gen

    def _declare(builder, name: str, ret, params):
        mod = builder.module
        return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, params), name=name)

    def _vector_compress(context, builder, sig, args, v, mask):
        """LLVM's ``vector.compress``: ``vcompressps`` with AVX-512, an expansion elsewhere."""
        vty = v.type
        fn = _declare(builder, f"llvm.experimental.vector.compress.v{LANES}f32", vty,
                      [vty, ir.VectorType(ir.IntType(1), LANES), vty])
        return builder.call(fn, [v, mask, ir.Constant(vty, ir.Undefined)])

    def _table_permute(context, builder, sig, args, v, mask):
        """AVX2's ``vpermps`` by the row of :data:`LANE_TABLE` that the 8-bit mask picks."""
        ta = context.make_array(sig.args[6])(context, builder, args[6])
        ity, i64 = ir.VectorType(ir.IntType(32), 8), ir.IntType(64)
        row = builder.mul(builder.zext(builder.bitcast(mask, ir.IntType(8)), i64), ir.Constant(i64, 8))
        perm = builder.load(builder.bitcast(builder.gep(ta.data, [row]), ity.as_pointer()), align=4)
        return builder.call(_declare(builder, "llvm.x86.avx2.permps", v.type, [v.type, ity]), [v, perm])

    @intrinsic
    def _compress(typingctx, src, off, dst, at, lo, hi):
        """Store the values of ``src[off:off+16]`` inside [lo, hi] at ``dst[at:]`` in order, as one
        vector compress (:func:`_packing`, :func:`_vector_compress`)."""
        sig = types.int64(src, types.int64, dst, types.int64, types.float32, types.float32)
        return sig, _packing(LANES, _vector_compress)

    @intrinsic
    def _permute8(typingctx, src, off, dst, at, lo, hi, table):
        """:func:`_compress` for 8 values with AVX2 (where :data:`PERMUTE8`): the compare's 8-bit
        mask picks a row of :data:`LANE_TABLE`, ``vpermps`` packs the values inside [lo, hi] to
        the front, one unaligned store writes all 8 slots. LLVM's own expansion of
        ``vector.compress`` there (a store per lane, each behind an extract) made the threshold
        pass 2.9x slower (88 against 30 ms per 16.8 M-element key and 4 models on a Zen 3)."""
        sig = types.int64(src, types.int64, dst, types.int64, types.float32, types.float32, table)
        return sig, _packing(8, _table_permute)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _abs_diff(m, b, a):
        """a[:n] = |m − b[:n]| for the n values of the slice ``m``.

        The hot loops take slices and index them from 0: indexing with ``o + j`` kept LLVM from
        proving the index non-negative (numba wraps negative indices), and the loop ran 5x slower
        unvectorized. They are separate functions for the same reason."""
        for j in range(m.size):
            a[j] = abs(_f32(m[j]) - b[j])

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _keep_inside(a, c, lo, hi, dst, k, cap, table):
        """Store the values of a[:c] inside [lo, hi] at dst[k:] while below ``cap``; (the new k,
        which counts past ``cap`` on overflow; how many of a[:c] are below lo). ``table``:
        :data:`LANE_TABLE` for AVX2's permutes, None for LLVM's vector compress (the branch not
        taken is pruned before typing: the AVX2 intrinsic is never compiled without it)."""
        if c == BLOCK and k + BLOCK <= cap:
            ge = 0
            if table is None:
                for j in range(0, BLOCK, LANES):
                    r = _compress(a, j, dst, k, lo, hi)
                    k += r & 0xFFFFFFFF
                    ge += r >> 32
            else:
                for j in range(0, BLOCK, 8):
                    r = _permute8(a, j, dst, k, lo, hi, table)
                    k += r & 0xFFFFFFFF
                    ge += r >> 32
            return k, BLOCK - ge
        below = 0
        for j in range(c):
            v = a[j]
            below += v < lo
            if v >= lo and v <= hi:
                if k < cap:
                    dst[k] = v
                k += 1
        return k, below

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _split_range(base, models, start, stop, lo, hi, store, below, inside, table,
                     bbits, mbits, bmask, mmask, tops):
        """Over elements [start, stop) (a multiple of BLOCK long, or the key's tail): per model i,
        add to ``below[i]`` how many |τᵢ| are below ``lo[i]`` and to ``inside[i]`` how many are in
        [lo[i], hi[i]], storing those in ``store[i]`` while it has room (the caller compares).
        ``table``: see :func:`_keep_inside`. On the way, the inputs' NaN/Inf check: ``tops[0]``
        (BASE) and ``tops[1 + i]`` (model i) become the largest magnitude bits (:func:`.magnitude.mag_max`)
        of ``bbits`` and ``mbits[i]``, the inputs' unsigned views, under ``bmask``/``mmask``."""
        n = len(models)
        cap = store.shape[1] - LANES
        b = np.empty(BLOCK, np.float32)
        a = np.empty(BLOCK, np.float32)
        for o in range(start, stop, BLOCK):
            c = min(BLOCK, stop - o)
            widen(base[o:o + c], b)
            tops[0] = mag_max(bbits[o:o + c], bmask, tops[0])
            for i in range(n):
                _abs_diff(models[i][o:o + c], b, a)
                tops[1 + i] = mag_max(mbits[i][o:o + c], mmask, tops[1 + i])
                k, under = _keep_inside(a, c, lo[i], hi[i], store[i], inside[i], cap, table)
                inside[i] = k
                below[i] += under

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _sample_abs(base, models, idx, out):
        """out[i, p] = |τᵢ| at element idx[p] (BASE read once per position)."""
        for p in range(idx.size):
            j = idx[p]
            b = _f32(base[j])
            for i in range(len(models)):
                out[i, p] = abs(_f32(models[i][j]) - b)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _all_abs(base, models, out, bbits, mbits, bmask, mmask, tops):
        """out[i] = |τᵢ| at every element; ``tops`` as in :func:`_split_range`."""
        b = np.empty(base.size, np.float32)
        widen(base, b)
        tops[0] = mag_max(bbits, bmask, tops[0])
        for i in range(len(models)):
            _abs_diff(models[i], b, out[i])
            tops[1 + i] = mag_max(mbits[i], mmask, tops[1 + i])

    @njit(nogil=True, boundscheck=False, cache=True)
    def _kth_key(vals, r):
        """The order key (below) of the r-th smallest (1-based) of the float32 ``vals``: rounds
        of a 4096-bin histogram over the keys keep only the bin holding it, until one key or a
        few values are left. Exact; 4-7x faster than ``np.partition`` on 32 K-400 K values."""
        u = vals.view(np.uint32)
        cur = np.empty(u.size, np.uint32)
        for j in range(u.size):            # ordered like the floats: negatives flipped, sign set
            x = u[j]
            cur[j] = ~x if x >> 31 else x | np.uint32(0x80000000)
        while True:
            lo_b = cur.min()
            span = np.uint64(cur.max() - lo_b)
            if span == 0:
                return lo_b
            if cur.size <= 64:
                return np.sort(cur)[r - 1]
            shift = 0
            while (span >> np.uint64(shift)) >= (1 << HIST_BITS):
                shift += 1
            counts = np.zeros((1 << HIST_BITS) + 1, np.int64)
            for x in cur:
                counts[(x - lo_b) >> shift] += 1
            seen = 0
            pick = 0
            for pick in range(counts.size):
                if seen + counts[pick] >= r:
                    break
                seen += counts[pick]
            nxt = np.empty(counts[pick], np.uint32)
            k = 0
            for x in cur:
                if (x - lo_b) >> shift == pick:
                    nxt[k] = x
                    k += 1
            r -= seen
            cur = nxt


def kth_value(vals: np.ndarray, r: int) -> float:
    """The r-th smallest (1-based) of the float32 array ``vals`` (no NaN), as ``np.partition``
    or ``torch.kthvalue`` give it (:func:`_kth_key`)."""
    key = int(_kth_key(vals, r))
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.uint32(bits).view(np.float32))


def samples(base: np.ndarray, models: tuple, idx: np.ndarray) -> np.ndarray:
    """Per model (rows), |τᵢ| at the sample positions ``idx``, from the views of
    :func:`..as_numpy`: one gather over the inputs (the torch way, a gather, a conversion, a
    subtraction and an absolute value per model, took 2.5 ms per SD1.5 key here; this and the
    bracket's selections 1.0 ms)."""
    out = np.empty((len(models), idx.size), np.float32)
    _sample_abs(base, models, idx, out)
    return out


def all_abs(base: np.ndarray, models: tuple) -> tuple[np.ndarray, list[int]]:
    """For a key small enough to select from whole: every |τᵢ| (a row per model) and each input's
    largest magnitude bits (BASE first), in one kernel call (the torch way, five conversions, a
    subtraction and an absolute value per model, then a selection each, cost 0.6 ms per key:
    0.45 s of the threshold pass's CPU time for SD1.5's 755 small keys, 5.2 M elements in all)."""
    bbits, bmask, mbits, mmask = input_bits(base, models)
    out = np.empty((len(models), base.size), np.float32)
    tops = np.zeros(len(models) + 1, np.int64)
    _all_abs(base, models, out, bbits, mbits, bmask, mmask, tops)
    return out, [int(t) for t in tops]


_stores = threading.local()


STORE_KEPT = 1 << 22     # float32 values (16 MB): the largest store a thread keeps between keys


def _store(n: int, width: int) -> np.ndarray:
    """This thread's store for :func:`split`, (n, width) float32, reused from key to key: a fresh
    one per key cost its page faults every time (about 0.6 GB of them per SD1.5 merge of 4 models).
    A larger one (a few of the largest keys) is made for its key alone, so that an idle thread
    holds at most 16 MB."""
    if n * width > STORE_KEPT:
        return np.empty((n, width), np.float32)
    buf = getattr(_stores, "buf", None)
    if buf is None or buf.size < n * width:
        buf = _stores.buf = np.empty(max(n * width, 1 << 16), np.float32)
    return buf[:n * width].reshape(n, width)


def split(base: np.ndarray, models: tuple, lo: np.ndarray, hi: np.ndarray, parts: list[tuple[int, int]],
          room: int, run, permute: bool = PERMUTE8) -> tuple[np.ndarray, list[np.ndarray], list[int]] | None:
    """Per model: how many |τᵢ| are below ``lo[i]``, and the values inside [lo[i], hi[i]]
    (unordered); and, read on the way, each input's largest magnitude bits (BASE first; to
    :func:`.magnitude.stats`). ``parts`` split the elements between the workers (``run`` maps a
    function over them), each storing at most ``room`` values per model; None when one
    overflowed (the caller then takes its exact fallback). ``permute``: AVX2's table permutes,
    not LLVM's compress (:data:`PERMUTE8`; only on a CPU with AVX2)."""
    n = len(models)
    table = LANE_TABLE if permute else None
    bbits, bmask, mbits, mmask = input_bits(base, models)

    def one(part):
        store = _store(n, room + LANES)
        below, inside = np.zeros(n, np.int64), np.zeros(n, np.int64)
        tops = np.zeros(n + 1, np.int64)
        _split_range(base, models, part[0], part[1], lo, hi, store, below, inside, table,
                     bbits, mbits, bmask, mmask, tops)
        # copied out before the thread's store serves its next key (another caller's, perhaps)
        kept = None if int(inside.max()) > room else [store[i, :inside[i]].copy() for i in range(n)]
        return kept, below, tops
    done = list(run(one, parts))
    if any(kept is None for kept, _, _ in done):
        return None
    below = sum(b for _, b, _ in done)
    vals = [done[0][0][i] if len(done) == 1 else np.concatenate([kept[i] for kept, _, _ in done]) for i in range(n)]
    tops = np.max([t for _, _, t in done], axis=0)
    return below, vals, [int(t) for t in tops]
