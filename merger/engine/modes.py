"""The four merge modes as pure tensor functions, with SuperMerger's exact arithmetic.

Each writes into ``out`` (same shape and dtype as ``a``) and returns the result; a function may
return ``a`` itself when the result equals A (nothing to compute). Inputs are already in A's dtype.
Rounding follows SuperMerger's default ("new calc method") paths, so fp16 results are
bit-identical to it: weight sum and sum twice interpolate in float32 and round once; add
difference and triple sum round their intermediate steps to the model dtype as it does.
"""
from __future__ import annotations

import torch

from .tensor_ops import CHUNK, chunked, out_like


def _scratch(a: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(min(a.numel(), CHUNK), dtype=dtype or a.dtype, device=a.device)


def weight_sum(a, b, alpha: float, out=None):
    """(1-α)A + αB = ``lerp(A, B, α)`` computed in float32, rounded once (SuperMerger
    ``torch.lerp(A.float(), B.float(), α).to(dtype)``; α=0 keeps A, α=1 takes B)."""
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    return torch.lerp(a, b, alpha, out=out_like(a, out))


def add_difference(a, b, c, alpha: float, out=None):
    """A + α(B-C): ``d = round(B-C)``, ``A + round(α·d)`` (SuperMerger ``theta_0 + α·theta_1``
    where theta_1 = (B-C) in the model dtype)."""
    tmp = _scratch(a)

    def body(o, x, y, z):
        t = tmp[: o.numel()]
        torch.sub(y, z, out=t)
        t.mul_(alpha)
        torch.add(x, t, out=o)
    return chunked(out_like(a, out), (a, b, c), body)


def triple_sum(a, b, c, alpha: float, beta: float, out=None):
    """(1-α-β)A + αB + βC = ``lerp(A, lerp(B, C, β/(α+β)), α+β)`` (SuperMerger; the plain
    weighted sum when α+β = 0)."""
    s = alpha + beta
    tmp = _scratch(a)
    if s != 0:
        def body(o, x, y, z):
            t = tmp[: o.numel()]
            torch.lerp(y, z, beta / s, out=t)
            torch.lerp(x, t, s, out=o)
    else:
        def body(o, x, y, z):
            t = tmp[: o.numel()]
            torch.mul(x, 1 - alpha - beta, out=o)
            torch.mul(y, alpha, out=t)
            o.add_(t)
            torch.mul(z, beta, out=t)
            o.add_(t)
    return chunked(out_like(a, out), (a, b, c), body)


def sum_twice(a, b, c, alpha: float, beta: float, out=None):
    """(1-β)((1-α)A + αB) + βC = ``lerp(lerp(A, B, α), C, β)`` in float32, rounded once."""
    if a.dtype == torch.float32:
        def body(o, x, y, z):
            torch.lerp(x, y, alpha, out=o)
            o.lerp_(z, beta)
    else:
        s1, s2 = _scratch(a, torch.float32), _scratch(a, torch.float32)

        def body(o, x, y, z):
            n = o.numel()
            t, u = s1[:n], s2[:n]
            t.copy_(x)
            u.copy_(y)
            t.lerp_(u, alpha)
            u.copy_(z)
            t.lerp_(u, beta)
            o.copy_(t)
    return chunked(out_like(a, out), (a, b, c), body)
