"""model_stock: Model Stock (Jang et al. 2024, arXiv 2403.19522)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import MethodArgs, method

COS_EPS = 1e-6


def stock_t(taus: torch.Tensor, scope: str) -> torch.Tensor:
    """The interpolation ratio t = n·cosθ / (1 + (n − 1)·cosθ) for n task vectors.

    ``scope="tensor"`` (the paper, the default): cosθ is the mean cosine over all pairs i < j of
    the flattened τᵢ, one t per tensor. ``scope="row"`` (sd-mecha ``get_model_stock_t``, after
    mergekit): cosines along the last axis between consecutive τᵢ, τᵢ₊₁ (eps 1e-6), averaged,
    one t per row. One model gives t = 1."""
    n = taus.shape[0]
    if n == 1:
        return torch.ones((), dtype=torch.float32, device=taus.device)
    if scope == "row":
        rows = taus if taus.dim() > 1 else taus.reshape(n, 1)
        cos = torch.stack([F.cosine_similarity(rows[i], rows[i + 1], dim=-1, eps=COS_EPS)
                           for i in range(n - 1)]).mean(dim=0)
        return (n * cos / (1 + (n - 1) * cos)).unsqueeze(-1)
    flat = taus.reshape(n, -1)
    gram = flat @ flat.T
    norms = gram.diagonal().sqrt()
    i, j = torch.triu_indices(n, n, offset=1)
    cos = (gram[i, j] / (norms[i] * norms[j]).clamp_min(COS_EPS)).mean()
    return n * cos / (1 + (n - 1) * cos)


@method("model_stock", uses_weights=False, reads=("stock",),
        reference="Jang et al. 2024, 'Model Stock', arXiv 2403.19522; sd-mecha merge_methods/ties.py "
                  "model_stock (scope row)",
        formula="BASE + λ·t·mean(τ), t = n·cosθ/(1+(n−1)·cosθ)")
def model_stock(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """The average task vector scaled by t (:func:`stock_t`); non-finite values become 0."""
    mean = taus.mean(dim=0)
    t = stock_t(taus, args.stock)
    res = t * (mean if mean.dim() or t.dim() == 0 else mean.reshape(1))
    return res.reshape(mean.shape).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
