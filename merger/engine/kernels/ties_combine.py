"""TIES's combination of one key on the CPU, straight from the stored inputs (numba):
BASE + λ·disjoint_mean(trim(τ₁…τₙ)), written once into the output, each element read once.

Per element, with τᵢ = float32(Mᵢ) − float32(BASE), kept where |τᵢ| ≥ thrᵢ (trimmed values count
as 0: neither positive nor negative), the elected sign is sgn(Σᵢ sgn τᵢ) (``count``) or
sgn(Σᵢ wᵢτᵢ) (``sum``); the result is BASE + λ·s·Σᵢ wᵢ|τᵢ|[τᵢ agrees] / Σᵢ wᵢ[τᵢ agrees], and
BASE where that ratio is not finite (nothing agrees). Bit for bit what ``ties.disjoint_mean``
and the engine's ``mul_(λ).add_(BASE)`` give: the same float32 operations in the same order
(sums folded from model 0, no fused multiply-add), then torch's rounding to the output dtype.

One loop over the elements, which LLVM vectorizes (32 floats per step here: two AVX-512 vectors),
with the loop over the models unrolled inside it; the callers split the elements between their
worker threads. It is the CPU's TIES combination wherever numba is installed; inductor's compiled
expression (``ties._combine``) is the fallback. Over SD1.5's keys (base + 4, thresholds known,
2 cores) a re-merge took 0.87 s with it against inductor's 1.12 s, since float16 is converted by
the CPU's own instructions (:data:`.convert.HARDWARE_HALF`); with the integer conversions it
was 1.16 s against 1.05 s.

The bulk of each part (a multiple of 16 elements) now goes through the same operations written
as one LLVM IR loop of 16-lane vectors with the agreement kept as compare masks and sign bits
(:func:`_block`): bit for bit the loop's result, about 1.3x its speed on large keys here
(1.14-1.36 G positions/s on one thread, float16, 4 models, count vote); numba's loop writes the
rest and remains the reference the tests compare it with.
"""
from __future__ import annotations

import numpy as np

from . import HAVE_NUMBA

