"""DELLA's dropout masks on the CPU without ranking every |τ| (numba): the masks ranking gives.

DELLA (sd-mecha ``find_della_dropout``) keeps element j of a task vector τ of N elements where
``u_j < g(rank_j)``: u_j the j-th uniform ``torch.bernoulli`` draws from the generator
(:mod:`.bernoulli`), rank_j the 1-based ascending rank of |τ_j| (ties by position), and

    g(r) = clamp(float32(1 − p) + (float32(r) / float32(N) − float32((N+1)/2N)) · float32(ε), 0, 1)

with every operation rounded to float32, as torch evaluates ``(rank / N − (N+1)/(2N)) · ε`` on
the ranks and adds it to the keep tensor ``1 − p`` (:func:`della_keep`). With
ε ≥ 0, g never decreases as r grows, so an element whose rank is only known to lie in [lo, hi]
is already decided when u < g(lo) (kept) or u ≥ g(hi) (dropped).

So instead of sorting (:mod:`.ranks`, a radix sort of every |τ|: 0.32 s per 15 M values):

1. **Bins.** |τ|'s float32 bit pattern orders as |τ|. Its top 12 bits pick one of 4,096 cells;
   a strided sample of 2^15 values says how full each cell is, and a full cell is split by its
   next bits, so that every bin holds about N/2^14 values.
2. **Histogram** of the bins (one pass, split between the worker threads): each bin's values
   have the ranks [C_b + 1, C_b + n_b], so per bin g(C_b + 1) and g(C_b + n_b) (exact float32,
   checked against torch's own evaluation).
3. **Decide** (one pass): kept where u < g(lo), dropped where u ≥ g(hi); the rest (a handful
   per tensor: those whose u falls in their bin's narrow band) are ambiguous and recorded.
4. **Resolve** (one pass, only if any): in position order, each element of a bin holding an
   ambiguous one is counted against the ambiguous ones' keys (smaller key: rank below; equal
   key, earlier position: rank below too), giving their exact ranks, then g(rank) decides.

Elements whose τ is ±0 are never resolved: whatever their mask, ±0 times it is the same ±0, so
the masked τ (what DELLA uses) is bit for bit the ranking path's; only such masks may differ.
Where a tensor has very many ambiguous elements (heavy ties, a huge ε) the caller ranks it as
before (:func:`masks` returns False, the generator left where it was).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import HAVE_NUMBA

CELL_SHIFT = 19             # cells: the top 12 of |τ|'s 31 bits (a 16 KB table)
SAMPLE = 1 << 15            # strided sample that sizes the cells' bins
BIN_TARGET = 1 << 14        # bins per tensor to aim at (each about N/2^14 values; tables in L2)
MIN_N = 1 << 16             # smaller tensors are ranked (the tables would cost more)
BLOCK = 1024                # elements whose keys are made at once
MAX_KEYS = 16               # distinct undecided keys a bin may hold (more: the caller ranks)
SPARE = 1024                # count slots for the bins without undecided keys (_ranks_of)
WIDE_AT = 1 << 31           # parts this long count in int64 (_ranks_of)

if HAVE_NUMBA:
    from numba import njit, types
    from numba.extending import overload

    from .convert import bits, f32

    def _key(src, j):
        """The order key of |τ_j|: the float32's pattern without its sign bit."""

    @overload(_key, inline="always")
    def _key_impl(src, j):
        """``src``: (BASE, M) views (τ = float32(M) − float32(BASE), as ``stack_taus``) or (τ,)."""
        if isinstance(src, types.BaseTuple) and len(src) == 2:
            def impl(src, j):
                return bits(f32(src[1][j]) - f32(src[0][j])) & np.uint32(0x7FFFFFFF)
        else:
            def impl(src, j):
                return bits(src[0][j]) & np.uint32(0x7FFFFFFF)
        return impl

    def _slice(src, s, e):
        """``src``'s elements [s, e)."""

    @overload(_slice, inline="always")
    def _slice_impl(src, s, e):
        if len(src) == 2:
            return lambda src, s, e: (src[0][s:e], src[1][s:e])
        return lambda src, s, e: (src[0][s:e],)

    @njit(inline="always")
    def _bin(cell, k):
        e = cell[k >> np.uint32(CELL_SHIFT)]        # unsigned all through: no negative-index wrap
        return (e >> np.uint32(5)) + ((k & np.uint32((1 << CELL_SHIFT) - 1)) >> (e & np.uint32(31)))

    @njit(inline="always")
    def _g(r, n32, c32, e32, kp):
        x = kp + (np.float32(r) / n32 - c32) * e32
        return min(max(x, np.float32(0.0)), np.float32(1.0))

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _sample(src, stride, out):
        for i in range(out.size):
            out[i] = _key(src, i * stride)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _keys(src, out):
        for j in range(out.size):
            out[j] = _key(src, j)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _hist(src, cell, counts):
        """counts[bin] += 1 per element; the keys made a block at a time first (a loop LLVM
        vectorizes: the conversions in the histogram's loop cost 3x)."""
        n = src[0].size
        buf = np.empty(BLOCK, np.uint32)
        for o in range(0, n, BLOCK):
            c = min(BLOCK, n - o)
            _keys(_slice(src, o, o + c), buf[:c])
            for j in range(c):
                counts[_bin(cell, buf[j])] += 1

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _tables(counts, n32, c32, e32, kp, below, lo, hi):
        """below[b] = values in bins before b; lo[b], hi[b] = g(below + 1), g(below + n_b) as the
        24-bit integers u24 is compared with (u < g ⟺ u24 < ⌈g·2²⁴⌉)."""
        acc = 0
        for b in range(counts.size):
            below[b] = acc
            nb = counts[b]
            if nb:
                lo[b] = np.uint32(math.ceil(np.float64(_g(acc + 1, n32, c32, e32, kp)) * 16777216.0))
                hi[b] = np.uint32(math.ceil(np.float64(_g(acc + nb, n32, c32, e32, kp)) * 16777216.0))
            acc += nb

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _g_of(ranks, n32, c32, e32, kp, out):
        for i in range(ranks.size):
            out[i] = _g(ranks[i], n32, c32, e32, kp)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _decide_block(keys, u24, cell, lo, hi, band, idx, out):
        """out[j] = 1 where u24_j < lo (kept), 2 where undecided (not kept, u24 < hi, τ ≠ 0),
        else 0; returns how many are undecided. First without the tables: every bin's
        [lo, hi) lies within ``band`` = (the least lo, the largest hi), so u24 below it is kept
        and at or above it dropped whatever the bin; only the elements inside it (a tenth at
        p = 0.9, ε = 0.1), gathered in ``idx``, look up their bin."""
        lo_min, hi_max = band[0], band[1]
        m = 0
        for j in range(u24.size):
            w = u24[j]
            out[j] = np.uint8(w < lo_min)
            idx[m] = j
            m += np.int64((w >= lo_min) & (w < hi_max))
        amb = 0
        for q in range(m):
            j = idx[q]
            k = keys[j]
            b = _bin(cell, k)
            w = u24[j]
            keep = np.uint8(w < lo[b])
            a = np.uint8(w < hi[b]) & np.uint8(k != 0) & (keep ^ np.uint8(1))
            out[j] = keep + a + a
            amb += a
        return amb

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _decide(src, u24, cell, lo, hi, band, out, amb_pos, amb_key, amb_u):
        """out[j] = u_j < g(lo of j's bin), by blocks (:func:`_decide_block`); the undecided
        ones (u in [g(lo), g(hi)), τ ≠ 0) set to 0 and recorded while there is room; returns
        how many there were."""
        cap = amb_pos.size
        a = 0
        n = u24.size
        buf = np.empty(BLOCK, np.uint32)
        idx = np.empty(BLOCK, np.int64)
        for o in range(0, n, BLOCK):
            c = min(BLOCK, n - o)
            keys = buf[:c]
            _keys(_slice(src, o, o + c), keys)
            if _decide_block(keys, u24[o:o + c], cell, lo, hi, band, idx, out[o:o + c]):
                for j in range(c):
                    if out[o + j] == 2:
                        out[o + j] = 0
                        if a < cap:
                            amb_pos[a] = o + j
                            amb_key[a] = keys[j]
                            amb_u[a] = u24[o + j]
                        a += 1
        return a

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _resolve(src, start, cell, slot, count, dkey, amb_pos, less, run, tie):
        """Over elements [start, start + len), in order: each element, against the distinct
        ambiguous keys of its bin, adds to ``less`` of the keys above its own and to ``run`` of
        one equal to it; the ambiguous element at ``amb_pos[p]`` (ascending, ended by one beyond
        this range) takes that ``run`` as ``tie[p]`` first.

        Float16 inputs make few distinct |τ| (heavy ties), so the bins holding undecided keys
        hold about half the elements, interleaved with the others. A bin with at most one
        undecided key (nearly all) is counted without a branch: ``slot[b]`` is its key's index
        in ``dkey``, or one of the spare indices after them for a bin with none (their counts
        are ignored); −(first + 1) marks a bin with several keys, which takes the loop over
        them. In a block where a quarter of the elements or more sit in such bins, every
        element is counted (into the spare slots when its bin has no key): a branch on it,
        taken half the time at random, cost more than the counting it saved. Sparser blocks
        skip the others with that branch, then well predicted."""
        p = 0
        nxt = amb_pos[0]                # the next ambiguous position, in a register
        n = src[0].size
        buf = np.empty(BLOCK, np.uint32)
        bins = np.empty(BLOCK, np.uint32)
        for o in range(0, n, BLOCK):
            c = min(BLOCK, n - o)
            _keys(_slice(src, o, o + c), buf[:c])
            hits = _bins_holding(buf[:c], cell, count, bins)
            if hits == 0:
                continue
            sparse = hits * 4 < c
            for i in range(c):
                if sparse and count[bins[i]] == 0:      # few hits: skipping is the cheaper branch
                    continue
                k = buf[i]
                d = slot[bins[i]]
                at = start + o + i
                if d < 0:                               # several keys: -(first + 1)
                    f = -d - 1
                    for d in range(f, f + count[bins[i]]):
                        key = dkey[d]
                        if k < key:
                            less[d] += 1
                        elif k == key:
                            if at == nxt:
                                tie[p] = run[d]
                                p += 1
                                nxt = amb_pos[p]
                            run[d] += 1
                    continue
                if at == nxt:
                    tie[p] = run[d]
                    p += 1
                    nxt = amb_pos[p]
                key = dkey[d]
                less[d] += less.dtype.type(k < key)
                run[d] += run.dtype.type(k == key)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _bins_holding(keys, cell, count, bins):
        """bins[i] = the bin of keys[i]; how many of them hold undecided keys (``count`` > 0):
        a loop without branches; a block without any is skipped whole by :func:`_resolve`."""
        hits = 0
        for i in range(keys.size):
            b = _bin(cell, keys[i])
            bins[i] = b
            hits += count[b] != 0
        return hits


