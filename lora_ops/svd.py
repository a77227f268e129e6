"""Low-rank factorisation of a weight difference into LoRA up/down (kohya's SVD step)."""
from __future__ import annotations

import torch


def low_rank(mat: torch.Tensor, rank: int, clamp_quantile: float = 0.99, fast: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW (out, in[, k, k]) -> (up, down) with up @ down ≈ ΔW, as kohya's
    ``extract_lora_from_models.py``: U·S and Vh of the truncated SVD, both clamped to the
    ``clamp_quantile`` of their values (±). ``fast`` uses a randomized SVD
    (``torch.svd_lowrank``, rank + 8 oversampling, 4 power iterations) instead of the full one."""
    shape = mat.shape
    out_dim, in_dim = shape[0], shape[1]
    m = mat.float().reshape(out_dim, -1)
    rank = min(rank, m.shape[0], m.shape[1])
    if fast and rank < min(m.shape) // 2:
        U, S, V = torch.svd_lowrank(m, q=min(rank + 8, min(m.shape)), niter=4)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].T
    else:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    U = U @ torch.diag(S)
    if clamp_quantile < 1:
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi = torch.quantile(dist, clamp_quantile) if dist.numel() <= 16_000_000 else \
            torch.kthvalue(dist, int(dist.numel() * clamp_quantile)).values
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if len(shape) == 4:
        return U.reshape(out_dim, rank, 1, 1), Vh.reshape(rank, in_dim, *shape[2:])
    return U, Vh
