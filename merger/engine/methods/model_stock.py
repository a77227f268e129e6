"""model_stock: Model Stock (Jang et al. 2024, arXiv 2403.19522)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import median
from . import MethodArgs, method, remembered

COS_EPS = 1e-6
GRAM_CHUNK = 1 << 16


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
    gram = torch.zeros((n, n), dtype=torch.float64, device=taus.device)
    for s in range(0, flat.shape[1], GRAM_CHUNK):     # in float64, a block at a time: one
        block = flat[:, s:s + GRAM_CHUNK].double()    # float32 product over a 15 M-element key
        gram += block @ block.T                       # was 0.3% off in t
    return _t_of_gram(gram.float())


def model_stock_fused(base, models, lam: float, args: MethodArgs, out_dtype: torch.dtype, memo=None, out=None):
    """The key straight from the inputs on the CPU, for the paper's scope (``tensor``): one pass
    makes the task vectors' Gram matrix (:func:`..kernels.median.gram`, in float64 as
    :func:`stock_t`), t follows as there, one pass writes BASE + λ·t·mean(τ) (the mean summed
    in model order as torch's ``mean(dim=0)``): the eager path's bits. t depends on the models
    only: ``memo`` keeps it. None (the eager path) for
    ``row`` scope, on another device, without numba, with ``SDMW_COMPILE=0``, or for dtypes
    without kernel views."""
    if args.stock != "tensor":
        return None

    def body(b, ms, into, parts, run):
        def t() -> float:
            if len(ms) == 1:
                return 1.0
            return float(_t_of_gram(torch.from_numpy(median.gram(b, ms, parts, run)).float()))
        median.write_mean(b, ms, remembered(memo, "stock_t", t), lam, into, parts, run)
    return kernels.fused_key(base, models, out_dtype, out, body)


def _t_of_gram(gram: torch.Tensor) -> torch.Tensor:
    """t = n·cosθ / (1 + (n − 1)·cosθ), cosθ the mean over pairs i < j of gᵢⱼ/max(‖τᵢ‖‖τⱼ‖, eps),
    from the task vectors' float32 Gram matrix (n ≥ 2): the eager and the fused path's t."""
    n = gram.shape[0]
    norms = gram.diagonal().sqrt()
    i, j = torch.triu_indices(n, n, offset=1, device=gram.device)
    cos = (gram[i, j] / (norms[i] * norms[j]).clamp_min(COS_EPS)).mean()
    return n * cos / (1 + (n - 1) * cos)


@method("model_stock", uses_weights=False, reads=("stock",), fused=model_stock_fused,
        reference="Jang et al. 2024, 'Model Stock', arXiv 2403.19522; sd-mecha merge_methods/ties.py "
                  "model_stock (scope row)",
        formula="BASE + λ·t·mean(τ), t = n·cosθ/(1+(n−1)·cosθ)")
def model_stock(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """The average task vector scaled by t (:func:`stock_t`); non-finite values become 0."""
    mean = taus.mean(dim=0)
    t = stock_t(taus, args.stock)
    res = t * (mean if mean.dim() or t.dim() == 0 else mean.reshape(1))
    return res.reshape(mean.shape).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
