"""numba's CPU kernels (merger/engine/kernels): exact format conversions, the exact k-th value,
TIES's one-pass thresholds (also when a store overflows) and its combination, bit for bit
against torch and the stacked reference path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

import merger.engine.compiled as compiled_mod
import merger.engine.methods.ties as ties_mod
from merger.engine.kernels import as_numpy, host_features, ties_kth
from merger.engine.kernels.convert import f32, narrow
from merger.engine.methods import MethodArgs, get_method

FORMATS = (torch.float16, torch.bfloat16)


@njit
def _widen_all(x, out):
    for j in range(x.size):
        out[j] = f32(x[j])


@njit
def _narrow_all(x, out):
    for j in range(x.size):
        out[j] = narrow(x[j], out)


@pytest.mark.parametrize("dtype", FORMATS)
def test_widening_is_torchs_for_every_bit_pattern(dtype):
    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    got = np.empty(65536, np.float32)
    _widen_all(as_numpy(t), got)
    want = t.float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))   # ±0, subnormals, inf


@pytest.mark.parametrize("dtype", FORMATS)
def test_narrowing_rounds_as_torch(dtype):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (1_000_000,), dtype=torch.int64, generator=g).to(torch.int32)
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14,
             2.0**-14 - 2.0**-26, 1e-8, float("inf"), -float("inf"), 3.4e38, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
             1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1e-40]
    x = torch.cat([bits.view(torch.float32), torch.tensor(edges), torch.randn(200_000, generator=g),
                   torch.randn(100_000, generator=g) * 1e-6]).numpy()
    got = as_numpy(torch.empty(x.size, dtype=dtype)).copy()
    _narrow_all(x, got)
    want = as_numpy(torch.from_numpy(x).to(dtype))
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    back = torch.from_numpy(got[nan].view(np.int16)).view(dtype)
    assert torch.isnan(back).all()               # NaN stays NaN (its payload is not torch's)


def test_the_cpus_own_float16_conversions_are_the_ones_tested_here():
    """Where the CPU has F16C (every x86 CPU since 2012), the kernels convert with it, so the two
    tests above check those instructions; the child process below checks the integer ones."""
    import os
    import platform
    from pathlib import Path

    from merger.engine.kernels import convert
    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.exists() or " f16c" not in info.read_text():
        pytest.skip("not an x86 CPU with F16C")
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        pytest.skip("numba compiles for another CPU")
    assert convert.HARDWARE_HALF


def test_kth_value_is_the_sorted_value():
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(5000), rng.integers(-3, 3, 3000), rng.standard_normal(2000) * 1e-40,
             np.abs(rng.standard_normal(100_000)) * 1e3, np.full(700, 0.25), [-np.inf, 1.0, np.inf, -0.0, 0.0],
             rng.standard_normal(40)]
    for vals in cases:
        v = np.asarray(vals, np.float32)
        srt = np.sort(v)
        for r in {1, v.size, (v.size + 1) // 2, *rng.integers(1, v.size + 1, 5).tolist()}:
            assert ties_kth.kth_value(v, int(r)) == srt[r - 1]


def _pair(numel, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.05).to(dtype)
    models = [(base.float() + torch.randn(numel, generator=g) * 0.01 * (i + 1)).to(dtype) for i in range(n)]
    return base, models



def test_kth_abs_is_the_sorted_magnitude():
    """:func:`ties_kth.kth_abs` (one histogram over the raw bits, several ranks, a store's known
    bounds) gives the sorted values, for ranks in any order, with bounds that hold the values
    and with bounds that do not (then it scans for them)."""
    rng = np.random.default_rng(1)
    cases = [np.abs(rng.standard_normal(5000)), np.abs(rng.integers(-3, 3, 3000)), np.abs(rng.standard_normal(2000)) * 1e-40,
             0.0125 + 0.0003 * rng.random(100_000), np.full(700, 0.25), [np.inf, 1.0, 0.0, 0.0, 3e38], [2.0]]
    for vals in cases:
        v = np.asarray(vals, np.float32)
        srt = np.sort(v)
        ranks = [int(r) for r in {v.size, 1, (v.size + 1) // 2, *rng.integers(1, v.size + 1, 5).tolist()}]
        want = [float(srt[r - 1]) for r in ranks]
        assert ties_kth.kth_abs(v, ranks) == want
        finite = v[np.isfinite(v)]
        if finite.size == v.size:
            assert ties_kth.kth_abs(v, ranks, float(v.min()), float(v.max())) == want
            assert ties_kth.kth_abs(v, ranks, float(v.min()) * 1.5 + 1e-30, float(v.max())) == want   # not the bounds
            assert ties_kth.kth_abs(v, ranks, 0.0, float(v.max()) / 2) == want


def test_a_store_is_selected_through_its_band_exactly(monkeypatch):
    """:func:`band.kth_in_store` gives the sorted value for every rank, through a band (large
    stores), when the band misses (a sample that sees one value), when it overflows its room
    (every value equal), and with AVX2's table permutes packing the band (where the CPU has
    AVX2), whose pass counts and stores what the vector compress does."""
    from merger.engine.kernels import band
    rng = np.random.default_rng(4)
    lo, hi = 0.0125, 0.0128
    for m in (1000, band.BAND_MIN + 7, 400_001):
        v = (lo + (hi - lo) * rng.random(m)).astype(np.float32)
        srt = np.sort(v)
        for r in (1, 2, m // 3, m // 2, m - 1, m):
            assert band.kth_in_store(v, r, lo, hi) == srt[r - 1]
    v = np.full(200_000, 0.5, np.float32)
    assert band.kth_in_store(v, 1000, 0.5, 0.5) == 0.5
    v = (lo + (hi - lo) * rng.random(300_000)).astype(np.float32)
    srt = np.sort(v)
    calls = []
    real = ties_kth.kth_abs
    monkeypatch.setattr(ties_kth, "kth_abs", lambda x, *a: calls.append(x.size) or real(x, *a))
    assert band.kth_in_store(v, 150_000, lo, hi) == srt[149_999]
    assert calls[-1] < 60_000                                # selected from the band
    monkeypatch.setattr(band, "_UNIFORM", np.zeros(band.BAND_SAMPLE))    # every sample is v[0]
    calls.clear()
    assert band.kth_in_store(v, 150_000, lo, hi) == srt[149_999]
    assert calls[-1] == v.size                               # missed: from the whole store
    if "avx2" in host_features():
        for table, lanes in ((None, 16), (ties_kth.LANE_TABLE, 8)):
            out = np.empty(40_000, np.float32)
            a, b = srt[140_000], srt[160_000]
            below, k = band._band(v, a, b, out, table, lanes)
            assert (below, k) == (np.count_nonzero(v < a), np.count_nonzero((v >= a) & (v <= b))) and k > 19_000
            assert np.array_equal(out[:k], v[(v >= a) & (v <= b)])

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_pass_thresholds_are_exact(dtype, monkeypatch):
    base, models = _pair(300_001, 3, dtype)          # odd length: the last part ends mid-block
    taus = torch.stack([m.float() - base.float() for m in models])
    calls = []
    real = ties_mod._numba_kths
    monkeypatch.setattr(ties_mod, "_numba_kths", lambda *a: calls.append(1) or real(*a))
    for density in (0.2, 0.5, 0.999, 0.001):
        assert torch.equal(ties_mod.input_thresholds(base, models, density), ties_mod.thresholds(taus, density))
    assert len(calls) == 4


@pytest.mark.parametrize("dtype,base_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float32), (torch.float16, torch.float32)],
                         ids=["half", "bf16", "single", "half_on_single"])
def test_the_threshold_pass_counts_stores_and_scans_exactly(dtype, base_dtype):
    """:func:`ties_kth.split` against numpy, with both packings (the vector compress; AVX2's
    permutes where the CPU has AVX2): per model the count below lo (NaN counted there), the
    values inside [lo, hi] in their order, and each input's largest magnitude bits (NaN and Inf
    among them), on parts that end mid-step and stores given exactly the room they need, so
    that the loop in registers hands the last positions of a part to the one-at-a-time path."""
    base, models = _pair(300_001, 3, dtype)
    base = base.to(base_dtype)
    models[1][300_000] = float("nan")
    models[2][200_003] = float("inf")
    base[123_457] = float("-inf")
    b, ms = as_numpy(base), tuple(as_numpy(m) for m in models)
    mags = np.abs(np.stack([m.float().numpy() - base.float().numpy() for m in models]))
    lo, hi = np.quantile(mags, 0.78, axis=1).astype(np.float32), np.quantile(mags, 0.81, axis=1).astype(np.float32)
    parts = [(0, 150_009), (150_009, 300_001)]
    inside = (mags >= lo[:, None]) & (mags <= hi[:, None])
    room = max(int(inside[:, s:e].sum(axis=1).max()) for s, e in parts)
    from merger.engine.kernels.magnitude import bits_view
    tops = [int((v & m).max()) for v, m in (bits_view(x) for x in (b, *ms))]
    for permute in (False, True) if "avx2" in host_features() else (False,):
        below, vals, got_tops = ties_kth.split(b, ms, lo, hi, parts, room, map, permute=permute)
        assert below.tolist() == [int((~(mags[i] >= lo[i])).sum()) for i in range(3)]
        assert [v.tolist() for v in vals] == [mags[i][inside[i]].tolist() for i in range(3)]
        assert got_tops == tops
        assert ties_kth.split(b, ms, lo, hi, parts, room - 1, map, permute=permute) is None


def test_the_threshold_pass_writes_nothing_past_a_stores_room():
    """However many values fall inside the brackets, the pass writes no slot of a store past
    its room and the spare slots after it (each row here is followed by sentinels); the counts
    go on past the room, which the caller reads as an overflow."""
    base, models = _pair(50_001, 2, torch.float16)
    b, ms = as_numpy(base), tuple(as_numpy(m) for m in models)
    bbits, bmask, mbits, mmask = ties_kth.input_bits(b, ms)
    lo, hi = np.zeros(2, np.float32), np.full(2, np.inf, np.float32)      # everything is inside
    tables = (None, ties_kth.LANE_TABLE) if "avx2" in host_features() else (None,)
    for room, table in ((r, t) for r in (0, 5, 1000, 4096, 30_000) for t in tables):
        whole = np.full((2, room + ties_kth.LANES + 64), -7.0, np.float32)
        store = whole[:, :room + ties_kth.LANES]
        below, inside, tops = np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(3, np.int64)
        ties_kth._split_range(b, ms, 0, 50_001, lo, hi, store, below, inside, table, bbits, mbits, bmask, mmask, tops)
        assert inside.tolist() == [50_001, 50_001] and below.tolist() == [0, 0]
        assert (whole[:, room + ties_kth.LANES:] == -7.0).all()
        assert (store[:, :room] >= 0).all()


def test_an_overflowing_store_falls_back_exactly(monkeypatch):
    """The sample's share sizes each worker's store; far more values inside the bracket than
    that (a misleading sample) must not write past it, and the threshold stays exact."""
    base, models = _pair(300_000, 2, torch.float16)
    want = ties_mod.thresholds(torch.stack([m.float() - base.float() for m in models]), 0.3)
    b, ms = as_numpy(base), tuple(as_numpy(m) for m in models)
    lo, hi = np.zeros(2, np.float32), np.full(2, np.inf, np.float32)       # everything is inside
    assert ties_kth.split(b, ms, lo, hi, [(0, 150_016), (150_016, 300_000)], 1000, map) is None
    monkeypatch.setattr(ties_kth, "split", lambda *a, **k: None)
    assert torch.equal(ties_mod.input_thresholds(base, models, 0.3), want)


def test_the_values_of_one_key_survive_the_next_key_on_the_same_thread():
    """The threshold pass stores into one buffer per thread, reused from key to key: what it
    returns for a key is its own, not a view that the thread's next key (perhaps another
    caller's) overwrites, unless the caller borrows them (its own next call comes after it is done)."""
    first = _pair(300_001, 2, torch.float16, seed=1)
    second = _pair(300_001, 2, torch.float16, seed=2)
    lo, hi = np.zeros(2, np.float32), np.full(2, 0.004, np.float32)

    def run(pair, borrow=False):
        b, ms = as_numpy(pair[0]), tuple(as_numpy(m) for m in pair[1])
        return ties_kth.split(b, ms, lo, hi, [(0, 300_001)], 300_001, map, borrow=borrow)[1]
    got = run(first)
    kept = [v.copy() for v in got]
    run(second)
    assert all(np.array_equal(v, k) for v, k in zip(got, kept)) and got[0].size > 1000
    lent = run(first, borrow=True)               # the same values, in the thread's store
    assert all(np.array_equal(v, k) for v, k in zip(lent, kept))
    assert np.shares_memory(lent[0], run(second, borrow=True)[0])


