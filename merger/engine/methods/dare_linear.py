"""dare_linear: DARE (Yu et al. 2023, arXiv 2311.03099) drop-and-rescale, then task arithmetic."""
from __future__ import annotations

import math

import torch

from . import MethodArgs, method
from .dropout import dare_linear_fused, drop_


@method("dare_linear", second="drop", random=True, defaults={"drop": 0.9}, reads=("drop",),
        reference="Yu et al. 2023, 'Language Models are Super Mario' (DARE), arXiv 2311.03099",
        formula="BASE + λ·Σᵢ wᵢ·(mᵢ⊙τᵢ)/(1−p), mᵢ ~ Bernoulli(1−p)", fused=dare_linear_fused)
def dare_linear(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """Drop with probability p, rescale by 1/(1 − p), weighted sum (task arithmetic), the sum
    taken in model order (a ``tensordot`` before: a BLAS call, whose order and fused multiply-adds
    are the library's and the CPU's; the same up to float32 rounding)."""
    p = args.drop
    if math.isclose(p, 1.0):
        return torch.zeros(taus.shape[1:], dtype=torch.float32, device=taus.device)
    drop_(taus, p, generator)
    w = args.weight_tensor(taus.shape[0]).tolist()
    acc = taus[0].mul(w[0])               # Σᵢ wᵢτᵢ in model order (the fused kernel's order)
    for i in range(1, taus.shape[0]):
        acc.add_(taus[i].mul_(w[i]))
    return acc.div_(1.0 - p)
