"""A fixed-rank LoRA from a DyLoRA file (sd-scripts ``networks/extract_lora_from_dylora.py``).

DyLoRA trains every rank up to its dim at once, ordered: the first r rows of each ``lora_down`` and
the first r columns of each ``lora_up`` are a rank-r LoRA. As sd-scripts, alphas are kept as
trained (not rescaled), ``ss_network_dim`` becomes r and the training comment says where it came
from; the module becomes ``networks.lora`` so the result loads as an ordinary LoRA. The rank must
be a multiple of the DyLoRA's unit (``ss_network_args`` ``unit``; 1 if not recorded) and at most
its dim.
"""
from __future__ import annotations

import json

import torch

from merger.errors import MergeError

from .formats import LoraFile


def dylora_unit(lora: LoraFile) -> int:
    try:
        return max(1, int(json.loads(lora.metadata.get("ss_network_args", "{}") or "{}").get("unit", 1)))
    except (ValueError, TypeError, AttributeError):
        return 1


def extract_dylora_rank(lora: LoraFile, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of the rank-``rank`` LoRA inside a DyLoRA."""
    if lora.network_type() != "DyLoRA":
        raise MergeError(f"{lora.name} is {lora.network_type()}, not a DyLoRA (its ss_network_module does not "
                         f"name dylora)")
    dim, unit = lora.dims()[0] or lora.dims()[1], dylora_unit(lora)
    if not isinstance(rank, int) or rank < 1 or rank % unit or rank > dim:
        raise MergeError(f"rank must be a multiple of {lora.name}'s unit {unit} from {unit} to its dim {dim}, "
                         f"got {rank!r}")
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora.modules.items():
        down, up = m.tensors["lora_down.weight"], m.tensors["lora_up.weight"]
        r = min(rank, down.shape[0])
        sd[f"{name}.lora_down.weight"] = down[:r].contiguous()
        sd[f"{name}.lora_up.weight"] = up[:, :r].contiguous()
        if m.alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(m.alpha)
    meta = dict(lora.metadata)
    comment = meta.get("ss_training_comment", "")
    meta.update(ss_network_dim=str(rank), ss_network_module="networks.lora",
                ss_training_comment=f"split from DyLoRA, rank {dim} to {rank}; {comment}".rstrip("; "))
    return sd, meta
