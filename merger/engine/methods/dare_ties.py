"""dare_ties: DARE's drop-and-rescale (arXiv 2311.03099) combined by TIES (arXiv 2306.01708)."""
from __future__ import annotations

import torch

from . import MethodArgs, method
from .dropout import dare_ties_fused, dropped_ties


@method("dare_ties", second="drop", random=True, defaults={"drop": 0.9, "density": 1.0},
        reads=("drop", "density", "sign"),
        reference="Yu et al. 2023, arXiv 2311.03099 with TIES (arXiv 2306.01708); sd-mecha "
                  "merge_methods/ties.py ties_sum_with_dropout (della_eps = 0)",
        formula="BASE + λ·disjoint_mean(elect(trim_k(m⊙τ)))/(1−p)", fused=dare_ties_fused)
def dare_ties(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """DARE's drop, then TIES's trim (density, default 1 = none), sign election and disjoint
    mean, then the 1/(1 − p) rescale."""
    return dropped_ties(taus, args, generator, 0.0)