if HAVE_NUMBA:
    from numba import njit

    from .convert import f32, narrow

    @njit(inline="always")
    def _agree_and_store(vote, models, thr, w, lam, out, j, b, masks, div):
        """Element j after its vote: the disjoint mean of the agreeing τᵢ (divided by ``div``
        where given: DARE's 1 − p), then BASE + λ·it. With s = sgn(vote) (exactly ±1 or 0),
        r = max(τᵢ·s, 0) is |τᵢ| where τᵢ agrees and 0 elsewhere, as ``disjoint_mean``'s relu.
        ``w`` None: unit weights (×1 skipped: the same bits)."""
        z = np.float32(0.0)
        one = np.float32(1.0)
        s = (one if vote > z else z) - (one if vote < z else z)
        num = z
        den = z
        for i in range(len(models)):
            v = f32(models[i][j]) - b
            if masks is not None:     # DARE's 0/1 mask (exact: τ or ±0)
                v = v * np.float32(masks[i][j])
            r = (v if abs(v) >= thr[i] else z) * s
            r = r if r > z else z
            d = one if r > z else z
            if w is not None:
                r = r * w[i]
                d = d * w[i]
            if i == 0:
                num = r
                den = d
            else:
                num += r
                den += d
        q = (num * s) / den
        if not np.isfinite(q):
            q = z
        if div is not None:
            q = q / div
        out[j] = narrow(q * lam + b, out)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _combine_count(base, models, thr, w, lam, out, masks=None, div=None):
        """The key's slice, the sign elected by count: ``base``, ``models`` (a tuple of same-format
        views) and ``out`` are slices of one element range, indexed from 0 (see ties_kth: an offset
        index kept LLVM from vectorizing). ``thr``/``w`` are tuples of float32 (kept in registers):
        thresholds (−inf keeps everything) and weights, or None for unit weights. The loop over
        the models is unrolled by LLVM (the tuple's length is a constant), so each element's
        values stay in registers; τᵢ is made again for the agreement pass rather than stored (LLVM
        reuses the conversions). ``masks`` (a tuple of uint8 slices like ``models``) and ``div``:
        dare_ties, whose τᵢ are masked and whose mean is divided by 1 − p (:mod:`.dare`). The
        masking is written out in each loop: a helper taking the masks' tuple and the model index
        stopped LLVM from vectorizing (dare_ties 7-60x slower; the README's "found on the way").

        Written with float selects only: boolean arithmetic (the count vote as
        float(τ > 0) − float(τ < 0)) made LLVM narrow the masks to bytes and widen them back,
        and an int32 count is promoted to int64 by numba; the copysign form below and the
        relu form of the agreement took an SD1.5-sized key from 37 to 27 ms (count) and to
        23 ms (sum) on one Zen 3 thread with unit weights. One function per sign rule (not a
        flag): each signature then compiles only the loop it runs (1.6-1.8 s a signature with
        both, here)."""
        z = np.float32(0.0)
        one = np.float32(1.0)
        for j in range(out.size):
            b = f32(base[j])
            vote = z
            for i in range(len(models)):
                v = f32(models[i][j]) - b
                if masks is not None:
                    v = v * np.float32(masks[i][j])
                t = v if abs(v) >= thr[i] else z
                x = np.copysign(one, t) if t != z else z
                vote = x if i == 0 else vote + x
            _agree_and_store(vote, models, thr, w, lam, out, j, b, masks, div)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _combine_sum(base, models, thr, w, lam, out, masks=None, div=None):
        """:func:`_combine_count` with the sign elected by the sum of the (weighted) trimmed τᵢ."""
        z = np.float32(0.0)
        for j in range(out.size):
            b = f32(base[j])
            vote = z
            for i in range(len(models)):
                v = f32(models[i][j]) - b
                if masks is not None:
                    v = v * np.float32(masks[i][j])
                x = v if abs(v) >= thr[i] else z
                if w is not None:
                    x = x * w[i]
                vote = x if i == 0 else vote + x
            _agree_and_store(vote, models, thr, w, lam, out, j, b, masks, div)

    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from .convert import from_float32, to_float32
    from .vectors import declare, load, loop, splat, store

    def _absent(t) -> bool:
        return t is None or isinstance(t, (types.NoneType, types.Omitted))

    def _block(count: bool):
        """An intrinsic ``(base, models, thr, w, lam, out, masks, div, c)`` writing elements
        [0, c) (c > 0, a multiple of :data:`LANES`) as one loop of 16-lane vectors: the same
        float32 operations as :func:`_combine_count` (``count``) or :func:`_combine_sum` and
        :func:`_agree_and_store`, so the same bits, with the agreement kept as compare masks.

        ``thr`` here is each threshold raised to at least the least subnormal (:func:`combine`),
        so kept = |τᵢ| ≥ thrᵢ also says τᵢ ≠ 0: a zero τ neither votes nor agrees, as there.
        The count vote adds copysign(1, τᵢ) where kept (the ±1 sum, exact in any order); the
        sum vote adds the kept τᵢ (·wᵢ) in order. τᵢ agrees where it is kept and its sign bit is
        the vote's; where the vote is 0 (or NaN) the result is BASE, as there, where nothing
        agrees and 0/0 is not finite. Then |τᵢ| = τᵢ·s, and the mean's sign, s·num/den =
        ±(num/den), is the vote's sign bit put on it. With unit weights the sums add |τᵢ| and 1
        only where τᵢ agrees (adding the +0 that the others give changes nothing); with weights
        every model's relu(τᵢ·s)·wᵢ and [agrees]·wᵢ are added in order, as there.

        Against the loop's formulation written as masks (pᵢ = kept ∧ τᵢ > 0, qᵢ = kept ∧ τᵢ < 0,
        agreement (pᵢ ∧ vote > 0) ∨ (qᵢ ∧ vote < 0)): about 58 instead of 78 vector operations
        per 16 positions for 4 models, 1.14-1.36 against 0.86-1.02 G positions/s on one thread
        here (float16, count vote, unit weights, 2^16-2^22 positions); that was itself 7-12% faster than the numba
        loop compiled for this CPU, 14-20% compiled for Haswell. The numba loop still writes the
        last < 16 elements of a part."""
        def typer(typingctx, base, models, thr, w, lam, out, masks, div, c):
            arrays = (base, models.dtype, out) + (() if _absent(masks) else (masks.dtype,))
            if any(a.layout != "C" for a in arrays):
                return None                   # read at data pointer + index: contiguous only
            sig = types.none(base, models, thr, w, lam, out, masks, div, c)

            def gen(context, builder, sig, args):
                n, lanes = models.count, LANES
                f32v = ir.VectorType(ir.FloatType(), lanes)
                mk = context.make_array
                bptr = mk(sig.args[0])(context, builder, args[0]).data
                mptrs = [mk(models.dtype)(context, builder, builder.extract_value(args[1], i)).data for i in range(n)]
                optr = mk(sig.args[5])(context, builder, args[5]).data
                kptrs = None if _absent(masks) else [
                    mk(masks.dtype)(context, builder, builder.extract_value(args[6], i)).data for i in range(n)]
                thrs = [splat(builder, builder.extract_value(args[2], i), lanes) for i in range(n)]
                ws = None if _absent(w) else [splat(builder, builder.extract_value(args[3], i), lanes) for i in range(n)]
                lam_v = splat(builder, args[4], lanes)
                div_v = None if _absent(div) else splat(builder, args[7], lanes)
                zero, one = ir.Constant(f32v, [0.0] * lanes), ir.Constant(f32v, [1.0] * lanes)
                fabs = declare(builder, f"llvm.fabs.v{lanes}f32", f32v, [f32v])
                copysign = declare(builder, f"llvm.copysign.v{lanes}f32", f32v, [f32v, f32v])
                i32v = ir.VectorType(ir.IntType(32), lanes)
                sign_bit = ir.Constant(i32v, [-0x80000000] * lanes)
                _, j, close = loop(builder, "ties_block")
                b = to_float32(builder, load(builder, bptr, j, lanes), base.dtype)
                taus, mags, kept = [], [], []
                vote = zero
                for i in range(n):
                    v = builder.fsub(to_float32(builder, load(builder, mptrs[i], j, lanes), models.dtype.dtype), b)
                    if kptrs is not None:          # DARE's 0/1 mask: τ or ±0
                        v = builder.fmul(v, builder.uitofp(load(builder, kptrs[i], j, lanes), f32v))
                    a = builder.call(fabs, [v])
                    k = builder.fcmp_ordered(">=", a, thrs[i])     # thrᵢ ≥ the least subnormal: τᵢ ≠ 0
                    if count:
                        vote = builder.select(k, builder.fadd(vote, builder.call(copysign, [one, v])), vote)
                    else:
                        x = builder.select(k, v, zero)
                        if ws is not None:
                            x = builder.fmul(x, ws[i])
                        vote = x if i == 0 else builder.fadd(vote, x)
                    taus.append(v)
                    mags.append(a)
                    kept.append(k)
                voted = builder.fcmp_ordered("!=", vote, zero)
                vote_sign = builder.and_(builder.bitcast(vote, i32v), sign_bit)
                num = den = zero
                for i in range(n):
                    differ = builder.and_(builder.xor(builder.bitcast(taus[i], i32v), vote_sign), sign_bit)
                    agree = builder.and_(kept[i], builder.icmp_unsigned("==", differ, ir.Constant(i32v, [0] * lanes)))
                    if ws is None:
                        num = builder.select(agree, builder.fadd(num, mags[i]), num)
                        den = builder.select(agree, builder.fadd(den, one), den)
                    else:
                        r = builder.fmul(builder.select(agree, mags[i], zero), ws[i])
                        d = builder.fmul(builder.select(agree, one, zero), ws[i])
                        num = r if i == 0 else builder.fadd(num, r)
                        den = d if i == 0 else builder.fadd(den, d)
                mean = builder.fdiv(num, den)
                mean = builder.bitcast(builder.xor(builder.bitcast(mean, i32v), vote_sign), f32v)
                finite = builder.fcmp_ordered("<", builder.call(fabs, [mean]), ir.Constant(f32v, [float("inf")] * lanes))
                mean = builder.select(builder.and_(finite, voted), mean, zero)
                if div_v is not None:
                    mean = builder.fdiv(mean, div_v)
                res = builder.fadd(builder.fmul(mean, lam_v), b)
                store(builder, from_float32(builder, res, out.dtype), optr, j)
                close(lanes, args[8])
                return context.get_dummy_value()
            return sig, gen
        typer.__name__ = typer.__qualname__ = f"_block_{'count' if count else 'sum'}"
        return intrinsic(typer)

    _block_count = _block(True)
    _block_sum = _block(False)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _vector_count(base, models, thr, w, lam, out, masks=None, div=None):
        """:func:`_combine_count` for slices of a multiple of 16 elements (:func:`_block`)."""
        _block_count(base, models, thr, w, lam, out, masks, div, out.size)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _vector_sum(base, models, thr, w, lam, out, masks=None, div=None):
        """:func:`_combine_sum` for slices of a multiple of 16 elements (:func:`_block`)."""
        _block_sum(base, models, thr, w, lam, out, masks, div, out.size)


