"""Key layouts of single-file SD checkpoints (LDM / A1111 names) as ``{key: shape}``.

The layouts are generated from the architecture hyper-parameters in ``merger/archs.json``
(real sizes) or from the small overrides the tests use, so tiny test models and full-size
benchmark models share the exact key names of real files. The rules follow the original
``ldm.modules.diffusionmodules.openaimodel.UNetModel``, the HF ``CLIPTextModel`` layout SD1 and
SDXL (embedder 0) store, OpenCLIP's layout SD2 and SDXL (embedder 1) store, and the LDM
``AutoencoderKL``. Nothing here allocates tensor memory.
"""
from __future__ import annotations

import json
from pathlib import Path

Shape = tuple[int, ...]
Layout = dict[str, Shape]

_ARCHS_FILE = Path(__file__).with_name("archs.json")


def arch_params(arch: str, **overrides) -> dict:
    """Hyper-parameters of ``arch`` ("sd1", "sd2", "sdxl") from archs.json, with overrides."""
    table = json.loads(_ARCHS_FILE.read_text())
    if arch not in table:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(table)}")
    params = {k: v for k, v in table[arch].items() if not k.startswith("_")}
    for section, values in overrides.items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    return params


def _resblock(p: str, cin: int, cout: int, emb: int) -> Layout:
    d = {
        p + "in_layers.0.weight": (cin,), p + "in_layers.0.bias": (cin,),
        p + "in_layers.2.weight": (cout, cin, 3, 3), p + "in_layers.2.bias": (cout,),
        p + "emb_layers.1.weight": (cout, emb), p + "emb_layers.1.bias": (cout,),
        p + "out_layers.0.weight": (cout,), p + "out_layers.0.bias": (cout,),
        p + "out_layers.3.weight": (cout, cout, 3, 3), p + "out_layers.3.bias": (cout,),
    }
    if cin != cout:
        d[p + "skip_connection.weight"] = (cout, cin, 1, 1)
        d[p + "skip_connection.bias"] = (cout,)
    return d


def _transformer(p: str, ch: int, depth: int, ctx: int, linear: bool) -> Layout:
    proj = (ch, ch) if linear else (ch, ch, 1, 1)
    d: Layout = {p + "norm.weight": (ch,), p + "norm.bias": (ch,),
                 p + "proj_in.weight": proj, p + "proj_in.bias": (ch,)}
    for j in range(depth):
        q = f"{p}transformer_blocks.{j}."
        for attn, kv in (("attn1", ch), ("attn2", ctx)):
            d[q + attn + ".to_q.weight"] = (ch, ch)
            d[q + attn + ".to_k.weight"] = (ch, kv)
            d[q + attn + ".to_v.weight"] = (ch, kv)
            d[q + attn + ".to_out.0.weight"] = (ch, ch)
            d[q + attn + ".to_out.0.bias"] = (ch,)
        d[q + "ff.net.0.proj.weight"] = (ch * 8, ch)
        d[q + "ff.net.0.proj.bias"] = (ch * 8,)
        d[q + "ff.net.2.weight"] = (ch, ch * 4)
        d[q + "ff.net.2.bias"] = (ch,)
        for n in ("norm1", "norm2", "norm3"):
            d[q + n + ".weight"] = (ch,)
            d[q + n + ".bias"] = (ch,)
    d[p + "proj_out.weight"] = proj
    d[p + "proj_out.bias"] = (ch,)
    return d