def keep_of(p: float) -> float:
    """1 − p as the float32 value ``torch.bernoulli`` compares with (the keep tensor's)."""
    return float(torch.ones(1).sub_(p).clamp_(0, 1))


def della_keep(rank: torch.Tensor, n: int, p: float, eps: float) -> torch.Tensor:
    """DELLA's keep probabilities for the 1-based ``rank`` of each |τ| among the tensor's ``n``,
    as sd-mecha ``find_della_dropout`` computes them: clamp(1 − p + δ, 0, 1) with
    δ = ε·(rank/n − (n+1)/(2n)) (float32, torch's rounding)."""
    keep = torch.empty(rank.shape, dtype=torch.float32, device=rank.device).fill_(1.0).sub_(p)
    delta = (rank / n - (n + 1) / (n * 2)) * eps
    return keep.add_(delta.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)).clamp_(0, 1)


def _consts(n: int, p: float, eps: float):
    """float32 N, (N+1)/2N, ε and 1 − p, each as torch rounds it."""
    return np.float32(n), np.float32((n + 1) / (n * 2)), np.float32(eps), np.float32(keep_of(p))


def _cells(sample: np.ndarray, n: int) -> np.ndarray:
    """Per cell, (first bin << 5) | shift: a cell the sample finds full is split into
    2^(CELL_SHIFT − shift) bins by its next bits, so that each bin holds about N / BIN_TARGET
    values (at most 2^14 bins for one cell: the sample cannot find more than N in it)."""
    est = np.bincount(sample >> CELL_SHIFT, minlength=1 << (31 - CELL_SHIFT)).astype(np.float64) * (n / sample.size)
    target = max(n / BIN_TARGET, 1.0)
    split = np.zeros(est.size, np.int64)
    full = est > target
    split[full] = np.minimum(np.ceil(np.log2(est[full] / target)), CELL_SHIFT).astype(np.int64)
    first = np.concatenate(([0], np.cumsum(1 << split)[:-1]))
    return ((first << 5) | (CELL_SHIFT - split)).astype(np.uint32)