@pytest.mark.parametrize("dtype,out_dtype,sign,weights,density", [
    (torch.float16, torch.float16, "count", (), 0.2),
    (torch.bfloat16, torch.bfloat16, "sum", (1.0, 0.5, 2.0), 0.5),
    (torch.float16, torch.float32, "sum", (1.0, -0.5, 0.25), 1.0),
    (torch.float32, torch.float32, "count", (2.0, 1.0, 1.0), 0.3),
])
def test_numba_combination_equals_the_stacked_path(dtype, out_dtype, sign, weights, density, monkeypatch):
    """Without inductor (no C++ compiler), TIES keys take numba's combination: the same bits."""
    monkeypatch.setattr(compiled_mod, "_broken", ["no compiler"])
    base, models = _pair(200_003, 3, dtype, seed=3)
    args = MethodArgs(weights=weights, density=density, sign=sign)
    b = base.float()
    taus = torch.stack([m.float() - b for m in models])
    want = get_method("ties").fn(taus, args, None).mul_(0.7).add_(b).to(out_dtype)
    got = ties_mod.ties_fused(base, models, 0.7, args, out_dtype)
    assert got is not None and got.dtype == out_dtype and torch.equal(got, want)
    into = torch.empty(base.shape, dtype=out_dtype)
    assert ties_mod.ties_fused(base, models, 0.7, args, out_dtype, None, into) is into
    assert torch.equal(into, want)


