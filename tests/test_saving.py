"""Saving: streamed safetensors equal to the in-memory merge, ckpt, fp16, prune, metadata, CLIP
ids, VAE bake-in, atomic writes, no silent overwrite, stop and full disk leave nothing behind."""
import errno
import json

import pytest
import safetensors
import safetensors.torch as st
import torch

from merger.files import saving
from merger.files.checkpoint_io import load_checkpoint
from merger.engine import merge, plan_merge
from merger.errors import MergeError, MergeStopped
from merger.recipe import Recipe
from merger.files.saving import SaveOptions, auto_filename, model_label, save_merge, save_tensors
from merger.synthetic import random_checkpoint, random_vae
from tests.conftest import write

CLIP_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def loaded(models):
    return {s: load_checkpoint(p) for s, p in models.items()}


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_streamed_file_equals_in_memory_merge(models, tmp_path):
    m = loaded(models)
    r = Recipe("model_a.safetensors", "model_b.safetensors", "model_c.safetensors", mode="add_difference", alpha=0.7)
    want = merge(r, m["a"], m["b"], m["c"]).tensors
    out = save_merge(plan_merge(r, m["a"], m["b"], m["c"]), tmp_path / "out.safetensors", SaveOptions(), paths=models)
    got = st.load_file(str(out))
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert Recipe.from_line(meta["sdmw_recipe"]) == r
    assert json.loads(meta["sd_merge_recipe"])["mode"] == "Add"
    assert {v["name"] for v in json.loads(meta["sd_merge_models"]).values()} == {p.name for p in models.values()}


def test_save_reports_progress(tmp_path):
    sd = random_checkpoint("sd1", seed=1)
    seen = []
    save_tensors(tmp_path / "p.safetensors", sd, SaveOptions(), progress=lambda d, t, k: seen.append((d, t)))
    assert seen[0] == (1, len(sd)) and seen[-1] == (len(sd), len(sd))


def test_fp16_prune_and_reset_clip_ids(tmp_path):
    sd = random_checkpoint("sd1", seed=1)
    sd[CLIP_IDS] = torch.tensor([[0, 1, 2] + [5] * 74])
    opts = SaveOptions(fp16=True, prune=True, reset_clip_ids=True, save_metadata=False)
    out = st.load_file(str(save_tensors(tmp_path / "p.safetensors", sd, opts)))
    assert "model_ema.decay" not in out and "alphas_cumprod" not in out and "model_ema.num_updates" not in out
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")) for k in out)
    assert out["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert torch.equal(out[CLIP_IDS], torch.arange(77)[None])
    with safetensors.safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_bake_vae(models, tmp_path):
    vae = random_vae(seed=9)
    vae_path = write(tmp_path, "my.vae.safetensors", vae)
    m = loaded(models)
    p = save_merge(plan_merge(Recipe("a", "b", alpha=0.5), m["a"], m["b"]), tmp_path / "v.safetensors",
                   SaveOptions(vae=str(vae_path)))
    out = st.load_file(str(p))
    k = "decoder.conv_out.weight"
    assert torch.equal(out["first_stage_model." + k], vae[k].half())
    bad = write(tmp_path, "bad.safetensors", {"encoder.conv_in.weight": torch.ones(2, 3, 3, 3)})
    with pytest.raises(MergeError, match="VAE does not fit"):
        save_merge(plan_merge(Recipe("a", "b"), m["a"], m["b"]), tmp_path / "w.safetensors", SaveOptions(vae=str(bad)))
    assert not (tmp_path / "w.safetensors").exists()


def test_ckpt_output_loads_with_weights_only(models, tmp_path):
    m = loaded(models)
    r = Recipe("a", "b", alpha=0.25)
    p = save_merge(plan_merge(r, m["a"], m["b"]), tmp_path / "o.ckpt", SaveOptions(fmt="ckpt"))
    sd = torch.load(p, weights_only=True)["state_dict"]
    want = merge(r, m["a"], m["b"]).tensors
    assert all(torch.equal(sd[k], want[k]) for k in want)


def test_never_overwrites_unless_asked(models, tmp_path):
    m = loaded(models)
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"precious")
    plan = plan_merge(Recipe("a", "b"), m["a"], m["b"])
    with pytest.raises(MergeError, match="already exists"):
        save_merge(plan, target, SaveOptions())
    assert target.read_bytes() == b"precious"
    save_merge(plan, target, SaveOptions(overwrite=True))
    assert len(st.load_file(str(target))) == len(plan.jobs)
    assert leftovers(tmp_path) == []


