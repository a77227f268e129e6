"""Dropout shared by the DARE and DELLA methods: seeded masks, then TIES and the rescale."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import kernels
from ..kernels import bernoulli, dare, della_mask, ranks, ties_combine
from ..kernels.della_mask import della_keep, keep_of
from ..tensor_ops import scratch
from . import MethodArgs
from .ties import disjoint_mean, thresholds, trim_rank


def drop_(taus: torch.Tensor, p: float, generator: torch.Generator, della_eps: float = 0.0) -> torch.Tensor:
    """Zero each element of each τᵢ with probability p, in place (not yet rescaled).

    As sd-mecha ``find_della_dropout``: the keep mask is ``bernoulli(clamp(1 − p + δ, 0, 1))``
    drawn from ``generator`` model after model over each τᵢ's shape, so one seed gives sd-mecha's
    masks. δ = 0 for DARE; for DELLA (``della_eps`` > 0) δ = ε·(rank/N − (N+1)/(2N)) with rank the
    1-based position of |τ| in ascending order (ties by position), so larger magnitudes are kept
    more often (:func:`..kernels.della_mask.della_keep`). On the CPU the masks come from
    :mod:`..kernels.bernoulli` (the same values and generator state as ``torch.bernoulli``),
    DELLA's from :mod:`..kernels.della_mask` (no sort; the same masked τ) or, for small tensors,
    the ranks of :mod:`..kernels.ranks`; where numba cannot compile them here (before anything
    is drawn or changed), from torch."""
    fast = bernoulli.usable(generator) and taus.device.type == "cpu"
    try:
        return _drop(taus, p, generator, della_eps, fast)
    except Exception as e:
        if not (fast and kernels.compile_failed(e)):
            raise
        return _drop(taus, p, generator, della_eps, False)


def _drop(taus: torch.Tensor, p: float, generator: torch.Generator, della_eps: float, fast: bool) -> torch.Tensor:
    for t in taus:
        n = t.numel()
        out = scratch("drop_mask", n, torch.float32, t.device).view(t.shape)
        if not fast:
            keep = scratch("drop_keep", n, torch.float32, t.device).view(t.shape).fill_(keep_of(p))
            if della_eps:
                rank = torch.empty(n, dtype=torch.int64, device=t.device)
                rank[torch.argsort(t.abs().reshape(-1), stable=True)] = torch.arange(1, n + 1, device=t.device)
                keep = della_keep(rank, n, p, della_eps).view(t.shape)
            t.mul_(torch.bernoulli(keep, generator=generator, out=out))
        elif della_eps:
            flat = t.reshape(-1)
            della_mask_(lambda: flat, (flat.numpy(),), p, della_eps, generator, out.view(-1).numpy())
            t.mul_(out)
        else:                           # one probability for every element: no tensor of it
            t.mul_(bernoulli.bernoulli_(keep_of(p), out, generator))
    return taus


def della_mask_(tau, src: tuple, p: float, eps: float, generator: torch.Generator, out: np.ndarray) -> None:
    """One tensor's DELLA keep mask into ``out`` (uint8 or float32 numpy) from ``generator``:
    :func:`..kernels.della_mask.masks` where it applies (``src``: its kernel views), else the
    ranks of :mod:`..kernels.ranks` (``tau()``: the float32 τ, flat) and the per-element draw."""
    n = out.size
    if della_mask.masks(src, n, p, eps, generator, out, *kernels.split_for(n)):
        return
    rank = torch.from_numpy(ranks.ranks(tau().abs().numpy()))
    bernoulli.bernoulli_(della_keep(rank, n, p, eps), out, generator)


def dropped_ties(taus: torch.Tensor, args: MethodArgs, generator, della_eps: float) -> torch.Tensor:
    """Drop (DARE or DELLA), TIES-combine with density k, rescale by 1/(1 − p): sd-mecha
    ``ties_sum_with_dropout`` with ``apply_stock=True`` (plain TIES; see README on that flag).
    p ≈ 1 gives 0 (the base), as sd-mecha."""
    p = args.drop
    if math.isclose(p, 1.0):
        return torch.zeros(taus.shape[1:], dtype=torch.float32, device=taus.device)
    drop_(taus, p, generator, della_eps)
    trim = thresholds(taus, args.density)
    return disjoint_mean(taus, args.weight_tensor(taus.shape[0]), args.sign, trim).div_(1.0 - p)


def dare_linear_fused(base, models, lam: float, args: MethodArgs, out_dtype: torch.dtype, memo=None, out=None):
    """dare_linear for one CPU key straight from the inputs (:func:`_dare_fused`)."""
    return _dare_fused(base, models, lam, args, out_dtype, out, ties=False)


def dare_ties_fused(base, models, lam: float, args: MethodArgs, out_dtype: torch.dtype, memo=None, out=None):
    """dare_ties without trimming (density 1, its default) for one CPU key (:func:`_dare_fused`)."""
    if trim_rank(args.density, base.numel()) > 1:       # trims: the stacked path
        return None
    return _dare_fused(base, models, lam, args, out_dtype, out, ties=True)


def della_fused(base, models, lam: float, args: MethodArgs, out_dtype: torch.dtype, memo=None, out=None):
    """della without trimming (density 1, its default) for one CPU key (:func:`_dare_fused`,
    the masks by :func:`della_mask_`)."""
    if trim_rank(args.density, base.numel()) > 1 or not args.della_eps:
        return None
    return _dare_fused(base, models, lam, args, out_dtype, out, ties=True, della_eps=args.della_eps)


def _dare_fused(base, models, lam: float, args: MethodArgs, out_dtype: torch.dtype, out, ties: bool,
                della_eps: float = 0.0):
    """The key from the inputs: the masks drawn as :func:`drop_` draws them (a generator seeded
    with the recipe's seed, model after model; here into uint8), then one numba pass,
    :mod:`..kernels.dare` or TIES's combination with the masks (:mod:`..kernels.ties_combine`):
    the same bits as the stacked path. None where that does not apply: another device, numba
    missing or failing to compile, ``SDMW_COMPILE=0``, dtypes without kernel views, p = 1, a
    generator state this torch lays out otherwise. SD1.5, base + 4, 2 cores: dare_linear
    2.9–3.7 s and dare_ties 3.3–3.9 s, against 11–13 s and 10.5 s on the stacked path with the
    fast masks, 37.5 s and 35.0 s with ``torch.bernoulli``."""
    p = args.drop
    generator = torch.Generator().manual_seed(args.seed)
    if math.isclose(p, 1.0) or not bernoulli.usable(generator):
        return None
    n, w = len(models), args.weight_tensor(len(models)).tolist()

    def body(b, ms, into, parts, run):
        masks = scratch("dare_masks", n * b.size, torch.uint8).numpy().reshape(n, b.size)
        if della_eps:
            for i, m in enumerate(models):
                della_mask_(lambda: m.float().sub_(base.float()).reshape(-1), (b, ms[i]), p, della_eps, generator,
                            masks[i])
        else:
            bernoulli.bernoulli_(keep_of(p), masks, generator)
        if ties:
            ties_combine.combine(b, ms, [-np.inf] * n, w, lam, args.sign == "count", into, parts, run, masks,
                                 1.0 - p)
        else:
            dare.linear(b, ms, masks, w, 1.0 - p, lam, into, parts, run)
    return kernels.fused_key(base, models, out_dtype, out, body)