@pytest.mark.parametrize("dtype,base_dtype,out_dtype", [(torch.float16, torch.float16, torch.float16),
                                                        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                                        (torch.float16, torch.float32, torch.float32)],
                         ids=["half", "bf16", "half_on_single"])
def test_the_vector_combination_writes_the_loops_bits(dtype, base_dtype, out_dtype):
    """:func:`ties_combine.combine` (its 16-lane loop written in LLVM IR, numba's loop for the
    last elements of each part) gives bit for bit what numba's per-element loop gives over the
    whole key, for both sign rules, unit and signed weights, DARE's masks with their divisor,
    nothing trimmed, a quantile's trimming and thresholds of 0 and below (zero τ still never
    vote); the key holds positions where every τ is trimmed (nothing agrees: BASE), where the
    votes tie, and (bfloat16) where τ overflows float32 to inf."""
    from merger.engine.kernels import ties_combine
    base, models = _pair(1013, 3, dtype, seed=9)
    base = base.to(base_dtype)
    for m in models:
        m[:40] = base[:40].to(dtype)                   # τ = 0 everywhere: nothing kept
    models[1][40:80] = (2 * base[40:80].float() - models[0][40:80].float()).to(dtype)   # ±τ: tied votes
    if dtype == base_dtype == torch.bfloat16:       # |τ| overflows float32: inf votes, inf − inf, inf means
        base[80:96] = -3e38
        for m in models:
            m[80:96] = 3e38
    b, ms = as_numpy(base), tuple(as_numpy(m) for m in models)
    with np.errstate(over="ignore"):
        mags = np.abs(np.stack([m.float().numpy() - base.float().numpy() for m in models]))
    masks = (np.random.default_rng(2).random((3, 1013)) < 0.6).astype(np.uint8)
    for count in (True, False):
        for w in ((1.0, 1.0, 1.0), (1.0, -0.5, 2.0), (0.0, 1.0, 2.0)):
            for mk, div in ((None, None), (masks, 0.7)):
                q = np.quantile(mags, 0.6, axis=1).astype(np.float32).tolist()
                for thr in ([-np.inf] * 3, q, [0.0, -1.0, q[2]]):
                    want = as_numpy(torch.empty(1013, dtype=out_dtype))
                    got = as_numpy(torch.empty(1013, dtype=out_dtype))
                    whole = ties_combine._combine_count if count else ties_combine._combine_sum
                    whole(b, ms, tuple(np.float32(x) for x in thr), None if set(w) == {1.0} else tuple(np.float32(x) for x in w),
                          np.float32(0.7), want, None if mk is None else tuple(mk), None if div is None else np.float32(div))
                    ties_combine.combine(b, ms, thr, list(w), 0.7, count, got, [(0, 512), (512, 1013)], map, mk, div)
                    assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (count, w, div, thr)