def _bins_of(keys: np.ndarray, cell: np.ndarray) -> np.ndarray:
    e = cell[keys >> CELL_SHIFT].astype(np.int64)
    return (e >> 5) + ((keys & ((1 << CELL_SHIFT) - 1)).astype(np.int64) >> (e & 31))


def g_values(ranks: np.ndarray, n: int, p: float, eps: float) -> np.ndarray:
    """g at the given 1-based ranks (float32), as the kernels compute it."""
    out = np.empty(ranks.size, np.float32)
    _g_of(np.ascontiguousarray(ranks, np.int64), *_consts(n, p, eps), out)
    return out


_warm: set = set()


def _compile(src: tuple, out: np.ndarray) -> None:
    """Compile (or load) every kernel :func:`masks` may call for these dtypes, on empty slices,
    before anything is drawn: a kernel numba cannot compile here then fails while the caller
    can still start again with torch (:func:`..kernels.compile_failed`)."""
    from . import bernoulli
    sig = (tuple(x.dtype for x in src), out.dtype)
    if sig in _warm:
        return
    e0 = tuple(x[:0] for x in src)
    z32, z64, cell = np.zeros(0, np.uint32), np.zeros(1, np.int64), np.zeros(1, np.uint32)
    _sample(e0, 1, z32)
    _hist(e0, cell, np.zeros(1, np.int32))
    _tables(z64[:0], *_consts(2, 0.5, 0.1), z64[:0], z32, z32)
    _g_of(z64, *_consts(2, 0.5, 0.1), np.zeros(1, np.float32))
    bernoulli.uniforms24(z32, torch.Generator())
    _decide(e0, z32, cell, z32, z32, np.zeros(2, np.uint32), out[:0], z64[:0], z32, z32)
    for wide in (np.int32, np.int64):             # the counts' width (_ranks_of)
        _resolve(e0, 0, cell, np.zeros(1, np.int32), np.zeros(1, np.int32), z32, z64, np.zeros(1, wide),
                 np.zeros(1, wide), z64)
    _warm.add(sig)


