"""LDM checkpoint keys -> Diffusers pipeline parameters, with the reshapes and splits some need.

Built once per architecture from the key names alone (no weights): the U-Net and VAE renames
of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``, the HF CLIP
layout (a prefix strip) and OpenCLIP's layout (fused ``in_proj`` split into q/k/v rows,
``text_projection`` transposed). Tests check it against diffusers' own single-file loader.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."


@dataclass(frozen=True)
class Target:
    component: str          # "unet", "transformer" (Flux), "vae", "text_encoder", "text_encoder_2"
    param: str              # parameter name inside that component
    kind: str = "copy"      # copy | reshape | rows | transpose | halves
    rows: tuple[int, int | None] = (0, 0)

    def view_of(self, value: torch.Tensor) -> torch.Tensor:
        """The part of an LDM tensor this target receives, shaped for no parameter yet
        (``halves``: the two halves swapped, Flux's last adaLN; its own inverse)."""
        if self.kind == "rows":
            return value[self.rows[0]:self.rows[1]]
        if self.kind == "halves":
            h = value.shape[0] // 2
            return torch.cat([value[h:], value[:h]])
        if self.kind == "transpose":
            return value.T
        return value


_RES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def _resnet(rest: str) -> str:
    for old, new in _RES:
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_param(key: str, layers_per_block: int = 2) -> str | None:
    """Diffusers ``UNet2DConditionModel`` name of an LDM U-Net key (without the prefix)."""
    simple = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
              "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
              "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        i, part, rest = int(m[1]), int(m[2]), m[3]
        block, layer = divmod(i - 1, layers_per_block + 1)
        if layer == layers_per_block:
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[len('op.'):]}"
        if part == 0:
            return f"down_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        return f"down_blocks.{block}.attentions.{layer}.{rest}"
    if m := re.match(r"middle_block\.(\d)\.(.*)", key):
        part, rest = int(m[1]), m[2]
        if part == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{part // 2}.{_resnet(rest)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        i, part, rest = int(m[1]), int(m[2]), m[3]
        block, layer = divmod(i, layers_per_block + 1)
        if part == 0:
            return f"up_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        if rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.{rest}"
        return f"up_blocks.{block}.attentions.{layer}.{rest}"
    return None


_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def vae_param(key: str, num_blocks: int = 4) -> tuple[str, str] | None:
    """(Diffusers ``AutoencoderKL`` name, kind) of an LDM VAE key (without the prefix)."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, "copy"
    m = re.match(r"(encoder|decoder)\.(.*)", key)
    if not m:
        return None
    side, rest = m[1], m[2]
    rest = rest.replace("nin_shortcut", "conv_shortcut").replace("norm_out.", "conv_norm_out.")
    if mm := re.match(r"down\.(\d+)\.block\.(\d+)\.(.*)", rest):
        rest = f"down_blocks.{mm[1]}.resnets.{mm[2]}.{mm[3]}"
    elif mm := re.match(r"down\.(\d+)\.downsample\.(.*)", rest):
        rest = f"down_blocks.{mm[1]}.downsamplers.0.{mm[2]}"
    elif mm := re.match(r"up\.(\d+)\.block\.(\d+)\.(.*)", rest):
        rest = f"up_blocks.{num_blocks - 1 - int(mm[1])}.resnets.{mm[2]}.{mm[3]}"
    elif mm := re.match(r"up\.(\d+)\.upsample\.(.*)", rest):
        rest = f"up_blocks.{num_blocks - 1 - int(mm[1])}.upsamplers.0.{mm[2]}"
    elif mm := re.match(r"mid\.block_(\d)\.(.*)", rest):
        rest = f"mid_block.resnets.{int(mm[1]) - 1}.{mm[2]}"
    elif mm := re.match(r"mid\.attn_1\.(.*)", rest):
        for old, new in _VAE_ATTN.items():
            if mm[1].startswith(old):
                return f"{side}.mid_block.attentions.0.{new}{mm[1][len(old):]}", "reshape"
    return f"{side}.{rest}", "copy"


_OPENCLIP = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
             ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def openclip_targets(key: str, component: str, width: int, text_model: str) -> list[Target]:
    """OpenCLIP text tower key (without its prefix) -> CLIPTextModel(WithProjection) targets."""
    p = text_model
    if key == "positional_embedding":
        return [Target(component, p + "embeddings.position_embedding.weight")]
    if key == "token_embedding.weight":
        return [Target(component, p + "embeddings.token_embedding.weight")]
    if key.startswith("ln_final."):
        return [Target(component, p + "final_layer_norm." + key[len("ln_final."):])]
    if key == "text_projection":
        return [Target(component, "text_projection.weight", "transpose")] if component == "text_encoder_2" else []
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
    if not m:
        return []
    layer, rest = f"{p}encoder.layers.{m[1]}.", m[2]
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        suffix = "weight" if rest.endswith("weight") else "bias"
        return [Target(component, f"{layer}self_attn.{n}_proj.{suffix}", "rows", (i * width, (i + 1) * width))
                for i, n in enumerate("qkv")]
    for old, new in _OPENCLIP:
        if rest.startswith(old):
            return [Target(component, layer + new + rest[len(old):])]
    return []


# where each architecture stores its text encoder(s): (LDM prefix, pipeline component, layout)
TEXT_ENCODERS = {
    "sd1": (("cond_stage_model.transformer.text_model.", "text_encoder", "hf"),),
    "sd2": (("cond_stage_model.model.", "text_encoder", "openclip"),),
    "sdxl": (("conditioner.embedders.0.transformer.text_model.", "text_encoder", "hf"),
             ("conditioner.embedders.1.model.", "text_encoder_2", "openclip")),
    "flux": (("text_encoders.clip_l.transformer.text_model.", "text_encoder", "hf"),
             ("text_encoders.t5xxl.transformer.", "text_encoder_2", "hf")),
}
FLUX_VAE = "vae."


def flux_transformer_targets(key: str, hidden: int) -> list[Target]:
    """A Flux transformer key's diffusers parameters (:mod:`.flux_keymap`): whole tensors, row
    ranges of BFL's fused q/k/v(/mlp) tensors, or the last adaLN's swapped halves."""
    from .flux_keymap import parts
    try:
        found = parts(key, None, hidden)
    except KeyError:
        return []
    if len(found) == 2 and found[0].name == found[1].name:
        return [Target("transformer", found[0].name, "halves")]
    return [Target("transformer", p.name) if p.start is None
            else Target("transformer", p.name, "rows", (p.start, p.stop)) for p in found]


def component_of(key: str, arch: str) -> str | None:
    """The pipeline component an LDM key belongs to ("unet", "vae", "text_encoder",
    "text_encoder_2"), or None."""
    if key.startswith(UNET):
        return "transformer" if arch == "flux" else "unet"
    if key.startswith(VAE) or (arch == "flux" and key.startswith(FLUX_VAE)):
        return "vae"
    return next((component for prefix, component, _ in TEXT_ENCODERS[arch] if key.startswith(prefix)), None)


def targets_for(key: str, arch: str, widths: dict[str, int], text_prefixes: dict[str, str]) -> list[Target]:
    """Every pipeline parameter (or part) fed by LDM ``key``; [] for keys the pipeline lacks.

    ``widths``: OpenCLIP width per text component; ``text_prefixes``: the attribute path of the
    text transformer inside each text component ("" or "text_model."); Flux's transformer width
    is ``widths["transformer"]``."""
    if arch == "flux":
        if key.startswith(UNET):
            return flux_transformer_targets(key, widths["transformer"])
        if key.startswith(FLUX_VAE):
            hit = vae_param(key[len(FLUX_VAE):])
            return [Target("vae", hit[0], hit[1])] if hit else []
    if key.startswith(UNET):
        name = unet_param(key[len(UNET):])
        return [Target("unet", name)] if name else []
    if key.startswith(VAE):
        hit = vae_param(key[len(VAE):])
        return [Target("vae", hit[0], hit[1])] if hit else []
    for prefix, component, layout in TEXT_ENCODERS[arch]:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if layout == "openclip":
                return openclip_targets(rest, component, widths[component], text_prefixes[component])
            return [] if rest.endswith("position_ids") else [Target(component, text_prefixes[component] + rest)]
    return []
