"""Masked (regional) LoRA at generation, as kohya's Additional Networks does it.

A mask image's R, G and B channels (0-255 → weight 0-1) restrict LoRA slots 1, 2 and 3 to regions
of the picture. The LoRA is not added into the weights but applied as a hook on each U-Net layer
it patches: ``output += ΔW·x × mask``, with the mask resized (bilinear, from the mask image) to the
layer's resolution: the latent size and its halvings (rounded up, plus the even size next to an
odd one), for the base size and a hires size. Layers fed by the text context or the time
embedding (``attn2.to_k``, ``attn2.to_v``, ``time_emb_proj``) get the LoRA unmasked, and the text
encoder's part is added into its weights as usual (it has no picture to mask). With an all-white
mask this gives the image the weight-added LoRA gives (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..arch import UNET
from ..errors import MergeError

UNMASKED = ("attn2.to_k", "attn2.to_v", "time_emb_proj")


def rgb_masks(image) -> list[torch.Tensor]:
    """The R, G, B channels of a PIL image as (h, w) float tensors in [0, 1]."""
    import numpy as np
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return [torch.from_numpy(arr[:, :, i].copy()) for i in range(3)]


def mask_levels(mask: torch.Tensor, sizes) -> dict[int, torch.Tensor]:
    """area (h·w) -> the mask resized to (1, 1, h, w) for every U-Net resolution of the images
    ``sizes`` [(width, height)] (Additional Networks' ``set_mask``)."""
    m = mask[None, None].float()
    out: dict[int, torch.Tensor] = {}
    for width, height in sizes:
        h, w = height // 8, width // 8
        for _ in range(4):
            for mh, mw in {(h, w), (h + h % 2, w + w % 2)}:
                out[mh * mw] = F.interpolate(m, (mh, mw), mode="bilinear")
            h, w = (h + 1) // 2, (w + 1) // 2
    return out


class RegionalLoras:
    """Hooks adding masked LoRAs to the U-Net for one generation (a context manager): only the
    appliers' U-Net keys are hooked (the caller adds their text-encoder part to the weights).

    ``entries``: [(LoraApplier, mask levels or None)] — None applies that LoRA everywhere."""

    def __init__(self, rp, entries):
        self.rp, self.entries, self.handles = rp, entries, []

    def __enter__(self):
        try:
            for applier, levels in self.entries:
                for key in applier.keys:
                    if not key.startswith(UNET):
                        continue
                    delta = applier.delta(key)
                    for target, param in self.rp.targets_of(key):
                        module = self.rp.module_of(target)
                        masked = levels if levels is not None and not any(u in target.param for u in UNMASKED) else None
                        d = target.view_of(delta).reshape(param.shape)
                        self.handles.append(module.register_forward_hook(_hook(d, masked, target.param)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _hook(delta: torch.Tensor, levels: dict[int, torch.Tensor] | None, name: str):
    cache: dict = {}

    def add(module, inputs, out):
        x = inputs[0]
        d = cache.get(x.dtype)
        if d is None:
            d = cache[x.dtype] = delta.to(device=x.device, dtype=x.dtype)
        if isinstance(module, torch.nn.Conv2d):
            lx = F.conv2d(x, d, None, module.stride, module.padding, module.dilation, module.groups)
        else:
            lx = F.linear(x, d)
        if levels is not None:
            area = lx.shape[2] * lx.shape[3] if lx.dim() == 4 else lx.shape[1]
            m = levels.get(area)
            if m is None:
                raise MergeError(f"regional LoRA: no mask of area {area} for {name} (sizes not multiples of 8?)")
            m = m.to(device=lx.device, dtype=lx.dtype)
            lx = lx * (m if lx.dim() == 4 else m.reshape(1, -1, 1))
        return out + lx
    return add


def mask_overlay(image, mask, opacity: float = 0.45):
    """The mask laid over a generated picture (to see which LoRA acts where)."""
    from PIL import Image
    return Image.blend(image.convert("RGB"), mask.convert("RGB").resize(image.size), opacity)
