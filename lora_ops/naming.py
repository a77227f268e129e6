"""kohya LoRA module names (``lora_unet_…``, ``lora_te_…``) for LDM checkpoint keys.

kohya names a LoRA module after the Diffusers / transformers module it patches, with dots
replaced by underscores: ``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (SDXL: ``lora_te1_`` / ``lora_te2_``).
"""
from __future__ import annotations

from merger.keymap import targets_for

# modules kohya's LoRA (LierLa) patches: attention / feed-forward Linear layers and 1x1 convs
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def kohya_names(ldm_key: str, arch: str) -> list[str]:
    """kohya module names fed by an LDM ``*.weight`` key (several for OpenCLIP's fused q/k/v)."""
    if not ldm_key.endswith(".weight"):
        return []
    names = []
    widths = {"text_encoder": 1, "text_encoder_2": 1}
    prefixes = {"text_encoder": "text_model.", "text_encoder_2": "text_model."}
    for t in targets_for(ldm_key, arch, widths, prefixes):
        if t.component not in _PREFIX:
            continue
        module = t.param[: -len(".weight")]
        prefix = "lora_te1_" if arch == "sdxl" and t.component == "text_encoder" else _PREFIX[t.component]
        wanted = UNET_TARGETS if t.component == "unet" else TEXT_TARGETS
        if any(module.endswith("." + w) for w in wanted):
            names.append(prefix + module.replace(".", "_"))
    return names