def test_only_kernel_formats_take_the_kernels():
    assert as_numpy(torch.zeros(4, dtype=torch.float64)) is None
    assert as_numpy(torch.zeros(4, 4)[:, 0]) is None                         # strided
    assert as_numpy(torch.zeros(4, dtype=torch.float16)).dtype == np.uint16
    assert as_numpy(torch.zeros(4, dtype=torch.bfloat16)).dtype == np.int16
    minus = {torch.float16: np.float16(-2.5).view(np.uint16),               # -2.5 in each view
             torch.bfloat16: np.array([-2.5], np.float32).view(np.int16)[1],  # float32's high half
             torch.float32: np.float32(-2.5)}
    for dtype, bits in ((torch.float16, np.uint16), (torch.bfloat16, np.int16), (torch.float32, np.float32)):
        for shape in ((), (3,), (2, 3, 1)):       # flat views of the tensor's own memory, any shape
            t = torch.zeros(shape, dtype=dtype)
            v = as_numpy(t)
            assert v.dtype == bits and v.shape == (t.numel(),)
            v[-1] = minus[dtype]
            assert float(t.reshape(-1)[-1]) == -2.5


CPU_DEPENDENT = ("widening or narrowing or thresholds_are_exact or overflowing_store or numba_combination "
                 "or permutes_store or (counts_stores_and_scans and half) or past_a_store or (vector_combination and half and not single) "
                 "or selected_through_its_band")


