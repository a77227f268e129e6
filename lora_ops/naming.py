"""kohya LoRA module names (``lora_unet_…``, ``lora_te_…``) for LDM checkpoint keys.

kohya names a LoRA module after the module it patches, dots replaced by underscores. SD1/SD2
LoRAs use Diffusers U-Net names (``lora_unet_down_blocks_0_attentions_0_proj_in``), SDXL LoRAs
the original LDM names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); text
encoders use transformers' names (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``;
SDXL ``lora_te1_`` / ``lora_te2_``). OpenCLIP's fused ``in_proj`` (SD2, SDXL encoder 2) is fed
by three modules (q, k, v), each owning a third of the rows.
"""
from __future__ import annotations

from merger.pipeline.keymap import UNET, Target, targets_for

# modules kohya's plain LoRA (LierLa) patches: attention / feed-forward Linear layers, 1x1 convs
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def kohya_targets(ldm_key: str, arch: str, width: int = 1) -> list[tuple[str, Target]]:
    """Every kohya module name that may patch LDM ``*.weight`` key ``ldm_key`` (both U-Net naming
    schemes), with the Target describing which part of the tensor it feeds. ``width``: OpenCLIP
    hidden size (rows per q/k/v) for fused in_proj keys."""
    if not ldm_key.endswith(".weight") and not ldm_key.endswith("in_proj_weight"):
        return []
    out = []
    widths = {"text_encoder": width, "text_encoder_2": width}
    prefixes = {"text_encoder": "text_model.", "text_encoder_2": "text_model."}
    for t in targets_for(ldm_key, arch, widths, prefixes):
        if t.component not in _PREFIX:
            continue
        module = t.param.rsplit(".", 1)[0]
        prefix = "lora_te1_" if arch == "sdxl" and t.component == "text_encoder" else _PREFIX[t.component]
        out.append((prefix + module.replace(".", "_"), t))
        if t.component == "unet":   # the LDM-named variant (kohya SDXL)
            ldm_module = ldm_key[len(UNET):].rsplit(".", 1)[0]
            out.append(("lora_unet_" + ldm_module.replace(".", "_"), t))
    return out


def kohya_names(ldm_key: str, arch: str) -> list[str]:
    """LierLa module names (attention / feed-forward / proj layers) in kohya's SD1/SD2 naming."""
    wanted = {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS, "text_encoder_2": TEXT_TARGETS}
    names = []
    for name, t in kohya_targets(ldm_key, arch):
        module = t.param.rsplit(".", 1)[0]
        ldm_style = t.component == "unet" and name.startswith("lora_unet_") and "_blocks_" in name \
            and ("input_blocks" in name or "output_blocks" in name or "middle_block" in name)
        if not ldm_style and any(module.endswith("." + w) for w in wanted[t.component]):
            names.append(name)
    return names


def flux_targets(key: str, shape: tuple[int, ...], hidden: int) -> list[tuple[str, Target]]:
    """LoRA module names that may patch a Flux.1 checkpoint key (``*.weight``), with the rows of the
    tensor each one feeds: kohya / sd-scripts names (``lora_unet_double_blocks_0_img_attn_qkv``,
    the BFL module, whole tensor; ``lora_te1_`` CLIP-L, ``lora_te2_`` T5), and diffusers / PEFT /
    ai-toolkit names (``transformer.transformer_blocks.0.attn.to_q``, also as
    ``lora_transformer_transformer_blocks_0_attn_to_q``), each owning its rows of a fused BFL
    tensor (``merger.pipeline.flux_keymap``). The last layer's adaLN (whose diffusers rows are the
    BFL halves swapped) is reachable by its kohya name only."""
    from merger.flux_layout import CLIP_PREFIX, PREFIX, T5_PREFIX
    from merger.pipeline.flux_keymap import parts
    if not key.endswith(".weight"):
        return []
    for prefix, lora_prefix, component in ((CLIP_PREFIX, "lora_te1_", "text_encoder"),
                                           (T5_PREFIX, "lora_te2_", "text_encoder_2")):
        if key.startswith(prefix):
            module = key[len(prefix):-len(".weight")]
            return [(lora_prefix + module.replace(".", "_"), Target(component, module + ".weight"))]
    if not key.startswith(PREFIX):
        return []
    bare = key[len(PREFIX):]
    out = [("lora_unet_" + bare[:-len(".weight")].replace(".", "_"), Target("transformer", bare))]
    try:
        found = parts(key, shape, hidden)
    except KeyError:
        return out
    if len({p.name for p in found}) < len(found):        # norm_out: one parameter, two swapped halves
        return out
    for p in found:
        module = p.name.rsplit(".", 1)[0]
        t = Target("transformer", p.name, "copy" if p.start is None else "rows", (p.start or 0, p.stop or 0))
        out += [("transformer." + module, t), ("lora_transformer_" + module.replace(".", "_"), t)]
    return out
