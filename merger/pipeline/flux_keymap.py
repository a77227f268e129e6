"""Flux.1: BFL checkpoint keys -> diffusers ``FluxTransformer2DModel`` parameters.

BFL fuses what diffusers keeps apart: ``img_attn.qkv`` is ``to_q``/``to_k``/``to_v`` stacked by
rows, a single block's ``linear1`` is q, k, v and ``proj_mlp``, and ``final_layer.adaLN_modulation``
holds (shift, scale) where diffusers' ``norm_out`` wants (scale, shift). A :class:`Part` says which
rows of a BFL tensor go to which diffusers parameter, so a merged tensor can be written into a
loaded model (or a diffusers state dict built) without an intermediate copy, at any width (diffusers'
own single-file converter assumes Flux's real width, 3072).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PREFIX = "model.diffusion_model."

# one-to-one names (BFL module -> diffusers module), suffix .weight/.bias kept
_RENAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {  # within double_blocks.N -> transformer_blocks.N
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {  # within single_blocks.N -> single_transformer_blocks.N
    "modulation.lin": "norm.linear", "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
}
_BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Part:
    """Rows ``[start, stop)`` of a BFL tensor are diffusers parameter ``name`` (all rows: None)."""
    name: str
    start: int | None = None
    stop: int | None = None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.start is None else t[self.start:self.stop]


def _suffix(rest: str) -> tuple[str, str]:
    base, _, leaf = rest.rpartition(".")
    return (base, "." + leaf) if leaf in ("weight", "bias") else (rest, "")


def parts(key: str, shape: tuple[int, ...] | None, hidden: int) -> list[Part]:
    """Where a BFL transformer key (bare or under ``model.diffusion_model.``) goes in diffusers
    (``shape`` may be None: a single block's ``proj_mlp`` then runs to the end of ``linear1``)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    m = _BLOCK.match(key)
    if m is None:
        if key.startswith("final_layer.adaLN_modulation.1."):   # (shift, scale) -> (scale, shift)
            leaf = key.rsplit(".", 1)[1]
            return [Part(f"norm_out.linear.{leaf}", hidden, 2 * hidden), Part(f"norm_out.linear.{leaf}", 0, hidden)]
        base, leaf = _suffix(key)
        if base not in _RENAMES:
            raise KeyError(f"not a Flux transformer key: {key}")
        return [Part(_RENAMES[base] + leaf)]
    kind, n, rest = m.groups()
    if kind == "double":
        pre = f"transformer_blocks.{n}."
        if rest in _DOUBLE:
            return [Part(pre + _DOUBLE[rest])]
        base, leaf = _suffix(rest)
        if base in ("img_attn.qkv", "txt_attn.qkv"):
            names = ("to_q", "to_k", "to_v") if base.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [Part(f"{pre}attn.{x}{leaf}", i * hidden, (i + 1) * hidden) for i, x in enumerate(names)]
        if base in _DOUBLE:
            return [Part(pre + _DOUBLE[base] + leaf)]
    else:
        pre = f"single_transformer_blocks.{n}."
        if rest in _SINGLE:
            return [Part(pre + _SINGLE[rest])]
        base, leaf = _suffix(rest)
        if base == "linear1":
            names = ("attn.to_q", "attn.to_k", "attn.to_v")
            out = [Part(f"{pre}{x}{leaf}", i * hidden, (i + 1) * hidden) for i, x in enumerate(names)]
            return out + [Part(f"{pre}proj_mlp{leaf}", 3 * hidden, shape[0] if shape else None)]
        if base in _SINGLE:
            return [Part(pre + _SINGLE[base] + leaf)]
    raise KeyError(f"not a Flux transformer key: {key}")


def to_diffusers(tensors: dict[str, torch.Tensor], hidden: int | None = None) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict from BFL transformer tensors (views where
    a part is a row range; the adaLN halves are concatenated)."""
    if hidden is None:
        hidden = next(t.shape[0] for k, t in tensors.items() if k.endswith("img_in.weight"))
    out: dict[str, list] = {}
    for key, t in tensors.items():
        for p in parts(key, tuple(t.shape), hidden):
            out.setdefault(p.name, []).append(p.take(t))
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in out.items()}
