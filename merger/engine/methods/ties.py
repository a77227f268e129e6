"""ties: TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint mean."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..compiled import MIN_NUMEL, compiled, enabled, usable
from ..tensor_ops import is_fp8, scratch
from .. import kernels
from ..kernels import band, magnitude, ties_combine, ties_kth
from . import INPUT_STATS, MethodArgs, method, remembered, stack_taus

SMALL = 1 << 17        # at most this many elements are selected from directly
SAMPLE = 1 << 15       # the largest sample bracketing the k-th value of a larger tensor
SAMPLE_MIN = 1 << 12   # the smallest (see sample_size)
SPLIT_CHUNK = 1 << 18  # elements of |τ| per step of the threshold pass (2^18 beat 2^17, 2^19, 2^20)
CHUNK = 1 << 19        # elements per model per step of the elementwise combination (2^19 beat
#                        2^13..2^18 and 2^20 on 2 cores: per-op overhead outweighs cache residency)
GPU_CHUNK = 1 << 22    # on a GPU, where each op's launch, not the cache, is the cost


def select(x: torch.Tensor, kths: list[int]) -> list[float]:
    """The ``kths`` smallest values (1-based) of the 1-D tensor ``x``, as ``x.kthvalue(k)``: on
    the CPU a histogram selection (:func:`.ties_kth.kth_value`) for float32, else one
    ``numpy.partition`` (introselect) for all of them, 2-4x faster than ``kthvalue``."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and kernels.available():
        a = x.detach().contiguous().numpy()
        try:
            return [ties_kth.kth_value(a, k) for k in kths]
        except Exception as e:
            if not kernels.compile_failed(e):
                raise
    if x.device.type == "cpu":
        part = np.partition(x.detach().numpy(), [k - 1 for k in kths])
        return [float(part[k - 1]) for k in kths]
    return [float(x.kthvalue(k).values) for k in kths]


def sample_size(n: int) -> int:
    """The sample size for a tensor of ``n`` values: the power of two nearest (n/2)^(2/3), within
    [SAMPLE_MIN, SAMPLE]. A sample of S positions costs about 38 ns a position here (5 random
    reads and 4 models' selections) and brackets 4.8/√S + 64/S of each model's values, which
    the pass stores and a selection reads at about 2 ns each: the sum is least near
    S = (n/2)^(2/3), 2^15 for SD1.5's 15 M-value convolutions, 2^13 for its 1.6 M-value
    attention weights. (One 2^15 for every size took 15-20% more CPU time over SD1.5's
    thresholds: 2.1-3.1 against 1.8-2.2 s on one thread, in turns.)"""
    want = (n / 2) ** (2 / 3)
    return max(SAMPLE_MIN, min(SAMPLE, 1 << max(round(math.log2(want)), 0)))


def _sample_index(n: int, device) -> torch.Tensor:
    """:func:`sample_size` positions drawn with a generator seeded by ``n`` (the same for every
    tensor of that size), sorted so that reading them from a memory-mapped file walks its pages
    in order."""
    return _sample_index_cpu(n, sample_size(n)).to(device)


@functools.lru_cache(maxsize=32)
def _sample_index_np(n: int) -> np.ndarray:
    return _sample_index_cpu(n, sample_size(n)).numpy()


@functools.lru_cache(maxsize=32)           # a model has few distinct sizes; 0.5 MB each
def _sample_index_cpu(n: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, n, (size,), generator=gen).sort().values


def _ranks(kth: int, n: int) -> tuple[int | None, int | None]:
    """The sample ranks of the bracket of the k-th smallest of ``n`` values
    (:func:`.ties_kth.bracket_ranks` for a sample of :func:`sample_size`)."""
    return ties_kth.bracket_ranks(kth, n, sample_size(n))


def _bracket(sample: torch.Tensor, kth: int, n: int) -> tuple[float | None, float | None]:
    """[lo, hi] from a sample of |τ| at :func:`_ranks`; None for an open end."""
    ranks = _ranks(kth, n)
    ends = [r for r in ranks if r is not None]
    vals = dict(zip(ends, select(sample, ends)))
    return vals.get(ranks[0]), vals.get(ranks[1])