def test_stop_mid_merge_leaves_no_file(models, tmp_path):
    m = loaded(models)
    n = []
    with pytest.raises(MergeStopped, match="no file was written"):
        save_merge(plan_merge(Recipe("a", "b"), m["a"], m["b"]), tmp_path / "s.safetensors", SaveOptions(),
                   should_stop=lambda: len(n) > 100 or n.append(1))
    assert not (tmp_path / "s.safetensors").exists() and leftovers(tmp_path) == []


def test_full_disk_gives_clear_error_and_no_file(models, tmp_path, monkeypatch):
    m = loaded(models)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(saving, "_tensor_bytes", full)
    with pytest.raises(MergeError, match="not enough disk space"):
        save_merge(plan_merge(Recipe("a", "b"), m["a"], m["b"]), tmp_path / "f.safetensors", SaveOptions())
    assert not (tmp_path / "f.safetensors").exists() and leftovers(tmp_path) == []


def test_auto_names():
    r = Recipe("a.safetensors", "b.safetensors", alpha=0.3)
    assert model_label(r) == "a x 0.7 + b x 0.3"
    assert auto_filename(r, SaveOptions(fp16=True)) == "ax0.7+bx0.3.fp16.safetensors"
    r = Recipe("a.ckpt", "b.ckpt", "c.ckpt", mode="add_difference", calcmode="trainDifference", alpha=1)
    assert auto_filename(r, SaveOptions(fmt="ckpt"), 9) == "a+_b-c_x1_trainDifference-inpainting.ckpt"


def test_saved_merge_loads_in_diffusers_single_file_loader(models, tmp_path):
    """The file we write is read by diffusers' own from_single_file (offline, local configs)
    and every weight it puts in the pipeline is the merged one."""
    from diffusers import StableDiffusionPipeline

    from tests.tiny_diffusers import tiny_sd1_config
    m = loaded(models)
    r = Recipe("model_a.safetensors", "model_b.safetensors", "model_c.safetensors", mode="sum_twice",
               alpha=0.4, beta=0.3, mbw_alpha=[0.1 * (i % 10) for i in range(26)])
    want = merge(r, m["a"], m["b"], m["c"]).tensors
    path = save_merge(plan_merge(r, m["a"], m["b"], m["c"]), tmp_path / "merged.safetensors",
                      SaveOptions(prune=True))
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny_sd1_config(tmp_path / "cfg")), local_files_only=True,
        safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float16)
    p = "model.diffusion_model."
    checks = {
        pipe.unet.down_blocks[0].attentions[0].proj_in.weight: want[p + "input_blocks.1.1.proj_in.weight"],
        pipe.unet.up_blocks[3].resnets[2].conv2.weight: want[p + "output_blocks.11.0.out_layers.3.weight"],
        pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight:
            want[p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"],
        pipe.unet.conv_out.bias: want[p + "out.2.bias"],
        pipe.vae.decoder.conv_out.weight: want["first_stage_model.decoder.conv_out.weight"],
        dict(pipe.text_encoder.named_parameters())["encoder.layers.1.mlp.fc2.weight"]:
            want["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"],
    }
    for got, exp in checks.items():
        assert torch.equal(got.detach().reshape(exp.shape), exp)
    n_unet = sum(v.numel() for k, v in want.items() if k.startswith(p))
    assert sum(t.numel() for t in pipe.unet.parameters()) == n_unet


@pytest.mark.parametrize("ram,once", [(1 << 40, False), (1 << 20, True), (None, True)])
def test_a_save_checks_inputs_first_unless_they_exceed_half_the_ram(monkeypatch, tmp_path, ram, once):
    """Inputs that fit in half the RAM are checked before anything is written and a method
    prepares every key first (TIES's thresholds); larger ones (full Flux models), or where the
    OS does not say, stream: each key's inputs checked as they are read, read once."""
    import dataclasses
    from merger.engine.methods import REGISTRY
    from tests.conftest import tiny
    base, m1, m2 = (tiny(seed=s, dtype=torch.float16) for s in (1, 2, 3))
    plan = plan_merge(Recipe("a", method="ties", models=["1", "2"], alpha=0.8), base, models=[m1, m2])
    monkeypatch.setattr(saving, "physical_ram", lambda: ram)
    assert saving.reads_inputs_once(plan) is once
    prepared = []
    real = REGISTRY["ties"].prefetch
    monkeypatch.setitem(REGISTRY, "ties", dataclasses.replace(
        REGISTRY["ties"], prefetch=lambda *a, **k: prepared.append(1) or real(*a, **k)))
    out = save_merge(plan, tmp_path / "out.safetensors", SaveOptions())
    assert bool(prepared) is not once
    want = merge(plan.recipe, base, models=[m1, m2]).tensors
    got = st.load_file(str(out))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_machines_ram_is_known_here():
    assert saving.physical_ram() > 1 << 30
