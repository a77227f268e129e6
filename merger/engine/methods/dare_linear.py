"""dare_linear: DARE (Yu et al. 2023, arXiv 2311.03099) drop-and-rescale, then task arithmetic."""
from __future__ import annotations

import math

import torch

from . import MethodArgs, method
from .dropout import drop_


@method("dare_linear", second="drop", random=True, defaults={"drop": 0.9}, reads=("drop",),
        reference="Yu et al. 2023, 'Language Models are Super Mario' (DARE), arXiv 2311.03099",
        formula="BASE + λ·Σᵢ wᵢ·(mᵢ⊙τᵢ)/(1−p), mᵢ ~ Bernoulli(1−p)")
def dare_linear(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """Drop with probability p, rescale by 1/(1 − p), weighted sum (task arithmetic)."""
    p = args.drop
    if math.isclose(p, 1.0):
        return torch.zeros(taus.shape[1:], dtype=torch.float32, device=taus.device)
    drop_(taus, p, generator)
    w = args.weight_tensor(taus.shape[0]).to(taus.device)
    return torch.tensordot(w, taus, dims=1).div_(1.0 - p)
