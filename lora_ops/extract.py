"""Extracting a LoRA from two checkpoints (kohya ``extract_lora_from_models.py``, SuperMerger
"Extract From Models": ΔW = α·A − β·B, usually A = fine-tune, B = its base)."""
from __future__ import annotations

import re

import torch

from merger.errors import MergeError, MergeStopped

from .naming import TEXT_TARGETS, UNET_TARGETS, kohya_targets
from .svd import low_rank


_RESNET_PART = re.compile(r"(^|\.)(resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|"
                          r"downsamplers\.0\.conv|upsamplers\.0\.conv)$")
_IN_OUT = ("conv_in", "conv_out")


def lora_modules(tensors, arch: str, conv: bool, conv_in_out: bool = False) -> dict[str, tuple[str, object]]:
    """kohya module name -> (LDM key, Target) for the modules kohya's ``networks/lora.py`` patches:
    every Linear / 1×1 conv inside the U-Net's transformer blocks and the text encoders' attention
    and MLP; with ``conv`` (a conv dim, LoCon) also everything inside ResNet blocks and down/up
    samplers (3×3 convs, ``time_emb_proj``, ``conv_shortcut``). ``conv_in_out`` adds the U-Net's
    first and last convs, which kohya never patches (an option here). SD1/SD2 U-Net names are
    Diffusers-style, SDXL's LDM-style, as kohya writes them."""
    out = {}
    for key, t in tensors.items():
        if not t.is_floating_point() or t.dim() not in (2, 4):
            continue
        pairs = kohya_targets(key, arch, t.shape[1] if key.endswith("in_proj_weight") else 1)
        unet = [p for p in pairs if p[1].component == "unet"]
        if unet:
            name, tg = unet[1] if arch == "sdxl" else unet[0]
            module = tg.param.rsplit(".", 1)[0]
            in_transformer = any(module.endswith("." + w) for w in UNET_TARGETS)
            in_resnet = conv and _RESNET_PART.search(module) is not None
            if in_transformer or in_resnet or (conv and conv_in_out and module in _IN_OUT):
                out[name] = (key, tg)
            continue
        for name, tg in pairs:
            if any(tg.param.rsplit(".", 1)[0].endswith("." + w) for w in TEXT_TARGETS):
                out[name] = (key, tg)
    return out


def extract_lora(a: dict, b: dict, arch: str, dim: int = 128, conv_dim: int | None = None,
                 alpha: float = 1.0, beta: float = 1.0, clamp_quantile: float = 0.99, min_diff: float = 0.01,
                 fast: bool = True, should_stop=None, progress=None,
                 conv_in_out: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """kohya-format LoRA state dict approximating α·A − β·B per module (kohya's module set, see
    :func:`lora_modules`), plus metadata. The text encoder is left out when it is identical
    (max |ΔW| ≤ ``min_diff``), as kohya does."""
    mods = lora_modules(a, arch, conv_dim is not None, conv_in_out)
    if not mods:
        raise MergeError("no LoRA-able modules found")
    te_diff = 0.0
    for name, (key, _) in mods.items():
        if name.startswith("lora_te") and key in b:
            te_diff = max(te_diff, (alpha * a[key].float() - beta * b[key].float()).abs().max().item())
    skip_te = te_diff <= min_diff
    sd: dict[str, torch.Tensor] = {}
    items = [(n, kt) for n, kt in mods.items() if not (skip_te and n.startswith("lora_te"))]
    for i, (name, (key, target)) in enumerate(items):
        if should_stop is not None and should_stop():
            raise MergeStopped()
        if key not in b or a[key].shape != b[key].shape:
            raise MergeError(f"the two models differ in {key}: not the same architecture")
        diff = target.view_of(alpha * a[key].float() - beta * b[key].float())
        is_3x3 = diff.dim() == 4 and diff.shape[2] > 1
        up, down = low_rank(diff, conv_dim if is_3x3 else dim, clamp_quantile, fast)
        sd[f"{name}.lora_up.weight"] = up.contiguous()
        sd[f"{name}.lora_down.weight"] = down.contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        if progress:
            progress(i + 1, len(items), name)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
            "ss_v2": str(arch == "sd2"), "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[arch],
            "sdmw_extract": f"{alpha:g}*A - {beta:g}*B, text encoder {'skipped' if skip_te else 'included'}"}
    if conv_dim is not None:
        meta["ss_network_args"] = f'{{"conv_dim": "{conv_dim}", "conv_alpha": "{float(conv_dim)}"}}'
    return sd, meta


def extract_from_loras(lora_b, lora_c, alpha: float = 0.5, beta: float = 0.0, gamma: float = 1.0, rank: int = 64,
                       fast: bool = True) -> dict[str, torch.Tensor]:
    """SuperMerger's extract for two LoRAs (calcmode_en.md, "Using Two LoRA Networks"): per module
    ΔW = lerp(ΔB, ΔC, α) · lerp(d, 1-d, β) with d = ((cos(ΔB, ΔC) + 1) / 2)^γ along the last axis
    (α: B ↔ C, β: similar ↔ dissimilar features, γ: selectivity), re-factorised to ``rank``. A
    module only one LoRA has meets a zero difference in the other."""
    from merger.engine.calcmodes.extract import extract_features

    from .delta import module_delta
    from .merge_loras import _shape_of
    if not (0 <= alpha <= 1 and 0 <= beta <= 1 and gamma >= 0):
        raise MergeError("extract needs 0 ≤ alpha ≤ 1, 0 ≤ beta ≤ 1 and gamma ≥ 0")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(lora_b.modules) | set(lora_c.modules)):
        mb, mc = lora_b.modules.get(name), lora_c.modules.get(name)
        shape = _shape_of(mb or mc)
        db = module_delta(mb, shape) if mb else torch.zeros(shape)
        dc = module_delta(mc, shape) if mc else torch.zeros(shape)
        if db.shape != dc.shape:
            raise MergeError(f"{name}: the two LoRAs are for different models ({list(db.shape)} vs {list(dc.shape)})")
        d = extract_features(torch.zeros(shape), db, dc, alpha, beta, gamma)
        up, down = low_rank(d, rank, 1.0, fast)
        out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"] = up.contiguous(), down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
