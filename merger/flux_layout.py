"""Key layouts of Flux.1 checkpoints as ``{key: shape}`` (no tensor memory).

The transformer follows Black Forest Labs' reference ``flux/model.py`` (``Flux``,
``DoubleStreamBlock``, ``SingleStreamBlock``, ``LastLayer``): the names users' files carry.
Two file layouts exist:

* **BFL transformer-only** (``flux1-dev.safetensors``): bare keys (``double_blocks.0.img_mod.lin.weight``).
* **ComfyUI all-in-one**: the transformer under ``model.diffusion_model.``, CLIP-L under
  ``text_encoders.clip_l.transformer.`` (HF ``CLIPTextModel`` names), T5-XXL under
  ``text_encoders.t5xxl.transformer.`` (HF ``T5EncoderModel`` names) and the VAE under ``vae.``
  (LDM ``AutoencoderKL`` names, 16 latent channels, no quant convs).

Internally every Flux checkpoint is handled with the transformer under ``model.diffusion_model.``
(SuperMerger's ``prefixer`` does the same); a bare file is saved bare again.

Hyper-parameters are data (``merger/archs.json``, "flux": dev's sizes; "schnell" has no
``guidance_in``). The tiny size keeps every block (19 double, 38 single) at width 32.
"""
from __future__ import annotations

from .ldm_layout import Layout, arch_params, clip_hf_layout, vae_layout

PREFIX = "model.diffusion_model."
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
# top-level transformer modules of a bare BFL file (SuperMerger PREFIXFIX, completed)
TRANSFORMER_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
                     "guidance_in.", "final_layer.")

TINY = dict(transformer=dict(hidden=32, heads=2, mlp_ratio=4, context_in_dim=32, vec_in_dim=32, axes_dim=[4, 6, 6]),
            text=dict(width=32, layers=2, heads=4, projection_dim=32, vocab=49408, pipeline_layers=2),
            t5=dict(d_model=32, d_ff=64, layers=2, heads=2, d_kv=16, vocab=32128, buckets=32),
            vae=dict(ch=8, ch_mult=[1, 2, 2, 2]))


def _linear(d: Layout, name: str, out: int, inp: int, bias: bool = True) -> None:
    d[name + ".weight"] = (out, inp)
    if bias:
        d[name + ".bias"] = (out,)


def _mlp_embedder(d: Layout, name: str, inp: int, hidden: int) -> None:
    _linear(d, name + ".in_layer", hidden, inp)
    _linear(d, name + ".out_layer", hidden, hidden)


def transformer_layout(t: dict, prefix: str = PREFIX) -> Layout:
    """BFL ``Flux`` parameters: embedders, ``depth`` double-stream blocks, ``depth_single``
    single-stream blocks and the last layer (qkv biases on, RMSNorm scales per head dim)."""
    h, heads = t["hidden"], t["heads"]
    hd, mlp = h // heads, int(h * t["mlp_ratio"])
    d: Layout = {}
    _linear(d, "img_in", h, t["in_channels"])
    _mlp_embedder(d, "time_in", 256, h)
    _mlp_embedder(d, "vector_in", t["vec_in_dim"], h)
    if t.get("guidance_embed", True):
        _mlp_embedder(d, "guidance_in", 256, h)
    _linear(d, "txt_in", h, t["context_in_dim"])
    for i in range(t["depth"]):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            _linear(d, p + "mod.lin", 6 * h, h)
            _linear(d, p + "attn.qkv", 3 * h, h)
            d[p + "attn.norm.query_norm.scale"] = (hd,)
            d[p + "attn.norm.key_norm.scale"] = (hd,)
            _linear(d, p + "attn.proj", h, h)
            _linear(d, p + "mlp.0", mlp, h)
            _linear(d, p + "mlp.2", h, mlp)
    for i in range(t["depth_single"]):
        p = f"single_blocks.{i}."
        _linear(d, p + "linear1", 3 * h + mlp, h)
        _linear(d, p + "linear2", h, h + mlp)
        d[p + "norm.query_norm.scale"] = (hd,)
        d[p + "norm.key_norm.scale"] = (hd,)
        _linear(d, p + "modulation.lin", 3 * h, h)
    _linear(d, "final_layer.linear", t["in_channels"], h)
    _linear(d, "final_layer.adaLN_modulation.1", 2 * h, h)
    return {prefix + k: v for k, v in d.items()}


def t5_layout(t: dict, prefix: str = T5_PREFIX) -> Layout:
    """HF ``T5EncoderModel`` (T5 v1.1: gated GELU, no biases, relative position bias in block 0)."""
    dm, ff, inner = t["d_model"], t["d_ff"], t["heads"] * t["d_kv"]
    d: Layout = {"shared.weight": (t["vocab"], dm)}
    for i in range(t["layers"]):
        p = f"encoder.block.{i}.layer."
        for n in ("q", "k", "v"):
            d[f"{p}0.SelfAttention.{n}.weight"] = (inner, dm)
        d[f"{p}0.SelfAttention.o.weight"] = (dm, inner)
        if i == 0:
            d[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (t["buckets"], t["heads"])
        d[f"{p}0.layer_norm.weight"] = (dm,)
        d[f"{p}1.DenseReluDense.wi_0.weight"] = (ff, dm)
        d[f"{p}1.DenseReluDense.wi_1.weight"] = (ff, dm)
        d[f"{p}1.DenseReluDense.wo.weight"] = (dm, ff)
        d[f"{p}1.layer_norm.weight"] = (dm,)
    d["encoder.final_layer_norm.weight"] = (dm,)
    return {prefix + k: v for k, v in d.items()}


def flux_vae_layout(v: dict, prefix: str = VAE_PREFIX) -> Layout:
    """The Flux autoencoder: LDM names, 16 latent channels, no quant / post-quant convs."""
    return {k: s for k, s in vae_layout(v, prefix).items()
            if not k.startswith((prefix + "quant_conv.", prefix + "post_quant_conv."))}


def flux_params(size: str = "full") -> dict:
    return arch_params("flux", **(TINY if size == "tiny" else {}))


def flux_layout(size: str = "full", all_in_one: bool = True, bare: bool = False, **transformer) -> Layout:
    """A Flux.1-dev checkpoint: the transformer (under ``model.diffusion_model.``, or bare as
    BFL ships it), plus CLIP-L, T5-XXL and the VAE when ``all_in_one``. ``transformer``
    overrides its hyper-parameters (e.g. ``depth=1``)."""
    p = flux_params(size)
    d = transformer_layout({**p["transformer"], **transformer}, "" if bare else PREFIX)
    if all_in_one:
        d.update(clip_hf_layout(p["text"], CLIP_PREFIX))
        d.update(t5_layout(p["t5"]))
        d.update(flux_vae_layout(p["vae"]))
    return d


def is_bare_flux(keys) -> bool:
    """A BFL transformer-only file (its transformer keys carry no prefix)."""
    return any(k.startswith("double_blocks.") for k in keys)


def add_prefix(tensors: dict) -> dict:
    """A bare BFL state dict with its transformer keys under ``model.diffusion_model.``."""
    return {(PREFIX + k if k.startswith(TRANSFORMER_ROOTS) else k): v for k, v in tensors.items()}


def strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key
