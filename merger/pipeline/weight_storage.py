"""Weights stored in fp16/bf16, computed in fp32: each layer's weights are upcast into one
reused scratch buffer just before its forward pass.

Used when the pipeline computes in fp32 (the CPU) and a merge's weights are fp16: the values are
exactly the merge's, so every output is bit-identical to an fp32 module holding them, while the
parameters take half the memory and a merge writes half the bytes. diffusers' own layerwise
casting (``apply_layerwise_casting``) does the same by re-allocating every layer twice per call,
which on the CPU made one SD1.5 U-Net step 1.47x slower (page faults on fresh memory); with the
scratch buffer a step takes 0.91-1.15x the time of fp32 weights (``bench/swap_bench.py``).

The first parameter of a module is left in the compute dtype by the caller (``keep``): diffusers
and transformers report a model's ``dtype`` as its first floating-point parameter's and cast
inputs (prompt embeddings, latents for the VAE) to it.
"""
from __future__ import annotations

import re
import types

import torch
from torch import nn

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class _Scratch:
    """One flat compute-dtype buffer per module tree, grown to the largest layer, reused by
    every layer's forward (leaf layers never run nested)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buf: torch.Tensor | None = None

    def fit(self, n: int, device: torch.device) -> torch.Tensor:
        """The buffer, made anew when it holds fewer than ``n`` values or is on another device."""
        if self.buf is None or self.buf.numel() < n or self.buf.device != device:
            self.buf = torch.empty(n, dtype=self.dtype, device=device)
        return self.buf


def _forward(self: nn.Module, *args, **kwargs):
    """The layer's own forward with its parameters swapped for compute-dtype copies, put back
    afterwards (also when the forward raises). A forward of its own, not a pre- and a post-hook:
    a module with hooks takes torch's slow call path (a 32x32 Linear: 59-81 µs a call with the
    two hooks, 32-49 µs this way, 12 µs for an fp32 layer)."""
    params = self._parameters
    stored = {n: p for n, p in params.items() if p is not None}
    buf = self._lowp_scratch.fit(sum(p.numel() for p in stored.values()), next(iter(stored.values())).device)
    views = _views(self, stored, buf)
    for name, p in stored.items():
        views[name].copy_(p)
    params.update(views)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        params.update(stored)


def _views(module: nn.Module, stored: dict[str, torch.Tensor], buf: torch.Tensor) -> dict[str, nn.Parameter]:
    """The layer's compute-dtype parameters: views of the front of the scratch buffer ``buf``,
    made once and kept while the buffer is the same and the stored parameters have
    the same names and shapes (their values are copied in on every call). Making them on
    every call (a new ``nn.Parameter`` per weight) took a tiny SD1 generation from 0.18-0.21
    to 0.21-0.24 s. A layer's views keep the buffer they were cut from alive until the layer
    runs again: while a module tree's buffer grows (its first forward pass), not after."""
    kept = module.__dict__.get("_lowp_views")
    if (kept is not None and kept[0] is buf and kept[1].keys() == stored.keys()
            and all(kept[1][n].shape == p.shape for n, p in stored.items())):
        return kept[1]
    views, at = {}, 0
    for name, p in stored.items():
        views[name] = nn.Parameter(buf[at: at + p.numel()].view(p.shape), requires_grad=False)
        at += p.numel()
    module._lowp_views = (buf, views)
    return views


def store_low_precision(module: nn.Module, storage: torch.dtype, compute: torch.dtype,
                        keep: tuple[str, ...] = ()) -> None:
    """Store the Linear/Conv/Embedding layers of ``module`` (but those whose qualified name
    matches a ``keep`` regex) in ``storage``, computing in ``compute``. Works on meta modules
    (before ``to_empty``)."""
    scratch = _Scratch(compute)
    for name, layer in module.named_modules():
        if isinstance(layer, LAYERS) and not any(re.search(k, name) for k in keep):
            layer.to(dtype=storage)
            layer._lowp_scratch = scratch
            layer.forward = types.MethodType(_forward, layer)