def applies(n: int, eps: float) -> bool:
    from . import available
    return available() and n >= MIN_N and 0.0 < eps < 1e30


def masks(src: tuple, n: int, p: float, eps: float, generator: torch.Generator, out: np.ndarray,
          parts: list[tuple[int, int]], run) -> bool:
    """Write DELLA's keep mask of one tensor into ``out`` (n values, uint8 or float32): the same
    τ⊙mask as ``torch.bernoulli(della_keep(ranks))`` with ``generator``, which ends as far advanced.
    ``src``: (BASE, M) kernel views or (τ,) float32; ``parts`` of the elements mapped over the
    workers by ``run``. False (nothing drawn) where this does not apply or too many elements are
    ambiguous: the caller ranks."""
    from ..tensor_ops import scratch
    from . import bernoulli
    if not applies(n, eps):
        return False
    _compile(src, out)
    consts = _consts(n, p, eps)
    stride = max(n // SAMPLE, 1)
    sample = np.empty(n // stride, np.uint32)
    _sample(src, stride, sample)
    cell = _cells(sample, n)
    nbins = int((cell[-1] >> 5) + (1 << (CELL_SHIFT - (cell[-1] & 31))))

    def piece(s, e):
        return tuple(x[s:e] for x in src)

    def hist(part):
        counts = np.zeros(nbins, np.int32)
        _hist(piece(*part), cell, counts)
        return counts
    counts = sum(run(hist, parts), np.zeros(nbins, np.int64))
    below = np.empty(nbins, np.int64)
    lo, hi = np.zeros(nbins, np.uint32), np.zeros(nbins, np.uint32)
    _tables(counts, *consts, below, lo, hi)
    used = np.flatnonzero(counts)
    band = np.array([lo[used].min(), hi[used].max()], np.uint32)     # every element's bin is a used one
    check = used[np.linspace(0, used.size - 1, min(used.size, 64)).astype(np.int64)]
    ranks = np.concatenate((below[check] + 1, below[check] + counts[check]))
    torch_g = della_keep(torch.from_numpy(ranks), n, p, eps).numpy()
    if not np.array_equal(torch_g.view(np.uint32), g_values(ranks, n, p, eps).view(np.uint32)):
        return False            # torch rounds g otherwise than this module: rank as before

    saved = generator.get_state()
    u24 = bernoulli.uniforms24(scratch("della_u24", n, torch.int32).numpy().view(np.uint32), generator)

    def decide(part):
        s, e = part
        cap = (e - s) // 16 + 256
        pos, key, u = np.empty(cap, np.int64), np.empty(cap, np.uint32), np.empty(cap, np.uint32)
        a = _decide(piece(s, e), u24[s:e], cell, lo, hi, band, out[s:e], pos, key, u)
        return (pos[:a] + s, key[:a], u[:a]) if a <= cap else None
    found = list(run(decide, parts))
    if any(f is None for f in found):
        generator.set_state(saved)
        return False
    pos = np.concatenate([f[0] for f in found])
    if pos.size:
        key = np.concatenate([f[1] for f in found])
        u = np.concatenate([f[2] for f in found]).astype(np.float32) * np.float32(2.0 ** -24)
        rank = _ranks_of(src, pos, key, cell, below, nbins, parts, run)
        if rank is None:
            generator.set_state(saved)
            return False
        out[pos] = u < g_values(rank, n, p, eps)
    return True


def _ranks_of(src, pos, key, cell, below, nbins, parts, run) -> np.ndarray | None:
    """The exact 1-based ranks of the ambiguous elements (positions ``pos``, ascending; keys
    ``key``): their bin's ``below`` + how many in the bin have a smaller key + how many before
    them have the same key + 1 (:func:`_resolve`, one pass per part, parts in position order).
    None where a bin holds more than :data:`MAX_KEYS` distinct ambiguous keys."""
    dkey = np.unique(key)
    bins, starts, cnts = np.unique(_bins_of(dkey, cell), return_index=True, return_counts=True)
    if cnts.max() > MAX_KEYS:
        return None
    count = np.zeros(nbins, np.int32)
    count[bins] = cnts
    # bins without a key count into SPARE slots after the keys, one picked by the bin's low bits:
    # with one shared slot, every other element's add waited on the last one's (a chain through
    # memory: 3x slower)
    slot = (dkey.size + (np.arange(nbins) & (SPARE - 1))).astype(np.int32)
    slot[bins] = np.where(cnts > 1, -starts - 1, starts)
    dkey = np.append(dkey, np.zeros(SPARE, np.uint32))
    d = np.searchsorted(dkey[:-SPARE], key)
    ends = np.concatenate((pos, [np.iinfo(np.int64).max]))

    def one(part):
        s, e = part
        a0, a1 = np.searchsorted(pos, [s, e])
        wide = np.int64 if e - s >= WIDE_AT else np.int32     # int32 adds ran faster in _resolve
        less = np.zeros(dkey.size, wide)
        seen = np.zeros(dkey.size, wide)
        tie = np.zeros(a1 - a0 + 1, np.int64)
        _resolve(tuple(x[s:e] for x in src), s, cell, slot, count, dkey, ends[a0:], less, seen, tie)
        return a0, a1, less, seen, tie[:-1]
    done = list(run(one, parts))
    less = sum(x[2].astype(np.int64) for x in done)
    tie = np.empty(pos.size, np.int64)
    before = np.zeros(dkey.size, np.int64)
    for a0, a1, _, seen, t in done:             # equal keys in earlier parts come before
        tie[a0:a1] = t + before[d[a0:a1]]
        before += seen
    return below[_bins_of(key, cell)] + less[d] + tie + 1
