"""Flux LoRAs merged into a Flux checkpoint (issue 16): kohya / sd-scripts and ai-toolkit (PEFT)
formats, checked against diffusers' own ``load_lora_weights`` conversion + ``fuse_lora`` on a tiny
``FluxTransformer2DModel`` holding the same base weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from lora_ops.formats import load_lora
from lora_ops.merge_ckpt import merged_checkpoint, parse_specs
from merger.errors import MergeError
from merger.flux_layout import PREFIX
from merger.pipeline.flux_keymap import to_diffusers
from merger.synthetic import random_checkpoint

H, RANK = 32, 4


def _pair(gen, out: int, inp: int, rank: int = RANK):
    return (torch.randn(rank, inp, generator=gen) * 0.1, torch.randn(out, rank, generator=gen) * 0.1)


def kohya_lora(path: Path) -> Path:
    """sd-scripts' Flux names (BFL modules, underscores), with alphas. (No single-block linear1:
    diffusers' kohya converter assumes width 3072 for it.)"""
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for name, out, inp in (("double_blocks_0_img_attn_qkv", 3 * H, H), ("double_blocks_3_txt_attn_qkv", 3 * H, H),
                           ("double_blocks_1_img_attn_proj", H, H), ("double_blocks_2_img_mlp_0", 4 * H, H),
                           ("double_blocks_5_txt_mod_lin", 6 * H, H), ("single_blocks_7_linear2", H, 5 * H),
                           ("single_blocks_30_modulation_lin", 3 * H, H)):
        down, up = _pair(gen, out, inp)
        sd[f"lora_unet_{name}.lora_down.weight"], sd[f"lora_unet_{name}.lora_up.weight"] = down, up
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    st.save_file(sd, str(path))
    return path


def ai_toolkit_lora(path: Path) -> Path:
    """ai-toolkit / PEFT names on diffusers modules (``lora_A``/``lora_B``, no alphas), including
    the parts of fused BFL tensors: q/k/v of a double block and a single block's q/k/v/proj_mlp."""
    gen = torch.Generator().manual_seed(2)
    sd = {}
    mods = [("transformer_blocks.0.attn.to_q", H, H), ("transformer_blocks.0.attn.to_v", H, H),
            ("transformer_blocks.4.attn.add_k_proj", H, H), ("transformer_blocks.6.ff_context.net.2", H, 4 * H),
            ("single_transformer_blocks.2.attn.to_k", H, H), ("single_transformer_blocks.2.proj_mlp", 4 * H, H),
            ("single_transformer_blocks.11.proj_out", H, 5 * H), ("transformer_blocks.8.norm1.linear", 6 * H, H)]
    for name, out, inp in mods:
        down, up = _pair(gen, out, inp)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
    st.save_file(sd, str(path))
    return path


def diffusers_fused(base: dict, lora_path: Path, scale: float) -> dict:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    model.load_state_dict(to_diffusers(base))
    state, alphas = FluxPipeline.lora_state_dict(str(lora_path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model)
    model.fuse_lora(lora_scale=scale)
    model.unload_lora()
    return model.state_dict()


@pytest.mark.parametrize("make", [kohya_lora, ai_toolkit_lora])
def test_flux_lora_merge_equals_diffusers_fuse(tmp_path, make):
    base = {k: v for k, v in random_checkpoint("flux", seed=3).items() if k.startswith(PREFIX)}
    path = make(tmp_path / "lora.safetensors")
    lora = load_lora(path)
    merged = merged_checkpoint(base, [(lora, parse_specs("lora:0.7", "flux")[0])], "flux")
    changed = [k for k in base if merged[k] is not base[k]]
    assert len(changed) == len(lora.modules) or make is ai_toolkit_lora     # fused parts share a key
    ours = to_diffusers(merged)
    theirs = diffusers_fused(base, path, 0.7)
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < 1e-6, worst
    # and the LoRA did change the weights it targets
    before = to_diffusers(base)
    assert sum(not torch.equal(ours[k], before[k]) for k in ours) >= len(lora.modules)


def test_flux_lora_block_weights_take_61_values(tmp_path):
    base = {k: v for k, v in random_checkpoint("flux", seed=3).items() if k.startswith(PREFIX)}
    lora = load_lora(kohya_lora(tmp_path / "k.safetensors"))
    only_d0 = ",".join("1" if i == 3 else "0" for i in range(61))            # D00 only
    merged = merged_checkpoint(base, [(lora, parse_specs(f"k:1:{only_d0}", "flux")[0])], "flux")
    changed = sorted(k for k in base if not torch.equal(merged[k], base[k]))
    assert changed == [PREFIX + "double_blocks.0.img_attn.qkv.weight"]
    with pytest.raises(MergeError, match="Flux LoRA block weights need 61 values"):
        parse_specs("k:1:" + ",".join(["1"] * 26), "flux")


def test_an_sd_lora_on_flux_is_refused(tmp_path):
    base = {k: v for k, v in random_checkpoint("flux", seed=3).items() if k.startswith(PREFIX)}
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    st.save_file(sd, str(tmp_path / "sd.safetensors"))
    with pytest.raises(MergeError, match="does not fit this FLUX checkpoint"):
        merged_checkpoint(base, [(load_lora(tmp_path / "sd.safetensors"), parse_specs("sd:1", "flux")[0])], "flux")


def test_a_flux_merge_with_a_lora_on_top_is_saved_from_the_app(tmp_path):
    from merger.engine import merge
    from merger.files.checkpoint_io import load_checkpoint
    from merger.files.model_dirs import ModelDirs
    from merger.recipe import Recipe
    from merger.workstation import Workstation
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    dirs.create()
    for name, seed in (("fa.safetensors", 1), ("fb.safetensors", 2)):
        st.save_file({k: v for k, v in random_checkpoint("flux", seed=seed).items()}, str(dirs.ckpt / name))
    ai_toolkit_lora(dirs.lora / "style.safetensors")
    ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")
    out = ws.save_recipe(ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.3, loras="style:0.8"), "m", record=True)
    saved = load_checkpoint(out.path).tensors
    a, b = (load_checkpoint(dirs.ckpt / n) for n in ("fa.safetensors", "fb.safetensors"))
    plain = merge(Recipe("a", "b", alpha=0.3), a, b).tensors
    lora = load_lora(dirs.lora / "style.safetensors")
    want = merged_checkpoint(plain, [(lora, parse_specs("style:0.8", "flux")[0])], "flux")
    key = PREFIX + "single_blocks.2.linear1.weight"               # to_k and proj_mlp rows changed
    assert not torch.equal(want[key], plain[key])
    assert all(torch.equal(saved[k], want[k]) for k in want)