def test_kernels_are_exact_when_compiled_for_a_cpu_without_avx512(tmp_path):
    """The compress step is LLVM's generic ``vector.compress`` (AVX-512 has an instruction for
    it) or, on a CPU with AVX2 and without AVX-512, table permutes (``ties_kth.PERMUTE8``);
    compiled for another CPU than the host's, LLVM's expansion of the compress. The tests of the
    code whose path depends on the CPU (the conversions, the thresholds' pass, the combination,
    the permutes), compiled for Haswell in a child process, must pass too; there float16 takes
    the integer conversions (``NUMBA_CPU_NAME`` is set), here the CPU's own (``HARDWARE_HALF``).
    (The RNG, rank and selection kernels have no such branch: left out, 9 s of compiling; the
    pass's and the vector combination's format tests run for float16 there, whose conversions
    are the ones that differ, each of their signatures a compile.)"""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", CPU_DEPENDENT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("seed,already", [(0, 0), (12345, 977), (2**40 + 3, 624), (7, 623)])
def test_bernoulli_masks_and_generator_state_are_torchs(seed, already):
    """:mod:`bernoulli` gives ``torch.bernoulli``'s masks (a probability per element, and one for
    all) and leaves the generator where torch's own draws leave it, also for a generator
    already part-way through its stream and sizes around the engine's 624-word blocks."""
    from merger.engine.kernels import bernoulli
    for n in (1, 624, 625, 1249, 100_003):
        g_torch, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.rand(already, generator=g_torch)
        torch.rand(already, generator=g_ours)
        assert bernoulli.usable(g_ours)
        keep = torch.rand(n, generator=torch.Generator().manual_seed(n))
        want = torch.bernoulli(keep, generator=g_torch)
        assert torch.equal(bernoulli.bernoulli_(keep, torch.empty(n), g_ours), want)
        assert torch.equal(g_ours.get_state(), g_torch.get_state())
        k = float(torch.ones(1).sub_(0.9))
        want = torch.bernoulli(torch.full((n,), k), generator=g_torch)
        assert torch.equal(bernoulli.bernoulli_(k, torch.empty(n), g_ours), want)
        assert torch.equal(torch.rand(5, generator=g_ours), torch.rand(5, generator=g_torch))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dropout_is_the_same_with_torchs_bernoulli(eps, monkeypatch):
    """DARE's and DELLA's dropout with the fast masks equals it with ``torch.bernoulli``."""
    from merger.engine.kernels import bernoulli
    from merger.engine.methods.dropout import drop_
    taus = torch.randn(3, 70_001, generator=torch.Generator().manual_seed(5))
    fast = drop_(taus.clone(), 0.7, torch.Generator().manual_seed(9), eps)
    monkeypatch.setattr(bernoulli, "usable", lambda g: False)
    slow = drop_(taus.clone(), 0.7, torch.Generator().manual_seed(9), eps)
    assert torch.equal(fast, slow) and 0.2 < float((fast != 0).float().mean()) < 0.4


