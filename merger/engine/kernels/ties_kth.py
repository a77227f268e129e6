"""TIES's exact per-model thresholds on the CPU in one streamed pass over the inputs (numba).

For each model i the threshold is the k-th smallest |τᵢ| = |float32(Mᵢ) − float32(BASE)| over a
key. A fixed sample gives each model a bracket [loᵢ, hiᵢ] holding that value (``ties._bracket``);
then one pass over the key, split between the worker threads, reads BASE and every Mᵢ once per
element and, per model, counts the |τᵢ| below loᵢ and stores those inside [loᵢ, hiᵢ] (about 3% of
them) with a vector compress (AVX-512's ``vcompressps``; on AVX2 without AVX-512, table
permutes: :data:`PERMUTE8`), in one loop written as LLVM IR (:func:`_split_block`) whose values
never leave the registers. A histogram selection over the stored values gives the exact k-th.

Why numba: the pass is a loop torch cannot express (compaction: inductor cannot write a
data-dependent number of values) and numpy needs several passes and bool arrays for. Measured
here (2 cores), per 15 M-element fp16 key and 4 models: 14 ms for the pass, against 65 ms for
the chunked torch + numpy path it replaces (which stays as the fallback); over SD1.5's keys,
thresholds 2.6 s instead of 6.0 s key by key, and 1.6-2.1 s with every key's first
(``ties.ties_prefetch``); the pass's loop in registers then halved the pass's time again (one
thread's CPU time over SD1.5's keys: 2.2 → 1.2 s). numba brings its own LLVM, so no C compiler
is needed.

The inputs come as the numpy views of :func:`..kernels.as_numpy`; their conversions
(:mod:`.convert`) are exact, so |τ| is bit for bit torch's mixed-dtype subtraction.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from . import HAVE_NUMBA, host_features
from .magnitude import input_bits

BLOCK = 2048         # positions per call of the fused loop (each store's room is checked per call)
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
    from .convert import to_float32, widen
    from .vectors import compress, declare, load, loop, splat, table_permute
    from .vectors import count as count_lanes
    from .vectors import store as store_vector
    from .magnitude import mag_max

    def _bits_type(kind):
        return ir.IntType(32 if kind == types.float32 else 16)

    @intrinsic
    def _split_block(typingctx, base, models, o, c, lo, hi, store, inside, below, tops, table):
        """Positions [o, o + c) (c > 0, a multiple of the step) of :func:`_split_range`, as one
        loop whose values stay in registers: per step of 16 positions (8 where ``table`` is
        given: AVX2's permutes), BASE's values are loaded and converted once; per model, |τᵢ| is
        made, compared with loᵢ and hiᵢ, those inside stored at ``store[i, inside[i]:]`` in order
        (a vector compress, or a table permute, writing all the step's slots: ``store`` needs that
        many spare), and the counts and each input's largest magnitude bits are kept in
        registers; written back after the loop (``inside``, ``below``: as :func:`_split_range`;
        ``tops``: maxima). The caller makes sure no store can overflow (c ≤ its room). The arrays are
        read at their data pointer plus an index, so all but ``store`` (whose rows are found by
        their stride) must be contiguous; other layouts are refused when the call is typed.

        Measured here (one thread, 4 models, 2^18-2^22 positions, every format and both
        packings): 1.7-2.2x the speed of the loops it replaced (for float16 1.2-1.4 against
        0.63-0.72 G positions/s in one run, 0.75-0.82 against 0.40-0.41 in a slower one). Those
        made a block of |τᵢ| per model, stored it, read it back to compress it, and scanned each
        input's magnitudes apart; LLVM kept them at 256 bits, as it prefers on Intel's AVX-512
        CPUs, and their set-up per block cost about as much as their work."""
        if any(a.layout != "C" for a in (base, models.dtype, lo, hi, inside, below, tops)):
            return None                 # read at data + index: contiguous arrays only (store: rows by stride)
        permute = not isinstance(table, types.NoneType)
        lanes = 8 if permute else LANES
        n, kind, bkind = models.count, models.dtype.dtype, base.dtype
        sig = types.int64(base, models, types.int64, types.int64, lo, hi, store, inside, below, tops, table)
        pack = table_permute if permute else compress

        def gen(context, builder, sig, args):
            i64, fv = ir.IntType(64), ir.VectorType(ir.FloatType(), lanes)
            arr = [context.make_array(t)(context, builder, v) if isinstance(t, types.Array) else None
                   for t, v in zip(sig.args, args)]
            mas = [context.make_array(sig.args[1].dtype)(context, builder, builder.extract_value(args[1], i))
                   for i in range(n)]
            o_, c_ = args[2], args[3]
            loa, hia, sta, ka, bea, ta = arr[4:10]
            tbl = arr[10].data if permute else None

            def at(a, i):
                return builder.gep(a.data, [ir.Constant(i64, i)])
            los = [splat(builder, builder.load(at(loa, i)), lanes) for i in range(n)]
            his = [splat(builder, builder.load(at(hia, i)), lanes) for i in range(n)]
            stride, byte = builder.extract_value(sta.strides, 0), ir.IntType(8).as_pointer()
            rows = [builder.bitcast(builder.gep(builder.bitcast(sta.data, byte), [builder.mul(stride, ir.Constant(i64, i))]),
                                    sta.data.type) for i in range(n)]
            k0 = [builder.load(at(ka, i)) for i in range(n)]
            src = [builder.gep(arr[0].data, [o_])] + [builder.gep(m.data, [o_]) for m in mas]
            kinds = [bkind] + [kind] * n
            bit_t = [ir.VectorType(_bits_type(k), lanes) for k in kinds]
            mag_masks = [ir.Constant(t, [(1 << (t.element.width - 1)) - 1] * lanes) for t in bit_t]
            fabs = declare(builder, f"llvm.fabs.v{lanes}f32", fv, [fv])

            def umax(x, y):
                return builder.select(builder.icmp_unsigned(">", x, y), x, y)
            entry, j, close = loop(builder, "split_block")
            ks, ges = [builder.phi(i64) for _ in range(n)], [builder.phi(i64) for _ in range(n)]
            tps = [builder.phi(t) for t in bit_t]
            for i in range(n):
                ks[i].add_incoming(k0[i], entry)
                ges[i].add_incoming(ir.Constant(i64, 0), entry)
            for p, t in zip(tps, bit_t):
                p.add_incoming(ir.Constant(t, [0] * lanes), entry)
            raws = [load(builder, s, j, lanes) for s in src]
            new_tops = [umax(p, builder.and_(builder.bitcast(r, t), m))
                        for p, r, t, m in zip(tps, raws, bit_t, mag_masks)]
            b = to_float32(builder, raws[0], bkind)
            new_k, new_ge = [], []
            for i in range(n):
                a = builder.call(fabs, [builder.fsub(to_float32(builder, raws[1 + i], kind), b)])
                ge = builder.fcmp_ordered(">=", a, los[i])
                keep = builder.and_(ge, builder.fcmp_ordered("<=", a, his[i]))
                store_vector(builder, pack(builder, a, keep, tbl), rows[i], ks[i])
                new_k.append(builder.add(ks[i], count_lanes(builder, keep)))
                new_ge.append(builder.add(ges[i], count_lanes(builder, ge)))
            end = close(lanes, c_)
            for phis, vals in ((ks, new_k), (ges, new_ge), (tps, new_tops)):
                for p, v in zip(phis, vals):
                    p.add_incoming(v, end)
            for i in range(n):
                builder.store(new_k[i], at(ka, i))
                p = at(bea, i)
                builder.store(builder.add(builder.load(p), builder.sub(c_, new_ge[i])), p)
            for i, (v, t) in enumerate(zip(new_tops, bit_t)):
                red = declare(builder, f"llvm.vector.reduce.umax.v{lanes}i{t.element.width}", t.element, [t])
                top, p = builder.zext(builder.call(red, [v]), i64), at(ta, i)
                old = builder.load(p)
                builder.store(builder.select(builder.icmp_signed(">", top, old), top, old), p)
            return ir.Constant(i64, 0)
        return sig, gen

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _abs_diff(m, b, a):
        """a[:n] = |m − b[:n]| for the n values of the slice ``m``.

        The hot loops take slices and index them from 0: indexing with ``o + j`` kept LLVM from
        proving the index non-negative (numba wraps negative indices), and the loop ran 5x slower
        unvectorized. They are separate functions for the same reason."""
        for j in range(m.size):
            a[j] = abs(_f32(m[j]) - b[j])

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _split_range(base, models, start, stop, lo, hi, store, below, inside, table,
                     bbits, mbits, bmask, mmask, tops):
        """Over elements [start, stop): per model i, add to ``below[i]`` how many |τᵢ| are below
        ``lo[i]`` (or NaN) and to ``inside[i]`` how many are in [lo[i], hi[i]], storing those in
        ``store[i]`` while it has room (the caller compares). ``table``: :data:`LANE_TABLE` for
        AVX2's permutes, None for LLVM's vector compress (the branch not taken is pruned before
        typing). On the way, the inputs' NaN/Inf check: ``tops[0]`` (BASE) and ``tops[1 + i]``
        (model i) become the largest magnitude bits (:func:`.magnitude.mag_max`) of ``bbits``
        and ``mbits[i]``, the inputs' unsigned views, under ``bmask``/``mmask``.

        Blocks of positions go to :func:`_split_block` as long as every store has room for all
        of them; the rest (a block's last < 16 positions, or stores about to overflow) one value
        at a time here."""
        n = len(models)
        cap = store.shape[1] - LANES
        o = start
        while o < stop:
            c = min(BLOCK, stop - o)
            fast = min(c, cap - inside.max())
            fast -= fast % LANES
            if fast > 0:
                _split_block(base, models, o, fast, lo, hi, store, inside, below, tops, table)
            for j in range(o + max(fast, 0), o + c):
                b = _f32(base[j])
                tops[0] = max(tops[0], bbits[j] & bmask)
                for i in range(n):
                    v = abs(_f32(models[i][j]) - b)
                    tops[1 + i] = max(tops[1 + i], mbits[i][j] & mmask)
                    if not v >= lo[i]:
                        below[i] += 1
                    elif v <= hi[i]:
                        if inside[i] < cap:
                            store[i, inside[i]] = v
                        inside[i] += 1
            o += c

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

    @njit(inline="always")
    def _shift_for(span):
        """The shift that maps keys ``span`` apart onto the histogram's 4096 bins."""
        shift = 0
        while (np.uint64(span) >> np.uint64(shift)) >= (1 << HIST_BITS):
            shift += 1
        return shift

    @njit(inline="always")
    def _counts(keys, lo_b, shift):
        """Per bin (key − lo_b) >> shift, how many ``keys`` fall in it; those below ``lo_b`` or
        past the last bin are counted in one more, the guard (they wrap around as uint64)."""
        guard = np.uint64(1 << HIST_BITS)
        counts = np.zeros((1 << HIST_BITS) + 1, np.int64)
        for x in keys:
            counts[min(np.uint64(x - lo_b) >> np.uint64(shift), guard)] += 1
        return counts

    @njit(inline="always")
    def _gather(keys, lo_b, shift, pick, size):
        """The ``size`` keys of bin ``pick``, in order."""
        nxt = np.empty(size, np.uint32)
        k = 0
        want = np.uint64(pick)
        for x in keys:
            if np.uint64(x - lo_b) >> np.uint64(shift) == want:
                nxt[k] = x
                k += 1
        return nxt

    @njit(nogil=True, boundscheck=False, cache=True)
    def _kth_of(cur, r):
        """The r-th smallest (1-based) of the uint32 keys ``cur``: rounds of a 4096-bin histogram
        over them keep only the bin holding it, until one key or a few are left."""
        while True:
            lo_b = cur.min()
            span = cur.max() - lo_b
            if span == 0:
                return lo_b
            if cur.size <= 64:
                return np.sort(cur)[r - 1]
            shift = _shift_for(span)
            counts = _counts(cur, lo_b, shift)
            seen = 0
            pick = 0
            while seen + counts[pick] < r:
                seen += counts[pick]
                pick += 1
            cur = _gather(cur, lo_b, shift, pick, counts[pick])
            r -= seen

    @njit(nogil=True, boundscheck=False, cache=True)
    def _kth_key(vals, r):
        """The order key (below) of the r-th smallest (1-based) of the float32 ``vals``
        (:func:`_kth_of` on the keys). Exact; 4-7x faster than ``np.partition`` on 32 K-400 K
        values."""
        u = vals.view(np.uint32)
        cur = np.empty(u.size, np.uint32)
        for j in range(u.size):            # ordered like the floats: negatives flipped, sign set
            x = u[j]
            cur[j] = ~x if x >> 31 else x | np.uint32(0x80000000)
        return _kth_of(cur, r)

    @njit(nogil=True, boundscheck=False, cache=True)
    def _kth_abs_keys(vals, ranks, lo_b, hi_b, keys):
        """For :func:`kth_abs`: ``keys[t]`` = the order key (as :func:`_kth_key`'s) of the
        ``ranks[t]``-th smallest of ``vals`` (ranks ascending), whose bits are those of floats
        without sign or NaN (magnitudes), which order them as the floats do: the first round of
        :func:`_kth_of` over the raw bits in [lo_b, hi_b] (the whole range when lo_b > hi_b), no
        converted copy, for every rank at once; then :func:`_kth_of` on each rank's bin. False,
        writing nothing, where a value lies outside the range given."""
        u = vals.view(np.uint32)
        if lo_b > hi_b:
            lo_b = u.min()
            hi_b = u.max()
        shift = _shift_for(hi_b - lo_b)
        counts = _counts(u, lo_b, shift)
        if counts[1 << HIST_BITS] > 0:
            return False
        seen = 0
        pick = 0
        for t in range(ranks.size):
            r = ranks[t]
            while seen + counts[pick] < r:
                seen += counts[pick]
                pick += 1
            bits = _kth_of(_gather(u, lo_b, shift, pick, counts[pick]), r - seen)
            keys[t] = bits | np.uint32(0x80000000)          # a magnitude's order key
        return True


def bracket_ranks(kth: int, n: int, size: int) -> tuple[int | None, int | None]:
    """The 1-based ranks, in a sample of ``size`` of ``n`` values, of a bracket that holds the
    k-th smallest of all of them with overwhelming probability (6 standard deviations of the
    sample quantile, plus 32); None for an open end."""
    q = kth / n
    margin = 6 * math.sqrt(size * q * (1 - q)) + 32
    lo_i, hi_i = int(q * size - margin), int(q * size + margin)
    return (lo_i + 1 if 0 < lo_i < size - 1 else None), (hi_i + 1 if 0 < hi_i < size - 1 else None)


def room_for(n: int, frac: float) -> int:
    """Room for the values of ``n`` inside a bracket that held the fraction ``frac`` of a sample:
    that share, +25% and 8 standard deviations, + 1024."""
    return int(n * frac * 1.25 + 8 * math.sqrt(n * frac) + 1024)


def kth_value(vals: np.ndarray, r: int) -> float:
    """The r-th smallest (1-based) of the float32 array ``vals`` (no NaN), as ``np.partition``
    or ``torch.kthvalue`` give it (:func:`_kth_key`)."""
    return _value(int(_kth_key(vals, r)))


def _value(key: int) -> float:
    """The float32 whose order key (:func:`_kth_key`) is ``key``."""
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.uint32(bits).view(np.float32))


def kth_abs(vals: np.ndarray, ranks: list[int], lo: float | None = None, hi: float | None = None) -> list[float]:
    """The ``ranks`` smallest (1-based, any order) of the float32 magnitudes ``vals`` (no sign
    bit, no NaN: |τ| values), as :func:`kth_value` gives them, from one histogram over their
    raw bits (:func:`_kth_abs_keys`): no converted copy, and one round for several ranks.
    ``lo``/``hi`` (finite, both): bounds known to hold every value (a store's bracket), which
    spare a scan for them. Measured here: both bracket ends of SD1.5's samples in 0.17 s of one
    thread's time against 0.20-0.27 s for two :func:`kth_value` calls each; a 400 K-value store
    1.43 against 1.63 ns a value (the histogram's scattered increments are most of the cost:
    large stores go through :mod:`.band` first)."""
    order = sorted(range(len(ranks)), key=lambda t: ranks[t])
    keys = np.empty(len(ranks), np.uint32)
    sorted_ranks = np.array([ranks[t] for t in order], np.int64)
    lo_b = hi_b = None
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        lo_b, hi_b = (int(np.float32(x).view(np.uint32)) for x in (max(lo, 0.0), hi))
    if lo_b is None or not _kth_abs_keys(vals, sorted_ranks, np.uint32(lo_b), np.uint32(hi_b), keys):
        _kth_abs_keys(vals, sorted_ranks, np.uint32(1), np.uint32(0), keys)
    out = [0.0] * len(ranks)
    for t, key in zip(order, keys):
        out[t] = _value(int(key))
    return out


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
          room: int, run, permute: bool = PERMUTE8, borrow: bool = False) -> tuple[np.ndarray, list[np.ndarray], list[int]] | None:
    """Per model: how many |τᵢ| are below ``lo[i]``, and the values inside [lo[i], hi[i]]
    (unordered); and, read on the way, each input's largest magnitude bits (BASE first; to
    :func:`.magnitude.stats`). ``parts`` split the elements between the workers (``run`` maps a
    function over them), each storing at most ``room`` values per model; None when one
    overflowed (the caller then takes its exact fallback). ``permute``: AVX2's table permutes,
    not LLVM's compress (:data:`PERMUTE8`; only on a CPU with AVX2). ``borrow`` (one part, run
    on the calling thread): the values are views of this thread's store, valid until its next
    call, not copies (copying them out took 0.1 s of the CPU time of SD1.5's thresholds)."""
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
        kept = None if int(inside.max()) > room else [
            store[i, :inside[i]] if borrow else store[i, :inside[i]].copy() for i in range(n)]
        return kept, below, tops
    done = list(run(one, parts))
    if any(kept is None for kept, _, _ in done):
        return None
    below = sum(b for _, b, _ in done)
    vals = [done[0][0][i] if len(done) == 1 else np.concatenate([kept[i] for kept, _, _ in done]) for i in range(n)]
    tops = np.max([t for _, _, t in done], axis=0)
    return below, vals, [int(t) for t in tops]
