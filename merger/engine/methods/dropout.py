"""Dropout shared by the DARE and DELLA methods: seeded masks, then TIES and the rescale."""
from __future__ import annotations

import math

import torch

from .. import kernels
from ..kernels import bernoulli, ranks
from ..tensor_ops import scratch
from . import MethodArgs
from .ties import disjoint_mean, thresholds


def drop_(taus: torch.Tensor, p: float, generator: torch.Generator, della_eps: float = 0.0) -> torch.Tensor:
    """Zero each element of each τᵢ with probability p, in place (not yet rescaled).

    As sd-mecha ``find_della_dropout``: the keep mask is ``bernoulli(clamp(1 − p + δ, 0, 1))``
    drawn from ``generator`` model after model over each τᵢ's shape, so one seed gives sd-mecha's
    masks. δ = 0 for DARE; for DELLA (``della_eps`` > 0) δ = ε·(rank/N − (N+1)/(2N)) with rank the
    1-based position of |τ| in ascending order (ties by position), so larger magnitudes are kept
    more often. On the CPU the masks come from :mod:`..kernels.bernoulli` (the same values and
    generator state as ``torch.bernoulli``)."""
    fast = bernoulli.usable(generator) and taus.device.type == "cpu"
    keep_p = float(torch.ones(1).sub_(p).clamp_(0, 1))       # 1 − p as the float32 torch compares with
    if fast and della_eps:       # every model's |τ| ranks at once on the workers (no RNG in them)
        all_ranks = list(kernels.workers().map(lambda t: ranks.ranks(t.abs().reshape(-1).numpy()), taus))
    for i, t in enumerate(taus):
        n = t.numel()
        if fast and not della_eps:             # one probability for every element: no tensor of it
            keep = None
        else:
            keep = scratch("drop_keep", n, torch.float32, t.device).view(t.shape).fill_(1.0).sub_(p)
        if della_eps:
            ne = n
            if fast:                          # the same ranks, 5x faster (kernels/ranks.py)
                rank = torch.from_numpy(all_ranks[i])
            else:
                rank = torch.empty(ne, dtype=torch.int64, device=t.device)
                rank[torch.argsort(t.abs().reshape(-1), stable=True)] = torch.arange(1, ne + 1, device=t.device)
            delta = ((rank / ne - (ne + 1) / (ne * 2)) * della_eps).reshape(t.shape)
            keep = keep + delta.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        out = scratch("drop_mask", n, torch.float32, t.device).view(t.shape)
        if fast:     # the same masks, drawn 12x faster, the generator advanced as far
            mask = bernoulli.bernoulli_(keep.clamp_(0, 1) if della_eps else keep_p, out, generator)
        else:
            mask = torch.bernoulli(keep.clamp_(0, 1), generator=generator, out=out)
        t.mul_(mask)
    return taus


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
