"""ties: TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint mean."""
from __future__ import annotations

import math

import torch

from . import MethodArgs, method

SMALL = 1 << 20        # below this many elements kthvalue is used directly
SAMPLE = 1 << 16       # sample size for bracketing the k-th value of larger tensors
CHUNK = 1 << 16        # elements per model per step of the elementwise combination


def kth_smallest(x: torch.Tensor, kth: int) -> torch.Tensor:
    """The ``kth`` smallest value (1-based) of the 1-D tensor ``x``, exactly ``x.kthvalue(kth)``.

    Large tensors avoid a full selection: a fixed sample brackets the answer in [lo, hi]; one
    pass counts the values below lo and gathers those inside, and ``kthvalue`` runs on that small
    set. If the bracket misses (vanishingly rare, e.g. heavy ties), it falls back to the full
    ``kthvalue``. About 2x faster than ``kthvalue`` on 15M values."""
    n = x.numel()
    if n <= SMALL:
        return x.kthvalue(kth).values
    gen = torch.Generator(device=x.device).manual_seed(n)
    sample = x[torch.randint(0, n, (SAMPLE,), generator=gen, device=x.device)].sort().values
    q = kth / n
    margin = 6 * math.sqrt(SAMPLE * q * (1 - q)) + 32
    lo_i, hi_i = int(q * SAMPLE - margin), int(q * SAMPLE + margin)
    lo = sample[lo_i] if lo_i > 0 else None
    hi = sample[hi_i] if hi_i < SAMPLE - 1 else None
    below = int((x < lo).sum()) if lo is not None else 0
    inside = x
    if lo is not None:
        inside = inside[inside >= lo]
    if hi is not None:
        inside = inside[inside <= hi]
    r = kth - below
    if 1 <= r <= inside.numel():
        return inside.kthvalue(r).values
    return x.kthvalue(kth).values


def trim_(taus: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of each τᵢ by magnitude, zero the rest, in place.

    As sd-mecha ``filter_top_k``: with N elements, the threshold is the k-th smallest |τᵢ| for
    k = max(⌊(1 − density)·N⌋, 1), and every element with |τ| ≥ threshold is kept (so ties at the
    threshold are all kept, density 1 keeps everything and density 0 keeps the largest)."""
    for t in taus:
        flat = t.reshape(-1)
        kth = max(int((1 - density) * flat.numel()), 1)
        if kth == 1:
            continue
        mag = flat.abs()
        flat.mul_(mag >= kth_smallest(mag, kth))
    return taus


def disjoint_mean(taus: torch.Tensor, weights: torch.Tensor, sign: str) -> torch.Tensor:
    """TIES's elect + disjoint merge of trimmed task vectors ``taus`` (n, …), float32.

    Per element: the elected sign s = sgn(Σᵢ wᵢτᵢ) (``sign="sum"``, the paper's) or
    s = sgn(Σᵢ sgn τᵢ) (``"count"``, sd-mecha's ``vote_sgn=False`` default); the result is
    Σᵢ wᵢτᵢ·[τᵢ·s > 0] / Σᵢ wᵢ·[τᵢ·s > 0], and 0 where no τᵢ agrees (sd-mecha ``ties_sum``
    with unit weights; weighted as mergekit's TIES). Computed in cache-sized chunks."""
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=torch.float32, device=taus.device)
    w = weights.to(taus.device).reshape(n, 1)
    unit = bool((weights == 1).all())
    for start in range(0, flat.shape[1], CHUNK):
        t = flat[:, start:start + CHUNK]
        wt = t if unit else t * w
        s = (wt.sum(0) if sign == "sum" else t.sign().sum(0)).sign_()
        agree = (t * s) > 0
        num = (wt * agree).sum(0)
        den = agree.sum(0, dtype=torch.float32) if unit else (w * agree).sum(0)
        torch.div(num, den, out=out[start:start + t.shape[1]])
    return out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).reshape(taus.shape[1:])


@method("ties", second="density", defaults={"density": 0.2}, reads=("density", "sign"),
        reference="Yadav et al. 2023, 'TIES-Merging', arXiv 2306.01708; sd-mecha merge_methods/ties.py ties_sum",
        formula="BASE + λ·disjoint_mean(elect(trim_k(τ₁…τₙ)))")
def ties(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """Trim each τᵢ to its top-k (k = density) by magnitude (:func:`trim_`), elect the sign per
    element and average the agreeing entries (:func:`disjoint_mean`)."""
    trim_(taus, args.density)
    return disjoint_mean(taus, args.weight_tensor(taus.shape[0]), args.sign)
