"""Cosine similarities between two models' tensors (cosineA/cosineB calcmodes, Analysis tab)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_cos0 = torch.nn.CosineSimilarity(dim=0)


def combined_similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool) -> torch.Tensor:
    """SuperMerger's per-column similarity: mean of the cosine similarity along dim 0 and the
    whole-tensor cosine (``(cos_dim0(a, b) + a·b / (|a||b|)) / 2``), on L2-normalised inputs
    (dim 0) when ``normalize`` (cosineA) or on the raw tensors (cosineB)."""
    a, b = a.float(), b.float()
    if normalize:
        a, b = F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0)
    sim = _cos0(a, b)
    magnitude = torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.norm(a) * torch.norm(b))
    return (sim + magnitude) / 2.0


def sims_range(a_sd, b_sd, normalized_only: bool) -> tuple[float, float]:
    """Min and max of all per-column similarities over the U-Net and text encoder, after
    dropping values below the 1st and above the 99th percentile (SuperMerger ``precosine``).

    cosineA (``normalized_only``) collects ``cos_dim0`` of normalised tensors; cosineB the
    combined similarity of raw tensors. VAE keys are left out, as in SuperMerger."""
    parts = []
    for key, a in a_sd.items():
        if "first_stage_model" in key or "model" not in key or key not in b_sd:
            continue
        b = b_sd[key]
        if a.shape != b.shape:
            continue
        if normalized_only:
            s = _cos0(F.normalize(a.float(), p=2, dim=0), F.normalize(b.float(), p=2, dim=0))
        else:
            s = combined_similarity(a, b, normalize=False)
        parts.append(s.reshape(-1).double().numpy())
    sims = np.concatenate(parts) if parts else np.zeros(1)
    sims = sims[~np.isnan(sims)]
    if sims.size == 0:
        return 0.0, 1.0
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
    sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))
    return float(sims.min()), float(sims.max())
