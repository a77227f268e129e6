"""della: DELLA-merging (Deep et al. 2024, arXiv 2406.11617), magnitude-ranked drop then TIES."""
from __future__ import annotations

import torch

from . import MethodArgs, method
from .dropout import della_fused, dropped_ties


@method("della", second="drop", random=True, defaults={"drop": 0.9, "density": 1.0},
        reads=("drop", "density", "sign", "della_eps"),
        reference="Deep et al. 2024, 'DELLA-Merging', arXiv 2406.11617; sd-mecha merge_methods/ties.py "
                  "ties_sum_with_dropout with della_eps",
        formula="as dare_ties with keep probability 1−p+ε·(rank/N−(N+1)/2N)", fused=della_fused)
def della(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """Each element's keep probability grows with its magnitude rank (``della_eps`` ε sets the
    spread around 1 − p); then TIES and the 1/(1 − p) rescale, as dare_ties."""
    return dropped_ties(taus, args, generator, args.della_eps)
