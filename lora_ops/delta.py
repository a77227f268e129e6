"""ΔW of one LoRA module (pure tensor math, float32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import LoraModule


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, mid: torch.Tensor | None = None) -> torch.Tensor:
    """kohya ``merge_lora``: ΔW = scale · up @ down for Linear and 1x1 conv; for a k×k conv
    ``conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3)`` (= up applied after down); a LoCon
    Tucker ``mid`` core is folded in first."""
    down, up = down.float(), up.float()
    if mid is not None:   # LyCORIS LoCon with a Tucker core: up (1x1) · mid (k×k) · down (1x1)
        return torch.einsum("i j k l, j r, p i -> p r k l", mid.float(), down.flatten(1), up.flatten(1)) * scale
    if down.dim() == 2:
        return (up @ down) * scale
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3) * scale
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def loha_delta(w1a, w1b, w2a, w2b, scale: float, t1=None, t2=None) -> torch.Tensor:
    """LyCORIS LoHa: ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b), reshaped to the weight's shape;
    with Tucker cores t1/t2 (3x3 convs) each factor is ``einsum(t, b, a)``."""
    w1a, w1b, w2a, w2b = (w.float() for w in (w1a, w1b, w2a, w2b))
    if t1 is not None and t2 is not None:
        p1 = torch.einsum("i j k l, j r, i p -> p r k l", t1.float(), w1b, w1a)
        p2 = torch.einsum("i j k l, j r, i p -> p r k l", t2.float(), w2b, w2a)
        return p1 * p2 * scale
    out = (w1a @ w1b.flatten(1)) * (w2a @ w2b.flatten(1)) * scale
    return out.reshape(w1a.shape[0], *w1b.shape[1:])


def lokr_delta(w1, w2, scale: float) -> torch.Tensor:
    """LyCORIS LoKr: ΔW = scale · kron(w1, w2) (each side given whole or as a product a @ b)."""
    w1, w2 = w1.float(), w2.float()
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2) * scale


def module_delta(m: LoraModule, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of a module for a weight of ``shape`` (alpha defaults to the rank: scale 1)."""
    t = m.tensors
    if m.kind == "lora":
        rank = t["lora_down.weight"].shape[0]
        alpha = m.alpha if m.alpha is not None else rank
        d = lora_delta(t["lora_down.weight"], t["lora_up.weight"], alpha / rank, t.get("lora_mid.weight"))
    elif m.kind == "loha":
        rank = t["hada_w1_b"].shape[0]
        alpha = m.alpha if m.alpha is not None else rank
        d = loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha / rank,
                       t.get("hada_t1"), t.get("hada_t2"))
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"].float(), t["lokr_w2_a"].float(),
                              t["lokr_w2_b"].float())
        else:
            w2b = t["lokr_w2_b"].float()
            w2 = (t["lokr_w2_a"].float() @ w2b.flatten(1)).reshape(t["lokr_w2_a"].shape[0], *w2b.shape[1:])
        rank = m.rank
        scale = (m.alpha / rank) if (m.alpha is not None and rank) else 1.0
        d = lokr_delta(w1, w2, scale)
    if d.numel() != torch.Size(shape).numel():
        raise ValueError(f"{m.name}: ΔW {list(d.shape)} does not fit {list(shape)}")
    return d.reshape(shape)
