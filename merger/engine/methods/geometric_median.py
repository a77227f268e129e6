"""geometric_median: the geometric median of N models (Weiszfeld's algorithm)."""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..kernels import median
from . import MethodArgs, method, remembered

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


def geometric_median_fused(base, models, lam: float, args: MethodArgs, out_dtype: torch.dtype, memo=None,
                           out=None):
    """The key straight from the inputs on the CPU: the same iterations as :func:`weiszfeld`, each
    one pass of :mod:`..kernels.median` (the median made and measured element by element, never
    stored), then one pass writing BASE + λ·m. The final weights βᵢ depend on the models and
    their weights only: ``memo`` keeps them, so a merge with another λ is one pass. Sums run in
    model order and the distances' squares add up in float64, so the result may differ from the
    eager path's (BLAS ``tensordot``, ``torch.dist``) in the last float32 bits. None (the eager
    path) on another device, without numba, with ``SDMW_COMPILE=0``, for dtypes without kernel
    views, or with a weight ≤ 0."""
    w = args.weight_tensor(len(models)).numpy()
    if bool((w <= 0).any()):
        return None
    tag = ("weiszfeld", tuple(w.tolist()))

    def body(b, ms, into, parts, run):
        beta = remembered(memo, tag, lambda: _final_weights(lambda x: median.distances(b, ms, x, parts, run), w))
        median.write(b, ms, beta, lam, into, parts, run)
    return kernels.fused_key(base, models, out_dtype, out, body)


def _final_weights(distances, w: np.ndarray, eps: float = EPS, maxiter: int = MAXITER,
                   ftol: float = FTOL) -> np.ndarray:
    """:func:`weiszfeld`'s loop on the weights βᵢ alone, in float32 as torch runs it;
    ``distances(β)`` gives ‖τᵢ − m(β)‖. Returns the β of the median it would return."""
    d = distances(w)
    objective = np.float32((d * w).mean(dtype=np.float32))
    beta = w
    for _ in range(max(0, maxiter)):
        prev = objective
        beta = (w / np.maximum(d, np.float32(eps))).astype(np.float32)
        d = distances(beta)
        objective = np.float32((d * w).mean(dtype=np.float32))
        if abs(prev - objective) <= np.float32(ftol) * objective:
            break
    return beta


@method("geometric_median", fused=geometric_median_fused,
        reference="Weiszfeld 1937; Pillutla et al. 2022 'Robust Aggregation for Federated Learning'; "
                  "sd-mecha merge_methods/ties.py geometric_median",
        formula="BASE + λ·argmin_m Σᵢ wᵢ‖τᵢ − m‖")
def geometric_median(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """A robust average: the geometric median of the task vectors. It moves with the base, so
    with λ = 1 the result is the geometric median of the models whatever the base."""
    return weiszfeld(taus, args.weight_tensor(taus.shape[0]))
