"""geometric_median: the geometric median of N models (Weiszfeld's algorithm)."""
from __future__ import annotations

import torch

from . import MethodArgs, method

EPS, MAXITER, FTOL = 1e-6, 100, 1e-20     # sd-mecha's defaults


def weiszfeld(points: torch.Tensor, weights: torch.Tensor, eps: float = EPS, maxiter: int = MAXITER,
              ftol: float = FTOL) -> torch.Tensor:
    """The point minimising Σᵢ wᵢ‖pᵢ − m‖ over the rows of ``points`` (n, …), float32.

    As sd-mecha ``geometric_median`` (after Pillutla et al.'s ``geom_median``): start from the
    weighted mean; repeat up to ``maxiter`` times: βᵢ = wᵢ / max(‖pᵢ − m‖, eps),
    m = Σβᵢpᵢ / Σβᵢ; stop when the objective mean(wᵢ‖pᵢ − m‖) changes by ≤ ftol × itself.
    Each iteration's distances serve both its objective and the next iteration's weights."""
    n = points.shape[0]
    flat = points.reshape(n, -1)
    w = weights.to(points.device)

    def average(beta):
        return torch.tensordot(beta, flat, dims=1).div_(beta.sum())

    def dists(m):
        return torch.stack([torch.dist(p, m) for p in flat])

    median = average(w)
    d = dists(median)
    objective = (d * w).mean()
    beta = w
    for _ in range(max(0, maxiter)):
        prev = objective
        beta = w / d.clamp(min=eps)
        median = average(beta)
        d = dists(median)
        objective = (d * w).mean()
        if abs(prev - objective) <= ftol * objective:
            break
    return median.reshape(points.shape[1:])


@method("geometric_median",
        reference="Weiszfeld 1937; Pillutla et al. 2022 'Robust Aggregation for Federated Learning'; "
                  "sd-mecha merge_methods/ties.py geometric_median",
        formula="BASE + λ·argmin_m Σᵢ wᵢ‖τᵢ − m‖")
def geometric_median(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """A robust average: the geometric median of the task vectors. It moves with the base, so
    with λ = 1 the result is the geometric median of the models whatever the base."""
    return weiszfeld(taus, args.weight_tensor(taus.shape[0]))
