"""Checkpoints as users have them (issue 17): layout variants of a canonical tiny model, each
with what a merge of it should equal. Next to ``malformed_corpus.py``, which holds the files that
must be refused; these must be accepted.

Each variant is built from a canonical state dict and says which canonical keys it lacks (their
merged value then comes from the other model) and its dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from merger.engine.key_coverage import last_layers

TE = "cond_stage_model.transformer.text_model."
UNET = "model.diffusion_model."


@dataclass
class Variant:
    name: str
    arch: str
    tensors: dict[str, torch.Tensor]
    lacks: set[str] = field(default_factory=set)      # canonical keys the variant does not have
    dtype: torch.dtype = torch.float16                # its float dtype


def _drop(sd: dict, pattern: str) -> tuple[dict, set]:
    gone = {k for k in sd if re.match(pattern, k)}
    assert gone, pattern
    return {k: v for k, v in sd.items() if k not in gone}, gone


def sd1_variants(canonical: dict[str, torch.Tensor]) -> list[Variant]:
    out = []
    # A1111's checkpoint_dict_replacements: the old text-encoder layout without "text_model."
    old = {(k.replace(TE, "cond_stage_model.transformer.", 1) if k.startswith(TE) else k): v
           for k, v in canonical.items()}
    out.append(Variant("sd1-old-text-encoder-layout", "sd1", old))
    # a full training checkpoint: EMA copies of the U-Net (different values) and counters
    ema = dict(canonical)
    g = torch.Generator().manual_seed(77)
    for k, v in canonical.items():
        if k.startswith(UNET):
            ema["model_ema." + k[len("model."):].replace(".", "")] = (
                v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
    ema["model_ema.decay"] = torch.tensor(0.9999)
    out.append(Variant("sd1-with-ema", "sd1", ema))
    sd, gone = _drop(canonical, r"first_stage_model\.")
    out.append(Variant("sd1-no-vae", "sd1", sd, gone))
    sd, gone = _drop(canonical, r".*position_ids$")
    out.append(Variant("sd1-no-position-ids", "sd1", sd))          # not merged either way
    sd, _ = _drop(canonical, r"(alphas_cumprod|betas|model_ema\.)")
    out.append(Variant("sd1-no-schedule-or-ema-buffers", "sd1", sd))
    out.append(Variant("sd1-fp32", "sd1", {k: v.float() if v.is_floating_point() else v
                                           for k, v in canonical.items()}, dtype=torch.float32))
    out.append(Variant("sd1-bf16", "sd1", {k: v.bfloat16() if v.is_floating_point() else v
                                           for k, v in canonical.items()}, dtype=torch.bfloat16))
    return out


def sdxl_variants(canonical: dict[str, torch.Tensor]) -> list[Variant]:
    last = last_layers(canonical)
    out = []
    sd, gone = _drop(canonical, rf"conditioner\.embedders\.0\.transformer\.text_model\."
                                rf"(encoder\.layers\.{last['L']}\.|final_layer_norm\.)")
    out.append(Variant("sdxl-no-clip-l-last-layer", "sdxl", sd, gone))
    sd, gone = _drop(canonical, rf"conditioner\.embedders\.1\.model\.transformer\.resblocks\.{last['G']}\.")
    out.append(Variant("sdxl-no-clip-g-last-block", "sdxl", sd, gone))
    sd, gone = _drop(canonical, r"conditioner\.embedders\.1\.model\.(ln_final\.|text_projection|logit_scale)")
    out.append(Variant("sdxl-no-pooled-projection", "sdxl", sd, gone))
    return out
