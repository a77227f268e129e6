"""ties: TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint mean."""
from __future__ import annotations

import math

import torch

from ..tensor_ops import scratch
from . import MethodArgs, method

SMALL = 1 << 17        # below this many elements kthvalue is used directly
SAMPLE = 1 << 16       # sample size for bracketing the k-th value of larger tensors
CHUNK = 1 << 19        # elements per model per step of the elementwise combination (2^19 beat
#                        2^13..2^18 and 2^20 on 2 cores: per-op overhead outweighs cache residency)


def kth_smallest(x: torch.Tensor, kth: int) -> torch.Tensor:
    """The ``kth`` smallest value (1-based) of the 1-D tensor ``x``, exactly ``x.kthvalue(kth)``.

    Large tensors avoid a full selection: a fixed sample brackets the answer in [lo, hi]; one
    pass counts the values below lo, one gathers those inside, and ``kthvalue`` runs on that
    small set (about 2% of the values). If the bracket misses (vanishingly rare, e.g. heavy
    ties), it falls back to the full ``kthvalue``. About 5x faster than ``kthvalue`` on 15M."""
    n = x.numel()
    if n <= SMALL:
        return x.kthvalue(kth).values
    gen = torch.Generator(device=x.device).manual_seed(n)
    sample = x[torch.randint(0, n, (SAMPLE,), generator=gen, device=x.device)]
    q = kth / n
    margin = 6 * math.sqrt(SAMPLE * q * (1 - q)) + 32
    lo_i, hi_i = int(q * SAMPLE - margin), int(q * SAMPLE + margin)
    lo = sample.kthvalue(lo_i + 1).values if lo_i > 0 else None          # two selections on the
    hi = sample.kthvalue(hi_i + 1).values if hi_i < SAMPLE - 1 else None  # sample: no sort
    mask = scratch("kth_mask", n, torch.bool, x.device)
    below = int(torch.count_nonzero(torch.lt(x, lo, out=mask))) if lo is not None else 0
    if lo is not None and hi is not None:      # lo <= x <= hi  is  (x <= hi) xor (x < lo)
        inside = x[torch.le(x, hi, out=scratch("kth_mask2", n, torch.bool, x.device)).logical_xor_(mask)]
    elif lo is not None:
        inside = x[torch.ge(x, lo, out=mask)]
    elif hi is not None:
        inside = x[torch.le(x, hi, out=mask)]
    else:
        inside = x
    r = kth - below
    if 1 <= r <= inside.numel():
        return inside.kthvalue(r).values
    return x.kthvalue(kth).values


def thresholds(taus: torch.Tensor, density: float) -> torch.Tensor | None:
    """Per τᵢ, the magnitude below which TIES trims it, shape (n, 1); None when nothing is trimmed.

    As sd-mecha ``filter_top_k``: with N elements, the threshold is the k-th smallest |τᵢ| for
    k = max(⌊(1 − density)·N⌋, 1), and every element with |τ| ≥ threshold is kept (so ties at the
    threshold are all kept, density 1 keeps everything and density 0 keeps the largest)."""
    n, flat = taus.shape[0], taus.reshape(taus.shape[0], -1)
    kth = max(int((1 - density) * flat.shape[1]), 1)
    if kth == 1:
        return None
    out = torch.empty(n, 1, dtype=torch.float32, device=taus.device)
    for i in range(n):
        mag = torch.abs(flat[i], out=scratch("trim_mag", flat.shape[1], torch.float32, taus.device))
        out[i] = kth_smallest(mag, kth)
    return out


def disjoint_mean(taus: torch.Tensor, weights: torch.Tensor, sign: str,
                  trim: torch.Tensor | None = None) -> torch.Tensor:
    """TIES's trim, elect and disjoint merge of task vectors ``taus`` (n, …), float32.

    Values with |τᵢ| below ``trim[i]`` (:func:`thresholds`) count as 0. Per element: the elected
    sign s = sgn(Σᵢ wᵢτᵢ) (``sign="sum"``, the paper's) or s = sgn(Σᵢ sgn τᵢ) (``"count"``,
    sd-mecha's ``vote_sgn=False`` default); the result is Σᵢ wᵢτᵢ·[τᵢ·s > 0] / Σᵢ wᵢ·[τᵢ·s > 0],
    and 0 where no τᵢ agrees (sd-mecha ``ties_sum`` with unit weights; weighted as mergekit's TIES).

    Computed in cache-sized chunks with reused buffers and float-only steps (boolean masks cost
    3-4x more here): trimming is ``hardshrink`` just below the threshold, and with
    r = relu(τ·s) — |τ| where τ agrees with s, else 0 — the sums are s·Σwr and Σw·sgn(r)."""
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    total, dev = flat.shape[1], taus.device
    out = torch.empty(total, dtype=torch.float32, device=dev)
    w = weights.to(dev).reshape(n, 1)
    unit = bool((weights == 1).all())
    # |τ| > the float just below the threshold  <=>  |τ| >= threshold (sd-mecha keeps ties)
    lam = None if trim is None else [float(torch.nextafter(x, x.new_tensor(-1.0))) for x in trim.reshape(-1)]
    size = n * min(CHUNK, total)
    work, wtd, kept = (scratch(f"dm_{k}", size, torch.float32, dev) for k in ("work", "wtd", "kept"))
    s_buf, num_buf, den_buf = (scratch(f"dm_{k}", CHUNK, torch.float32, dev) for k in ("s", "num", "den"))
    for start in range(0, total, CHUNK):
        t = flat[:, start:start + CHUNK]
        c = t.shape[1]
        a, v = work[:n * c].view(n, c), wtd[:n * c].view(n, c)
        s, num, den = s_buf[:c], num_buf[:c], den_buf[:c]
        if lam is not None:
            k = kept[:n * c].view(n, c)
            for i in range(n):
                torch.ops.aten.hardshrink.out(t[i], lam[i], out=k[i])
            t = k
        wt = t if unit else torch.mul(t, w, out=v)
        torch.sum(wt if sign == "sum" else torch.sign(t, out=a), 0, out=s)
        s.sign_()
        r = torch.mul(t, s, out=a).relu_()
        torch.sum(r if unit else torch.mul(r, w, out=v), 0, out=num).mul_(s)
        torch.sign(r, out=r)
        torch.sum(r if unit else r.mul_(w), 0, out=den)
        torch.div(num, den, out=out[start:start + c])
    return out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).reshape(taus.shape[1:])


@method("ties", second="density", defaults={"density": 0.2}, reads=("density", "sign"),
        reference="Yadav et al. 2023, 'TIES-Merging', arXiv 2306.01708; sd-mecha merge_methods/ties.py ties_sum",
        formula="BASE + λ·disjoint_mean(elect(trim_k(τ₁…τₙ)))")
def ties(taus: torch.Tensor, args: MethodArgs, generator) -> torch.Tensor:
    """Trim each τᵢ to its top-k (k = density) by magnitude (:func:`thresholds`), elect the sign
    per element and average the agreeing entries (:func:`disjoint_mean`)."""
    return disjoint_mean(taus, args.weight_tensor(taus.shape[0]), args.sign, thresholds(taus, args.density))