LANES = 16           # elements per step of the vector loop


def combine(base: np.ndarray, models: tuple, thr, w, lam: float, count: bool, out: np.ndarray,
            parts: list[tuple[int, int]], run, masks: np.ndarray | None = None, div: float | None = None) -> None:
    """Write the key into ``out`` (a view naming its format); ``thr`` and ``w`` per model;
    ``parts`` of the elements are mapped over the workers by ``run``; ``masks`` (n × elements,
    uint8) and ``div``: see :func:`_combine_count`."""
    thr_t = tuple(np.float32(x) for x in thr)
    w_t = None if all(x == 1 for x in w) else tuple(np.float32(x) for x in w)
    lam32 = np.float32(lam)
    div32 = None if div is None else np.float32(div)

    vector, kernel = (_vector_count, _combine_count) if count else (_vector_sum, _combine_sum)
    least = np.float32(np.finfo(np.float32).smallest_subnormal)
    thr_v = tuple(x if not x <= least else least for x in thr_t)   # see _block: the same kept τᵢ

    def part(p):
        start, stop = p
        mid = stop - (stop - start) % LANES           # the vector loop, then numba's for the rest
        for f, t, s, e in ((vector, thr_v, start, mid), (kernel, thr_t, mid, stop)):
            if e > s:
                mk = None if masks is None else tuple(m[s:e] for m in masks)
                f(base[s:e], tuple(m[s:e] for m in models), t, w_t, lam32, out[s:e], mk, div32)
    for _ in run(part, parts):
        pass