def test_ranks_are_a_stable_argsorts():
    from merger.engine.kernels import ranks
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 257, 70_001):
        x = torch.randn(n, generator=g).abs()
        x[::3] = x[0]                                   # ties: ranked by position
        x[n // 2] = 0.0
        want = torch.empty(n, dtype=torch.int64)
        want[torch.argsort(x, stable=True)] = torch.arange(1, n + 1)
        assert np.array_equal(ranks.ranks(x.numpy()), want.numpy())


@pytest.mark.skipif("avx2" not in host_features(), reason="AVX2's permutes need a CPU with AVX2 (and numba compiling for it)")
def test_avx2_permutes_store_what_the_vector_compress_stores():
    """The threshold pass's two ways to store the |τ| inside each bracket (AVX2's table permutes,
    LLVM's vector compress) give the same counts and the same values in the same order."""
    base, models = _pair(300_001, 3, torch.float16, seed=5)
    b, ms = as_numpy(base), tuple(as_numpy(m) for m in models)
    mags = np.abs(np.stack([m.float().numpy() - base.float().numpy() for m in models]))
    lo, hi = np.quantile(mags, 0.78, axis=1).astype(np.float32), np.quantile(mags, 0.81, axis=1).astype(np.float32)
    parts = [(0, 150_016), (150_016, 300_001)]
    got = [ties_kth.split(b, ms, lo, hi, parts, 40_000, map, permute=p) for p in (False, True)]
    for (below, vals, _) in got:
        assert below.tolist() == [int((mags[i] < lo[i]).sum()) for i in range(3)]
        assert [v.tolist() for v in vals] == [mags[i][(mags[i] >= lo[i]) & (mags[i] <= hi[i])].tolist()
                                              for i in range(3)]
    # a table row per 8-lane mask: the set lanes first, in order
    assert ties_kth.LANE_TABLE[0b10110010, :4].tolist() == [1, 4, 5, 7]


def test_kernel_workers_run_torch_on_one_thread_and_leave_other_threads_alone():
    """The workers' torch ops stay single-threaded even after the main thread resets torch's
    thread count (before, their first parallel op took the reset count and opened an OpenMP team,
    which slowed the rest of the process's kernels 1.5-2x), and threads started after the workers
    keep torch's count (before, they all ran torch on one core)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from merger.engine.omp_threads import one_torch_thread

    def fresh_thread_count() -> int:
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    pool = ThreadPoolExecutor(2, initializer=one_torch_thread)
    try:
        assert list(pool.map(lambda _: 0, range(4))) == [0] * 4          # both workers started
        assert fresh_thread_count() == 2
        torch.set_num_threads(2)                                          # e.g. a test restoring it
        x, w = torch.randn(1, 8, 16, 16), torch.randn(8, 8, 3, 3)

        def op(_):
            torch.nn.functional.conv2d(x, w, padding=1)
            return torch.get_num_threads()
        assert list(pool.map(op, range(8))) == [1] * 8
        assert fresh_thread_count() == 2 and torch.get_num_threads() == 2
    finally:
        pool.shutdown()
        torch.set_num_threads(before)