def unet_layout(u: dict, prefix: str = "model.diffusion_model.") -> Layout:
    """openaimodel.UNetModel state dict keys, as stored under ``model.diffusion_model.``."""
    C, mult, nrb = u["model_channels"], u["channel_mult"], u["num_res_blocks"]
    depth, ctx, linear = u["transformer_depth"], u["context_dim"], u["linear_proj"]
    emb = 4 * C
    d: Layout = {"time_embed.0.weight": (emb, C), "time_embed.0.bias": (emb,),
                 "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}
    if u.get("adm_in_channels"):
        d.update({"label_emb.0.0.weight": (emb, u["adm_in_channels"]), "label_emb.0.0.bias": (emb,),
                  "label_emb.0.2.weight": (emb, emb), "label_emb.0.2.bias": (emb,)})
    d["input_blocks.0.0.weight"] = (C, u["in_channels"], 3, 3)
    d["input_blocks.0.0.bias"] = (C,)
    skips, ch, idx = [C], C, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            d.update(_resblock(f"input_blocks.{idx}.0.", ch, m * C, emb))
            ch = m * C
            if depth[level]:
                d.update(_transformer(f"input_blocks.{idx}.1.", ch, depth[level], ctx, linear))
            skips.append(ch)
            idx += 1
        if level != len(mult) - 1:
            d[f"input_blocks.{idx}.0.op.weight"] = (ch, ch, 3, 3)
            d[f"input_blocks.{idx}.0.op.bias"] = (ch,)
            skips.append(ch)
            idx += 1
    d.update(_resblock("middle_block.0.", ch, ch, emb))
    d.update(_transformer("middle_block.1.", ch, u["mid_depth"], ctx, linear))
    d.update(_resblock("middle_block.2.", ch, ch, emb))
    idx = 0
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            out = mult[level] * C
            d.update(_resblock(f"output_blocks.{idx}.0.", ch + skips.pop(), out, emb))
            ch, n = out, 1
            if depth[level]:
                d.update(_transformer(f"output_blocks.{idx}.1.", ch, depth[level], ctx, linear))
                n = 2
            if level and i == nrb:
                d[f"output_blocks.{idx}.{n}.conv.weight"] = (ch, ch, 3, 3)
                d[f"output_blocks.{idx}.{n}.conv.bias"] = (ch,)
            idx += 1
    d.update({"out.0.weight": (C,), "out.0.bias": (C,),
              "out.2.weight": (u["out_channels"], C, 3, 3), "out.2.bias": (u["out_channels"],)})
    return {prefix + k: v for k, v in d.items()}


def clip_hf_layout(t: dict, prefix: str) -> Layout:
    """HF CLIPTextModel layout (SD1 ``cond_stage_model.transformer.``, SDXL embedder 0)."""
    W, V = t["width"], t["vocab"]
    p = prefix + "text_model."
    d: Layout = {p + "embeddings.token_embedding.weight": (V, W),
                 p + "embeddings.position_embedding.weight": (77, W)}
    for i in range(t["layers"]):
        q = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            d[q + f"self_attn.{proj}.weight"] = (W, W)
            d[q + f"self_attn.{proj}.bias"] = (W,)
        d[q + "layer_norm1.weight"] = (W,)
        d[q + "layer_norm1.bias"] = (W,)
        d[q + "mlp.fc1.weight"] = (4 * W, W)
        d[q + "mlp.fc1.bias"] = (4 * W,)
        d[q + "mlp.fc2.weight"] = (W, 4 * W)
        d[q + "mlp.fc2.bias"] = (W,)
        d[q + "layer_norm2.weight"] = (W,)
        d[q + "layer_norm2.bias"] = (W,)
    d[p + "final_layer_norm.weight"] = (W,)
    d[p + "final_layer_norm.bias"] = (W,)
    return d


def openclip_layout(t: dict, prefix: str) -> Layout:
    """OpenCLIP text tower layout (SD2 ``cond_stage_model.model.``, SDXL embedder 1)."""
    W, V = t["width"], t["vocab"]
    d: Layout = {prefix + "positional_embedding": (77, W), prefix + "text_projection": (W, W),
                 prefix + "logit_scale": (), prefix + "token_embedding.weight": (V, W),
                 prefix + "ln_final.weight": (W,), prefix + "ln_final.bias": (W,)}
    for i in range(t["layers"]):
        q = f"{prefix}transformer.resblocks.{i}."
        d[q + "ln_1.weight"] = (W,)
        d[q + "ln_1.bias"] = (W,)
        d[q + "attn.in_proj_weight"] = (3 * W, W)
        d[q + "attn.in_proj_bias"] = (3 * W,)
        d[q + "attn.out_proj.weight"] = (W, W)
        d[q + "attn.out_proj.bias"] = (W,)
        d[q + "ln_2.weight"] = (W,)
        d[q + "ln_2.bias"] = (W,)
        d[q + "mlp.c_fc.weight"] = (4 * W, W)
        d[q + "mlp.c_fc.bias"] = (4 * W,)
        d[q + "mlp.c_proj.weight"] = (W, 4 * W)
        d[q + "mlp.c_proj.bias"] = (W,)
    return d


def _vae_res(p: str, cin: int, cout: int) -> Layout:
    d = {p + "norm1.weight": (cin,), p + "norm1.bias": (cin,),
         p + "conv1.weight": (cout, cin, 3, 3), p + "conv1.bias": (cout,),
         p + "norm2.weight": (cout,), p + "norm2.bias": (cout,),
         p + "conv2.weight": (cout, cout, 3, 3), p + "conv2.bias": (cout,)}
    if cin != cout:
        d[p + "nin_shortcut.weight"] = (cout, cin, 1, 1)
        d[p + "nin_shortcut.bias"] = (cout,)
    return d


def _vae_mid(p: str, c: int) -> Layout:
    d = _vae_res(p + "block_1.", c, c)
    d[p + "attn_1.norm.weight"] = (c,)
    d[p + "attn_1.norm.bias"] = (c,)
    for n in ("q", "k", "v", "proj_out"):
        d[f"{p}attn_1.{n}.weight"] = (c, c, 1, 1)
        d[f"{p}attn_1.{n}.bias"] = (c,)
    d.update(_vae_res(p + "block_2.", c, c))
    return d


def vae_layout(v: dict, prefix: str = "first_stage_model.") -> Layout:
    """LDM AutoencoderKL keys (``prefix`` "" gives a stand-alone VAE file's layout)."""
    ch, mult, nrb, z = v["ch"], v["ch_mult"], v["num_res_blocks"], v["z_channels"]
    d: Layout = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    c = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            d.update(_vae_res(f"encoder.down.{i}.block.{j}.", c, ch * m))
            c = ch * m
        if i != len(mult) - 1:
            d[f"encoder.down.{i}.downsample.conv.weight"] = (c, c, 3, 3)
            d[f"encoder.down.{i}.downsample.conv.bias"] = (c,)
    d.update(_vae_mid("encoder.mid.", c))
    d.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,),
              "encoder.conv_out.weight": (2 * z, c, 3, 3), "encoder.conv_out.bias": (2 * z,),
              "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
              "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,),
              "decoder.conv_in.weight": (c, z, 3, 3), "decoder.conv_in.bias": (c,)})
    d.update(_vae_mid("decoder.mid.", c))
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            d.update(_vae_res(f"decoder.up.{i}.block.{j}.", c, ch * mult[i]))
            c = ch * mult[i]
        if i:
            d[f"decoder.up.{i}.upsample.conv.weight"] = (c, c, 3, 3)
            d[f"decoder.up.{i}.upsample.conv.bias"] = (c,)
    d.update({"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,),
              "decoder.conv_out.weight": (3, c, 3, 3), "decoder.conv_out.bias": (3,)})
    return {prefix + k: v for k, v in d.items()}