def kth_smallest(x: torch.Tensor, kth: int) -> float:
    """The ``kth`` smallest value (1-based) of the 1-D tensor ``x``, exactly ``x.kthvalue(kth)``.

    Large tensors avoid a full selection: a fixed sample brackets the answer in [lo, hi]; one
    pass counts the values below lo, one gathers those inside, and the selection runs on that
    small set (about 2% of the values). If the bracket misses (vanishingly rare, e.g. heavy
    ties), it falls back to a selection over all values."""
    n = x.numel()
    if n <= SMALL:
        return select(x, [kth])[0]
    lo, hi = _bracket(x[_sample_index(n, x.device)], kth, n)
    m1, m2 = scratch("kth_mask", n, torch.bool, x.device), scratch("kth_mask2", n, torch.bool, x.device)
    if x.device.type == "cpu" and x.dtype == torch.float32:    # numpy's compares are faster here
        below, vals = _np_split(x.numpy(), *_np_ends(lo, hi), m1.numpy(), m2.numpy())
        inside = torch.from_numpy(vals)
    else:
        below, inside = _split(x, lo, hi, m1, m2)
    r = kth - below
    if not 1 <= r <= inside.numel():           # the bracket missed: select from all
        inside, r = x, kth
    return select(inside, [r])[0]


