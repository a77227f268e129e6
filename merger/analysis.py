"""Comparing two models block by block (Analysis tab): cosine similarity of each tensor, and
SuperMerger's ASimilarity (similarity of self-attention outputs on a fixed random input)."""
from __future__ import annotations

import re
from statistics import mean

import torch
import torch.nn.functional as F

from .blocks import block_ids, block_of

PARTS = {"U-Net": "model.diffusion_model.", "text encoder": ("cond_stage_model.", "conditioner."),
         "VAE": "first_stage_model."}


def tensor_cosines(a, b, arch: str, parts=("U-Net", "text encoder")) -> list[tuple[str, str, float]]:
    """(block, key, 100·cos(a, b)) for every float tensor both models share with equal shapes
    (SuperMerger's Analysis "Element" rows); VAE keys get block "VAE"."""
    rows = []
    prefixes = tuple(p for part in parts for p in ((PARTS[part],) if isinstance(PARTS[part], str) else PARTS[part]))
    for key, ta in a.items():
        tb = b.get(key)
        if tb is None or ta.shape != tb.shape or not ta.is_floating_point() or not key.startswith(prefixes):
            continue
        if "model_ema" in key or not ("weight" in key or "bias" in key):
            continue
        sim = F.cosine_similarity(ta.reshape(1, -1).float(), tb.reshape(1, -1).float()).item()
        block = "VAE" if key.startswith("first_stage_model.") else block_of(key, arch)
        rows.append((block, key, round(sim * 100, 3)))
    return rows


def block_cosines(a, b, arch: str, parts=("U-Net", "text encoder"), how: str = "mean") -> list[tuple[str, float]]:
    """Per block, in block order: the mean or the min of its tensors' cosine similarities, or
    (``how="attn2"``, SuperMerger's Block method "attn2") the similarity of the block's
    cross-attention output projection ``attn2.to_out.0.weight``; blocks without cross-attention
    are left out. SDXL blocks with several transformer blocks get the mean of theirs (SuperMerger
    keys them by sub-block and finds none at block level)."""
    per: dict[str, list[float]] = {}
    for block, key, sim in tensor_cosines(a, b, arch, parts):
        if how != "attn2" or key.endswith("attn2.to_out.0.weight"):
            per.setdefault(block, []).append(sim)
    agg = min if how == "min" else mean
    return [(blk, round(agg(per[blk]), 3)) for blk in block_ids(arch) + ["VAE"] if blk in per]


def _attn_out(q, k, v, x):
    """SuperMerger ``cal_cross_attn``: einsum("ik,jk->ik", softmax(xWq (xWk)^T), xWv)."""
    qx, kx, vx = x @ q.T, x @ k.T, x @ v.T
    return torch.einsum("ik,jk->ik", F.softmax(qx @ kx.T, dim=-1), vx)


def asimilarity(a, b, arch: str) -> list[tuple[str, float]]:
    """Per block with self-attention: 100 × mean cosine similarity of the first transformer
    block's attn1 output for A and B on the same random input (seed 2244096, as SuperMerger)."""
    pat = re.compile(r"model\.diffusion_model\.(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\."
                     r"transformer_blocks\.0\.attn1\.to_q\.weight$")
    gen = torch.Generator().manual_seed(2244096)
    rows = []
    for key in a:
        m = pat.match(key)
        if not m or key not in b:
            continue
        base = key[: -len("to_q.weight")]
        q, k, v = (a[base + n + ".weight"].float() for n in ("to_q", "to_k", "to_v"))
        q2, k2, v2 = (b[base + n + ".weight"].float() for n in ("to_q", "to_k", "to_v"))
        hidden, embed = q.shape
        x = torch.randn((embed, hidden), generator=gen)
        sim = torch.cosine_similarity(_attn_out(q, k, v, x), _attn_out(q2, k2, v2, x)).mean().item()
        rows.append((block_of(key, arch), round(sim * 100, 3)))
    order = {blk: i for i, blk in enumerate(block_ids(arch))}
    return sorted(rows, key=lambda r: order[r[0]])
