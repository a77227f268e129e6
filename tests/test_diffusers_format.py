"""Diffusers-format models (issue 17): folders written by diffusers itself read back into the
exact LDM tensors, listed and hashed as one model, merged with LDM files, and merges written as
diffusers folders that diffusers loads."""
from __future__ import annotations

import pytest
import safetensors.torch as st
import torch

from merger.engine import merge
from merger.errors import MergeError
from merger.files.checkpoint_io import Checkpoint, load_checkpoint, short_hash
from merger.files.model_dirs import ModelDirs
from merger.pipeline.generate import GenParams
from merger.pipeline.resident import ResidentPipeline
from merger.recipe import Recipe
from merger.synthetic import random_checkpoint
from merger.workstation import Workstation
from tests.forked_cli import run_module

ARCHS = ("sd1", "sd2", "sdxl")
GEN = GenParams(prompt="a cat", steps=1, width=64, height=64, seed=1)


def diffusers_cls(arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    kw = {} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    return (StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline), kw


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """For each arch: LDM files A and B, and A as a diffusers folder written by diffusers'
    own converter (from_single_file + save_pretrained)."""
    root = tmp_path_factory.mktemp("diffusers")
    d = ModelDirs.from_models_dir(root / "models")
    d.create()
    for arch in ARCHS:
        a = random_checkpoint(arch, seed=11, dtype=torch.float32)
        st.save_file(a, str(d.ckpt / f"{arch}-A.safetensors"))
        st.save_file(random_checkpoint(arch, seed=12, dtype=torch.float32), str(d.ckpt / f"{arch}-B.safetensors"))
        rp = ResidentPipeline("cpu", torch.float32)
        rp.load_checkpoint(Checkpoint(d.ckpt / f"{arch}-A.safetensors", a))
        cls, kw = diffusers_cls(arch)
        pipe = cls.from_single_file(str(d.ckpt / f"{arch}-A.safetensors"), config=str(rp.folder),
                                    local_files_only=True, torch_dtype=torch.float32, **kw)
        pipe.save_pretrained(d.ckpt / "diffusers" / f"{arch}-A")
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_folder_reads_back_the_exact_ldm_tensors(dirs, arch):
    ldm = load_checkpoint(dirs.ckpt / f"{arch}-A.safetensors").tensors
    ck = load_checkpoint(dirs.ckpt / "diffusers" / f"{arch}-A")
    assert ck.metadata["format"] == "diffusers" and ck.tensors
    for k, v in ck.tensors.items():
        assert torch.equal(v, ldm[k]), k
    lost = {k for k, v in ldm.items() if k not in ck.tensors and v.is_floating_point()}
    unet_vae = {k for k in ldm if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    assert not lost & unet_vae                    # the U-Net and VAE come back whole
    assert all("resblocks.1." in k or "text_projection" in k or "logit_scale" in k or "model_ema" in k
               or k in ("alphas_cumprod", "betas") for k in lost), sorted(lost)[:5]   # what diffusers drops


def test_listed_once_resolved_and_hashed(dirs):
    names = dirs.checkpoints()
    assert "diffusers/sd1-A" in names and not any(n.startswith("diffusers/sd1-A/") for n in names)
    folder = dirs.resolve("ckpt", "diffusers/sd1-A")
    h = short_hash(folder)
    assert len(h) == 10 and h == short_hash(folder)
    with pytest.raises(MergeError, match="not found"):
        dirs.resolve("ckpt", "diffusers/../../outside")
    (dirs.ckpt / "diffusers" / "empty" / "vae").mkdir(parents=True)
    (dirs.ckpt / "diffusers" / "empty" / "model_index.json").write_text("{}")
    with pytest.raises(MergeError, match="needs unet/diffusion_pytorch_model.safetensors"):
        load_checkpoint(dirs.ckpt / "diffusers" / "empty")


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_folder_merges_with_an_ldm_file(dirs, tmp_path, arch):
    ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")
    r = ws.recipe(f"diffusers/{arch}-A", f"{arch}-B.safetensors", alpha=0.3)
    saved = ws.save_recipe(r, f"{arch}-from-folder.safetensors")
    a, b = (load_checkpoint(dirs.ckpt / f"{arch}-{s}.safetensors") for s in "AB")
    want = merge(Recipe("a", "b", alpha=0.3), a, b).tensors
    got = st.load_file(str(saved.path))
    diffusers_lacks = set(want) - set(load_checkpoint(dirs.ckpt / "diffusers" / f"{arch}-A").tensors)
    for k, v in want.items():
        if v.is_floating_point() and k not in diffusers_lacks:
            assert torch.equal(got[k], v), k
    out = ws.merge(r)
    if arch == "sd2":       # diffusers drops OpenCLIP's last block: B's is kept, and said so
        assert any("OpenCLIP's last block" in n for n in out.notes), out.notes
    assert ws.generate(GEN, save=False).result.images


def test_lone_diffusers_unet_file_is_a_unet_only_model(dirs, tmp_path):
    src = dirs.ckpt / "diffusers" / "sd1-A" / "unet" / "diffusion_pytorch_model.safetensors"
    lone = dirs.ckpt / "unet-only.safetensors"
    lone.write_bytes(src.read_bytes())
    ck = load_checkpoint(lone)
    assert ck.tensors and all(k.startswith("model.diffusion_model.") for k in ck.tensors)
    ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")
    out = ws.merge(ws.recipe("unet-only.safetensors", "sd1-B.safetensors", alpha=0.5))
    assert any("has no VAE" in n for n in out.notes) and any("has no text encoder" in n for n in out.notes)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_cli_save_format_diffusers_loads_in_diffusers(dirs, tmp_path, arch):
    out = tmp_path / f"{arch}-merged"
    a, b = dirs.ckpt / f"{arch}-A.safetensors", dirs.ckpt / f"{arch}-B.safetensors"
    r = run_module("merger", "merge", "--model-a", a, "--model-b", b, "--mode", "weight_sum", "--alpha", "0.6",
                   "--save-format", "diffusers", "--output", out, "--no-history", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    want = merge(Recipe("a", "b", alpha=0.6), load_checkpoint(a), load_checkpoint(b)).tensors
    back = load_checkpoint(out).tensors
    assert back and all(torch.equal(v, want[k]) for k, v in back.items())
    cls, kw = diffusers_cls(arch)
    pipe = cls.from_pretrained(str(out), local_files_only=True, torch_dtype=torch.float32, **kw)
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(pipe.unet.down_blocks[0].resnets[0].conv1.weight, want[k])
    again = run_module("merger", "merge", "--model-a", a, "--model-b", b, "--mode", "weight_sum",
                       "--save-format", "diffusers", "--output", out, "--no-history", "--quiet")
    assert again.returncode == 1 and "already exists" in again.stderr and "--overwrite" in again.stderr