def _split(a: torch.Tensor, lo: float | None, hi: float | None, m1: torch.Tensor,
           m2: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(how many values of ``a`` are below ``lo``, a new tensor of those in [lo, hi]); ``m1`` and
    ``m2`` are bool scratch of ``a``'s size. lo ≤ a ≤ hi is computed as (a ≤ hi) xor (a < lo)."""
    below = int(torch.count_nonzero(torch.lt(a, lo, out=m1))) if lo is not None else 0
    if lo is not None and hi is not None:
        return below, a[torch.le(a, hi, out=m2).logical_xor_(m1)]
    if lo is not None:
        return below, a[torch.ge(a, lo, out=m2)]
    if hi is not None:
        return below, a[torch.le(a, hi, out=m2)]
    return below, a.clone()


def trim_rank(density: float, n: int) -> int:
    """The rank k of the threshold among ``n`` magnitudes: k = max(⌊(1 − density)·n⌋, 1); k = 1
    trims nothing."""
    return max(int((1 - density) * n), 1)


def thresholds(taus: torch.Tensor, density: float) -> torch.Tensor | None:
    """Per τᵢ, the magnitude below which TIES trims it, shape (n, 1); None when nothing is trimmed.

    As sd-mecha ``filter_top_k``: with N elements, the threshold is the k-th smallest |τᵢ| for
    k = max(⌊(1 − density)·N⌋, 1), and every element with |τ| ≥ threshold is kept (so ties at the
    threshold are all kept, density 1 keeps everything and density 0 keeps the largest)."""
    n, flat = taus.shape[0], taus.reshape(taus.shape[0], -1)
    kth = trim_rank(density, flat.shape[1])
    if kth == 1:
        return None
    out = torch.empty(n, 1, dtype=torch.float32, device=taus.device)
    for i in range(n):
        mag = torch.abs(flat[i], out=scratch("trim_mag", flat.shape[1], torch.float32, taus.device))
        out[i] = kth_smallest(mag, kth)
    return out


def input_thresholds(base: torch.Tensor, models: list[torch.Tensor], density: float,
                     parallel: bool = True, stats: list | None = None) -> torch.Tensor | None:
    """:func:`thresholds` of τᵢ = Mᵢ − BASE straight from the inputs, without the stacked float32
    task vectors: the same exact k-th smallest |τᵢ| (same sample, same bracket), from one numba
    pass over the inputs (:func:`_numba_kths`) or, where that does not apply, chunk by chunk per
    model (:func:`_input_kth`). ``parallel``: split the work between the workers (else run it
    all on the calling thread, itself a worker in :func:`ties_prefetch`).

    ``stats``: where the numba pass ran, it receives each input's (no NaN/Inf, largest |value|),
    BASE first, as :func:`..tensor_ops.finite_top` gives them, read on the way; the thresholds
    are then NaN if an input is not finite (a merge refuses such inputs before using them)."""
    flat_b = base.reshape(-1)
    total = flat_b.numel()
    kth = trim_rank(density, total)
    if kth == 1:
        return None
    out = torch.empty(len(models), 1, dtype=torch.float32)
    flat_ms = [m.reshape(-1) for m in models]
    run = kernels.workers().map if parallel else map
    try:
        found = _numba_kths(flat_b, flat_ms, kth, run, kernels.parts(total, ties_kth.BLOCK) if parallel else [(0, total)],
                            stats)
    except Exception as e:
        if not kernels.compile_failed(e):
            raise
        found = None
    if found is None and total <= SMALL:
        b = flat_b.float()
        found = [select((m.float() - b).abs_(), [kth])[0] for m in flat_ms]
    if found is None:
        idx = _sample_index(total, "cpu")
        sb = flat_b[idx].float()
        found = list(run(lambda m: _input_kth(flat_b, m, idx, sb, kth), flat_ms))
    out[:, 0] = torch.tensor(found)
    return out


def _numba_kths(flat_b: torch.Tensor, flat_ms: list[torch.Tensor], kth: int, run,
                parts: list[tuple[int, int]], stats: list | None = None) -> list[float] | None:
    """The k-th smallest |τᵢ| of every model from one pass over the inputs (:mod:`..kernels.ties_kth`),
    its element ``parts`` mapped by ``run``; None where that does not apply (numba missing, a
    dtype other than float16/bfloat16/float32, models of different dtypes, a store overflowed).
    ``stats``: see :func:`input_thresholds` (NaN thresholds, no selection, for a non-finite input)."""
    if not kernels.available() or len({m.dtype for m in flat_ms}) != 1:
        return None
    b, ms = kernels.as_numpy(flat_b), tuple(kernels.as_numpy(m) for m in flat_ms)
    if b is None or any(m is None for m in ms):
        return None
    if b.size <= SMALL:                        # selected from whole
        rows, tops = ties_kth.all_abs(b, ms)
        if not _seen(b, ms, tops, stats):
            return [math.nan] * len(ms)
        return [ties_kth.kth_abs(row, [kth])[0] for row in rows]
    lo, hi, frac = _brackets(b, ms, kth)
    step = parts[0][1]
    room = ties_kth.room_for(step, frac)
    got = ties_kth.split(b, ms, lo, hi, parts, room, run, borrow=len(parts) == 1 and run is map)
    if got is None:
        return None
    below, vals, tops = got
    if not _seen(b, ms, tops, stats):
        return [math.nan] * len(ms)

    def pick(i: int) -> float:
        r = kth - int(below[i])
        if not 1 <= r <= vals[i].size:         # the bracket missed: select from all
            return select((flat_ms[i].float() - flat_b.float()).abs_(), [kth])[0]
        return band.kth_in_store(vals[i], r, float(lo[i]), float(hi[i]))
    return list(run(pick, range(len(ms))))


def _seen(b: np.ndarray, ms: tuple, tops: list[int], stats: list | None) -> bool:
    """Whether every input is finite, from their largest magnitude bits; their stats into ``stats``."""
    seen = [magnitude.stats(v, top) for v, top in zip((b, *ms), tops)]
    if stats is not None:
        stats[:] = seen
    return all(finite for finite, _ in seen)


def _brackets(b: np.ndarray, ms: tuple, kth: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per model, the ends of :func:`_bracket` (±inf where open) as float32 arrays, from the
    sample of |τᵢ| at :func:`_sample_index`'s positions read straight from the kernel views
    ``b`` (BASE) and ``ms`` (:func:`.ties_kth.samples`); and the largest fraction of a sample
    inside its bracket (to size the stores)."""
    rows = ties_kth.samples(b, ms, _sample_index_np(b.size))
    ranks = _ranks(kth, b.size)
    ends = [r for r in ranks if r is not None]
    got = [iter(ties_kth.kth_abs(row, ends)) if ends else iter(()) for row in rows]
    lo, hi = (np.array([next(g) for g in got] if k is not None else [inf] * len(ms), np.float32)
              for k, inf in zip(ranks, (-np.inf, np.inf)))
    inside = max(int(np.count_nonzero((r >= x) & (r <= y))) for r, x, y in zip(rows, lo, hi))
    return lo, hi, inside / rows.shape[1]


def _input_kth(flat_b: torch.Tensor, flat_m: torch.Tensor, idx: torch.Tensor, sb: torch.Tensor, kth: int) -> float:
    """The k-th smallest |τ| = |M − BASE| of one model (:func:`input_thresholds`)."""
    total = flat_b.numel()
    lo, hi = _np_ends(*_bracket((flat_m[idx].float() - sb).abs_(), kth, total))
    step = min(SPLIT_CHUNK, total)
    t, b = scratch("it_mag", step, torch.float32), scratch("it_base", step, torch.float32)
    m1, m2 = (scratch(k, step, torch.bool).numpy() for k in ("it_m1", "it_m2"))
    below, inside = 0, []
    for start in range(0, total, step):
        c = min(step, total - start)
        a = torch.sub(flat_m[start:start + c], b[:c].copy_(flat_b[start:start + c]), out=t[:c]).abs_()
        n_below, vals = _np_split(a.numpy(), lo, hi, m1[:c], m2[:c])
        below += n_below
        inside.append(vals)
    vals, r = np.concatenate(inside), kth - below
    if not 1 <= r <= vals.size:                # the bracket missed: select from all
        return select((flat_m.float() - flat_b.float()).abs_(), [kth])[0]
    return float(np.partition(vals, r - 1)[r - 1])


def _np_ends(lo: float | None, hi: float | None) -> tuple[np.float32, np.float32]:
    """A bracket's ends for :func:`_np_split`: ±inf for open ends."""
    return np.float32(-np.inf if lo is None else lo), np.float32(np.inf if hi is None else hi)


def _np_split(a: np.ndarray, lo: np.float32, hi: np.float32, m1: np.ndarray,
              m2: np.ndarray) -> tuple[int, np.ndarray]:
    """:func:`_split` on a float32 array in numpy, whose SIMD compares are about 7x faster than
    torch's bool-valued ones on this CPU (30 vs 220 µs per 2^19 values): (how many of ``a`` are
    below ``lo``, a copy of those in [lo, hi]); ±inf stand for open ends; ``m1``, ``m2`` are
    bool scratch of ``a``'s size. lo ≤ a ≤ hi is (a ≤ hi) > (a < lo)."""
    below = int(np.count_nonzero(np.less(a, lo, out=m1)))
    keep = np.less_equal(a, hi, out=m2)
    return below, np.compress(np.greater(keep, m1, out=keep), a)


def _combine(base, models: list[torch.Tensor], thr, w, lam, count: bool, out_dtype: torch.dtype):
    """BASE + λ·disjoint_mean(trim(τ)) as one expression for ``torch.compile``, giving bit for bit
    what :func:`disjoint_mean` and the engine's ``mul_(λ).add_(BASE)`` give, with fewer operations:
    the count vote Σ sgn τᵢ is #positive − #negative; relu(τᵢ·s) is |τᵢ| where τᵢ agrees with s
    (s = ±1 flips the sign exactly) and Σ sgn relu(τᵢ·s) the number that agree. Only the sign of
    zero sums can differ, and 0/0 gives 0 either way; the sums keep disjoint_mean's order."""
    b = base.float()
    taus, mags, pos, neg = [], [], [], []
    for i, m in enumerate(models):
        t = m.float() - b
        a = t.abs()
        p, q = t > 0, t < 0
        if thr is not None:                # trimmed values are 0: neither positive nor negative
            keep = a >= thr[i]
            p, q = p & keep, q & keep
            if not count:
                t = torch.where(keep, t, 0.0)
        taus.append(t)
        mags.append(a)                     # read only where τᵢ agrees, so kept
        pos.append(p)
        neg.append(q)
    if count:
        vote = None
        for p, q in zip(pos, neg):
            v = p.float() - q.float()
            vote = v if vote is None else vote + v
    else:
        vote = None
        for i, t in enumerate(taus):
            v = t if w is None else t * w[i]
            vote = v if vote is None else vote + v
    up, down = vote > 0, vote < 0
    num = den = None
    for i in range(len(models)):
        agree = (up & pos[i]) | (down & neg[i])
        r = torch.where(agree, mags[i], 0.0)
        c = agree.float()
        if w is not None:
            r, c = r * w[i], c * w[i]
        num = r if num is None else num + r
        den = c if den is None else den + c
    d = torch.where(up, num, -num) / den
    d = torch.where(torch.isfinite(d), d, 0.0)
    return (d * lam + b).to(out_dtype)


_combine_compiled = compiled(_combine)


def _combine_into(out, *args):
    """:func:`_combine` written straight into ``out`` (the compiled loop stores into it: no
    fresh tensor, no second copy; 12.5 instead of 14.0 ms per 15 M-element key here)."""
    return out.copy_(_combine(*args))


_combine_into_compiled = compiled(_combine_into)


def ties_fused(base, models, lam: float, args: MethodArgs, out_dtype: torch.dtype,
               memo: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The whole TIES key from the inputs (exact thresholds, then one fused pass), or None where
    fused kernels are off or do not apply (:func:`_fusable`: small keys without numba,
    ``SDMW_COMPILE=0``) or an input is float8 (torch has no mixed float8 arithmetic; those keys
    take the stacked path, which upcasts them). On another device (a GPU) it runs only where the
    prefetch left the key's thresholds in ``memo`` (:func:`_stacked_with`).

    The fused pass is numba's :mod:`..kernels.ties_combine`; where numba is missing, or a dtype
    has no kernel view, inductor's compiled :func:`_combine`, which gives the same bits (numba's,
    with the CPU's float16 conversions, took 0.87 s for an SD1.5 re-merge of base + 4 against
    inductor's 1.12 s here).
    The thresholds depend on the models and the density only: ``memo`` keeps them for the next
    merge of the same models with another λ, weights or sign rule. ``out`` (the resident
    pipeline's buffer for this key) receives the result."""
    tag = ("thresholds", args.density)
    if base.device.type != "cpu":
        if memo is None or tag not in memo or _any_fp8(base, models):
            return None
        return _stacked_with(base, models, memo[tag], lam, args, out_dtype)
    if not _fusable(base, models):
        return None
    thr = remembered(memo, tag, lambda: input_thresholds(base, models, args.density))
    w = args.weight_tensor(len(models))
    res = _numba_combine(base, models, thr, w, lam, args.sign == "count", out_dtype, out)
    if res is not None:
        return res
    if usable(base):
        rest = (base.reshape(-1), [m.reshape(-1) for m in models], None if thr is None else thr.reshape(-1),
                None if bool((w == 1).all()) else w, torch.tensor(float(lam)), args.sign == "count", out_dtype)
        if out is not None:
            if _combine_into_compiled(out.view(-1), *rest) is not None:
                return out
        else:
            res = _combine_compiled(*rest)
            if res is not None:
                return res.reshape(base.shape)
    return None


def _stacked_with(base, models, thr, lam: float, args: MethodArgs, out_dtype: torch.dtype) -> torch.Tensor:
    """A key on a GPU whose thresholds the prefetch computed on the CPU: the stacked path's own
    operations (τᵢ stacked in float32, :func:`disjoint_mean`, ``mul_(λ).add_(BASE)``, rounded),
    so the same bits, without selecting the thresholds on the device. There, selection took
    1.1 s of an SD1.5 merge's 2.8 s of GPU time (7,520 ``kthvalue`` calls, H100) and thousands
    of waits for the GPU; and the memo now serves the next merge of the same models."""
    b = base.float()
    taus = stack_taus(b, len(models), (m.to(b.device, non_blocking=True) for m in models))
    delta = disjoint_mean(taus, args.weight_tensor(len(models)), args.sign, thr)
    return delta.mul_(lam).add_(b).to(out_dtype)


def _fusable(base: torch.Tensor, models: list[torch.Tensor]) -> bool:
    """Whether :func:`ties_fused` computes this CPU key: large keys (numba, else compiled), and
    keys under ``MIN_NUMEL`` elements with numba's kernel on the calling thread (one call instead
    of the stacked path's two dozen ops and a selection per model, every merge)."""
    if _any_fp8(base, models):
        return False
    if usable(base, compiler=False):
        return True
    return base.device.type == "cpu" and 0 < base.numel() < MIN_NUMEL and enabled() and kernels.available()


def ties_prefetch(items: list[tuple[torch.Tensor, list[torch.Tensor], MethodArgs, dict]],
                  should_stop=None, every_size: bool = False, serial: bool = False) -> None:
    """The thresholds of every key a merge will fuse, into each key's memo, before the first key
    is combined: ``items`` are (base, models, args, memo) per key. Whole keys go to the workers
    (the small ones as one task, then the large ones largest first), each computed on one thread:
    no per-key hand-offs between the threads, and no OpenMP op of the combination between two
    threshold passes, whose spinning threads took a core from them (SD1.5, 4 models: thresholds
    1.9 s instead of 2.6–3.1 s key by key).
    ``should_stop()`` is polled before each key (Stop pressed: the rest are left undone).
    ``every_size`` (a merge on a GPU): every key with its inputs on the CPU, small ones too.
    ``serial``: every key on the calling thread (the background warm-up: one core, not both)."""
    wanted = _host_inputs if every_size else _fusable
    todo = [(b, ms, a.density, memo) for b, ms, a, memo in items
            if ("thresholds", a.density) not in memo and wanted(b, ms)]
    todo.sort(key=lambda it: -it[0].numel())
    small = [it for it in todo if it[0].numel() <= SMALL]
    tasks = ([small] if small else []) + [[it] for it in todo if it[0].numel() > SMALL]

    def one(task):
        for base, models, density, memo in task:
            if should_stop is not None and should_stop():
                return
            stats: list = []
            thr = input_thresholds(base, models, density, parallel=False, stats=stats)
            if stats:
                memo[INPUT_STATS] = tuple(stats)
            if all(finite for finite, _ in stats):
                memo[("thresholds", density)] = thr
    # the small keys are one task, handed out first: one worker takes them all while the other
    # starts on the largest key. Handed out one by one after the large ones, they kept both
    # threads busy contending for the GIL over their Python-heavy calls (SD1.5's 755: 0.32 s
    # on the two workers against 0.15 s on one thread)
    for _ in (map if serial else kernels.workers().map)(one, tasks):
        pass


def _host_inputs(base: torch.Tensor, models: list[torch.Tensor]) -> bool:
    return all(x.device.type == "cpu" for x in (base, *models)) and not _any_fp8(base, models)


def _any_fp8(base: torch.Tensor, models: list[torch.Tensor]) -> bool:
    return any(is_fp8(x.dtype) for x in (base, *models))


def _numba_combine(base, models, thr, w, lam, count: bool, out_dtype, out) -> torch.Tensor | None:
    """:mod:`..kernels.ties_combine` over the workers into ``out`` or a new tensor; None where
    an input's or the output's dtype has no kernel view, or numba is missing or cannot compile
    here (:func:`..kernels.compile_failed`)."""
    got = kernels.key_views(base, models, out_dtype, out) if kernels.available() else None
    if got is None:
        return None
    views, res, into = got
    n = len(models)
    thr_np = np.full(n, -np.inf, np.float32) if thr is None else thr.reshape(-1).numpy().astype(np.float32)
    parts, run = kernels.split_for(views[0].size)
    try:
        ties_combine.combine(views[0], tuple(views[1:]), thr_np, w.tolist(), lam, count, into, parts, run)
    except Exception as e:
        if not kernels.compile_failed(e):
            raise
        return None
    return res


def disjoint_mean(taus: torch.Tensor, weights: torch.Tensor, sign: str,
                  trim: torch.Tensor | None = None) -> torch.Tensor:
    """TIES's trim, elect and disjoint merge of task vectors ``taus`` (n, …), float32.

    Values with |τᵢ| below ``trim[i]`` (:func:`thresholds`) count as 0. Per element: the elected
    sign s = sgn(Σᵢ wᵢτᵢ) (``sign="sum"``, the paper's) or s = sgn(Σᵢ sgn τᵢ) (``"count"``,
    sd-mecha's ``vote_sgn=False`` default); the result is Σᵢ wᵢτᵢ·[τᵢ·s > 0] / Σᵢ wᵢ·[τᵢ·s > 0],
    and 0 where no τᵢ agrees (sd-mecha ``ties_sum`` with unit weights; weighted as mergekit's TIES).

    Computed in cache-sized chunks with reused buffers and float-only steps (boolean masks cost
    3-4x more here): trimming is ``hardshrink`` just below the threshold, and with
    r = relu(τ·s) — |τ| where τ agrees with s, else 0 — the sums are s·Σwr and Σw·sgn(r)."""
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    total, dev = flat.shape[1], taus.device
    out = torch.empty(total, dtype=torch.float32, device=dev)
    w = weights.to(dev).reshape(n, 1)
    unit = bool((weights == 1).all())
    # |τ| > the float just below the threshold  <=>  |τ| >= threshold (sd-mecha keeps ties)
    lam = None if trim is None else [float(torch.nextafter(x, x.new_tensor(-1.0))) for x in trim.reshape(-1)]
    step = CHUNK if dev.type == "cpu" else GPU_CHUNK
    size = n * min(step, total)
    work, wtd, kept = (scratch(f"dm_{k}", size, torch.float32, dev) for k in ("work", "wtd", "kept"))
    s_buf, num_buf, den_buf = (scratch(f"dm_{k}", step, torch.float32, dev) for k in ("s", "num", "den"))
    for start in range(0, total, step):
        t = flat[:, start:start + step]
        c = t.shape[1]
        a, v = work[:n * c].view(n, c), wtd[:n * c].view(n, c)
        s, num, den = s_buf[:c], num_buf[:c], den_buf[:c]
        if lam is not None:
            k = kept[:n * c].view(n, c)
            for i in range(n):
                torch.ops.aten.hardshrink.out(t[i], lam[i], out=k[i])
            t = k
        wt = t if unit else torch.mul(t, w, out=v)
        torch.sum(wt if sign == "sum" else torch.sign(t, out=a), 0, out=s)
        s.sign_()
        r = torch.mul(t, s, out=a).relu_()
        torch.sum(r if unit else torch.mul(r, w, out=v), 0, out=num).mul_(s)
        torch.sign(r, out=r)
        torch.sum(r if unit else r.mul_(w), 0, out=den)
        torch.div(num, den, out=out[start:start + c])
    return out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).reshape(taus.shape[1:])


@method("ties", second="density", defaults={"density": 0.2}, reads=("density", "sign"),
        reference="Yadav et al. 2023, 'TIES-Merging', arXiv 2306.01708; sd-mecha merge_methods/ties.py ties_sum",
        formula="BASE + λ·disjoint_mean(elect(trim_k(τ₁…τₙ)))", fused=ties_fused,
        prefetch=ties_prefetch,
        # with positive weights the disjoint mean is a weighted mean of agreeing |τᵢ|: ≤ max|τᵢ|
        growth=lambda args: 1.0 if all(w > 0 for w in args.weights) else None)
def ties(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """Trim each τᵢ to its top-k (k = density) by magnitude (:func:`thresholds`), elect the sign
    per element and average the agreeing entries (:func:`disjoint_mean`)."""
    return disjoint_mean(taus, args.weight_tensor(taus.shape[0]), args.sign, thresholds(taus, args.density))