def text_layout(arch: str, params: dict) -> Layout:
    if arch == "sd1":
        return clip_hf_layout(params["text"], "cond_stage_model.transformer.")
    if arch == "sd2":
        return openclip_layout(params["text"], "cond_stage_model.model.")
    d = clip_hf_layout(params["text"], "conditioner.embedders.0.transformer.")
    d.update(openclip_layout(params["text2"], "conditioner.embedders.1.model."))
    return d


def checkpoint_layout(arch: str, **overrides) -> Layout:
    """Every float tensor key of a pruned single-file checkpoint of ``arch`` with its shape."""
    params = arch_params(arch, **overrides)
    d = unet_layout(params["unet"])
    d.update(text_layout(arch, params))
    d.update(vae_layout(params["vae"]))
    return d


# Small but structurally complete sizes (all blocks, all key names) for tests and demos. The
# cross-attention width equals the text width (SDXL: both encoders, 32 + 48; they must differ,
# diffusers tells them apart by width), and SDXL's label_emb input is the pooled width 48 + 6
# time ids x 8 (diffusers addition_time_embed_dim=8).
_TINY_TEXT = dict(width=32, layers=2, heads=4, projection_dim=32)
TINY = {
    "sd1": dict(unet=dict(model_channels=8, context_dim=32, heads=2),
                text=dict(_TINY_TEXT, pipeline_layers=2), vae=dict(ch=8, ch_mult=[1, 2, 2, 2]), image_size=64),
    "sd2": dict(unet=dict(model_channels=8, context_dim=32, heads=2, head_channels=None),
                text=dict(_TINY_TEXT, pipeline_layers=1), vae=dict(ch=8, ch_mult=[1, 2, 2, 2]), image_size=64),
    "sdxl": dict(unet=dict(model_channels=8, transformer_depth=[0, 2, 3], mid_depth=3, heads=2,
                           head_channels=None, context_dim=80, adm_in_channels=96, addition_time_embed_dim=8),
                 text=dict(_TINY_TEXT, pipeline_layers=2),
                 text2=dict(_TINY_TEXT, width=48, projection_dim=48, pipeline_layers=2),
                 vae=dict(ch=8, ch_mult=[1, 2, 2, 2]), image_size=64),
}


def tiny_layout(arch: str) -> Layout:
    return checkpoint_layout(arch, **TINY[arch])


def sized_params(arch: str, size: str = "full") -> dict:
    """Hyper-parameters of ``arch`` at real ("full") or test/demo ("tiny") size."""
    if arch == "flux":
        from .flux_layout import flux_params
        return flux_params(size)
    return arch_params(arch, **(TINY[arch] if size == "tiny" else {}))


def sized_layout(arch: str, size: str = "full") -> Layout:
    if arch == "flux":             # Flux.1 all-in-one (merger/flux_layout.py)
        from .flux_layout import flux_layout
        return flux_layout(size)
    return tiny_layout(arch) if size == "tiny" else checkpoint_layout(arch)
