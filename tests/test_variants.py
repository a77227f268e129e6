"""Every checkpoint users actually have (issue 17): each variant of tests/variant_corpus.py merges
as model A or B, saves, and loads in diffusers' own single-file loader with the weights of the
merge of the canonical files; merge+swap and generation work; what generation cannot do without
is refused by name."""
from __future__ import annotations

import pytest
import safetensors.torch as st
import torch

from merger.demo import DEMO_VAE
from merger.engine import merge
from merger.errors import MergeError
from merger.files.checkpoint_io import Checkpoint
from merger.files.model_dirs import ModelDirs
from merger.pipeline.generate import GenParams
from merger.recipe import Recipe
from merger.synthetic import random_checkpoint
from merger.workstation import Workstation
from tests.conftest import demo_models
from tests.variant_corpus import sd1_variants, sdxl_variants

CANON = {"sd1": (random_checkpoint("sd1", seed=1, dtype=torch.float16), random_checkpoint("sd1", seed=2, dtype=torch.float16)),
         "sdxl": (random_checkpoint("sdxl", seed=1, dtype=torch.float16), random_checkpoint("sdxl", seed=2, dtype=torch.float16))}
VARIANTS = {v.name: v for v in sd1_variants(CANON["sd1"][0]) + sdxl_variants(CANON["sdxl"][0])}
GEN = GenParams(prompt="a cat", steps=1, width=64, height=64, seed=1)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    dirs = ModelDirs.from_models_dir(root / "models")
    demo_models(dirs)
    for arch, (a, b) in CANON.items():
        st.save_file(a, str(dirs.ckpt / f"{arch}-A.safetensors"))
        st.save_file(b, str(dirs.ckpt / f"{arch}-B.safetensors"))
    for v in VARIANTS.values():
        st.save_file({k: t.contiguous() for k, t in v.tensors.items()}, str(dirs.ckpt / f"{v.name}.safetensors"))
    return Workstation(dirs, device="cpu", dtype=torch.float32, outputs=root / "out")


def canonical_merge(v, role: str, alpha: float = 0.4) -> dict[str, torch.Tensor]:
    """The merge of the canonical files with the variant's dtype and what it lacks. As A or B
    (weight sum with the other canonical model) a key the variant lacks comes from the other
    model unmerged; as C (add difference B + α(A − variant)) it stays model A's (here B)."""
    a, b = CANON[v.arch]
    cast = {k: t.to(v.dtype) if t.is_floating_point() else t for k, t in a.items()}
    if role == "C":
        want = merge(Recipe("b", "a", "c", mode="add_difference", alpha=alpha), Checkpoint(_p("b"), b),
                     Checkpoint(_p("a"), a), Checkpoint(_p("c"), cast)).tensors
        for k in v.lacks:
            want[k] = b[k]
        return want
    A, B = (cast, b) if role == "A" else (a, cast)
    want = merge(Recipe("a", "b", alpha=alpha), Checkpoint(_p("a"), A), Checkpoint(_p("b"), B)).tensors
    other = b if role == "A" else a
    for k in v.lacks:
        want[k] = other[k]
    return want


def _p(name):
    from pathlib import Path
    return Path(name + ".safetensors")


def check_file(path, want):
    got = st.load_file(str(path))
    keys = [k for k, t in want.items() if t.is_floating_point() and not k.startswith("model_ema.")
            and k not in ("alphas_cumprod", "betas")]
    assert keys
    for k in keys:
        assert k in got, k
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    return got


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("role", ["A", "B", "C"])
def test_variant_merges_saves_and_equals_the_canonical_merge(ws, name, role):
    v = VARIANTS[name]
    a, b, var = f"{v.arch}-A.safetensors", f"{v.arch}-B.safetensors", f"{name}.safetensors"
    names = {"A": (var, b), "B": (a, var), "C": (b, a, var)}[role]
    recipe = ws.recipe(*names, alpha=0.4, mode="add_difference" if role == "C" else "weight_sum")
    saved = ws.save_recipe(recipe, f"{name}-as-{role}.safetensors")
    check_file(saved.path, canonical_merge(v, role))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_merge_swaps_generates_and_loads_in_diffusers(ws, name):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    v = VARIANTS[name]
    recipe = ws.recipe(f"{name}.safetensors", f"{v.arch}-B.safetensors", alpha=0.4,
                       loras="demo-sd1-tiny-lora:0.5" if v.arch == "sd1" else "")
    out = ws.merge(recipe)
    if v.lacks:
        assert any("has no" in n for n in out.notes), out.notes      # says which model provided what
    assert ws.generate(GEN, save=False).result.images
    saved = ws.save_current(f"{name}-current.safetensors")
    cls = StableDiffusionXLPipeline if v.arch == "sdxl" else StableDiffusionPipeline
    kw = {} if v.arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    ref = cls.from_single_file(str(saved.path), config=str(ws.pipeline.folder), local_files_only=True,
                               torch_dtype=torch.float32, **kw)
    for comp, mine in ws.pipeline.modules.items():
        theirs = dict(getattr(ref, comp).named_parameters())
        for pname, p in mine.named_parameters():
            assert torch.equal(p.float(), theirs[pname].float()), f"{comp}.{pname}"


def test_unused_parts_missing_from_every_model_still_generate(ws):
    """SDXL never uses CLIP-L's last layer: a merge of two files without it swaps, generates and
    saves a file without it (as the inputs were)."""
    ws.save_recipe(ws.recipe("sdxl-no-clip-l-last-layer.safetensors", "sdxl-no-clip-l-last-layer.safetensors",
                             alpha=0.5), "twice-no-clip-l.safetensors")
    out = ws.merge(ws.recipe("sdxl-no-clip-l-last-layer.safetensors", "twice-no-clip-l.safetensors", alpha=0.5))
    assert ws.generate(GEN, save=False).result.images
    sd = ws.pipeline.state_dict()
    assert not (VARIANTS["sdxl-no-clip-l-last-layer"].lacks & set(sd)), "unused parts must not be invented"
    assert not any("skips" in n for n in out.notes)


def test_clip_g_last_block_missing_everywhere_is_skipped_with_a_note(ws):
    ws.load_model("sdxl-no-clip-g-last-block.safetensors")
    out = ws.merge(ws.recipe("sdxl-no-clip-g-last-block.safetensors", "sdxl-no-clip-g-last-block.safetensors",
                             alpha=0.3))
    assert any("CLIP-G's last block" in n and "skips it" in n for n in out.notes), out.notes
    assert ws.generate(GEN, save=False).result.images


def test_pooled_projection_missing_everywhere_is_refused_by_name(ws):
    with pytest.raises(MergeError, match=r"generation needs .*ln_final.*CLIP-G's final norm and projection"):
        ws.load_model("sdxl-no-pooled-projection.safetensors")
    with pytest.raises(MergeError, match="incomplete"):
        ws.generate(GEN, save=False)
    # the file itself still merges and saves
    saved = ws.save_recipe(ws.recipe("sdxl-no-pooled-projection.safetensors", "sdxl-no-pooled-projection.safetensors",
                                     alpha=0.5), "no-pooled-merged.safetensors")
    assert saved.path.exists()


def test_half_of_an_optional_part_is_refused(ws):
    v = VARIANTS["sdxl-no-clip-l-last-layer"]
    sd = dict(CANON["sdxl"][0])
    for k in sorted(v.lacks)[:3]:
        del sd[k]
    st.save_file(sd, str(ws.dirs.ckpt / "sdxl-part-clip-l.safetensors"))
    with pytest.raises(MergeError, match="has only part of CLIP-L's last layer"):
        ws.merge(ws.recipe("sdxl-part-clip-l.safetensors", "sdxl-B.safetensors"))


def test_vae_less_model_generates_with_the_chosen_vae(ws):
    ws.set_vae(None)
    ws.load_model("sd1-no-vae.safetensors")
    with pytest.raises(MergeError, match="no VAE .* choose a VAE"):
        ws.generate(GEN, save=False)
    ws.set_vae(DEMO_VAE)
    res = ws.generate(GEN, save=False)
    assert f"VAE: {DEMO_VAE}" in res.result.images[0].infotext
    ws.set_vae(None)
    out = ws.merge(ws.recipe("sd1-no-vae.safetensors", "sd1-B.safetensors"))   # B's VAE, said so
    assert any("model B's VAE is used" in n for n in out.notes)
    assert ws.generate(GEN, save=False).result.images


def test_ema_weights_merged_instead_when_asked(ws):
    v = VARIANTS["sd1-with-ema"]
    st.save_file(v.tensors, str(ws.dirs.ckpt / "ema-copy.safetensors"))
    r = ws.recipe("sd1-with-ema.safetensors", "ema-copy.safetensors", alpha=0.25, ema=True)
    saved = ws.save_recipe(r, "ema-merged.safetensors")
    got = st.load_file(str(saved.path))
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    e = v.tensors["model_ema.diffusion_modelinput_blocks10in_layers2weight"]
    assert torch.equal(got[k], e)                          # the same EMA twice: the EMA U-Net itself
    assert not any(x.startswith("model_ema.") for x in got)
    assert torch.equal(got["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
                       v.tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"])
    with pytest.raises(MergeError, match="sd1-B.safetensors has no EMA weights"):
        ws.save_recipe(ws.recipe("sd1-with-ema.safetensors", "sd1-B.safetensors", ema=True), "x.safetensors")
    # by default EMA copies are not merged (A1111 ignores them) and pruning drops them
    plain = ws.save_recipe(ws.recipe("sd1-with-ema.safetensors", "ema-copy.safetensors", alpha=0.25), "plain.safetensors")
    assert torch.equal(st.load_file(str(plain.path))["model_ema.diffusion_modelout2bias"],
                       v.tensors["model_ema.diffusion_modelout2bias"])


def test_variant_in_an_xyz_plot(ws):
    from merger.sweeps.xyz_run import PlotSpec, prepare, run
    spec = PlotSpec(ws.recipe("sd1-A.safetensors", "sd1-B.safetensors"), GEN,
                    {"X": ("model_A", "sd1-old-text-encoder-layout.safetensors, sd1-no-vae.safetensors"),
                     "Y": ("none", ""), "Z": ("none", "")})
    res = run(ws, prepare(ws, spec))
    assert res.cells_done == 2


def test_mixed_precisions_merge_in_model_a_dtype_without_loss(ws):
    """fp32 A, fp16 B, bf16 C: B and C are widened exactly to A's fp32 (as SuperMerger converts
    them to A's dtype); the result is A's dtype and equals the fp32 arithmetic."""
    a = VARIANTS["sd1-fp32"].tensors
    b = CANON["sd1"][1]
    c = {k: v.bfloat16() if v.is_floating_point() else v for k, v in random_checkpoint("sd1", seed=5).items()}
    st.save_file(c, str(ws.dirs.ckpt / "sd1-C-bf16.safetensors"))
    r = ws.recipe("sd1-fp32.safetensors", "sd1-B.safetensors", "sd1-C-bf16.safetensors", mode="add_difference",
                  alpha=0.7)
    got = st.load_file(str(ws.save_recipe(r, "mixed.safetensors").path))
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert got[k].dtype == torch.float32
    assert torch.equal(got[k], a[k] + (b[k].float() - c[k].float()) * 0.7)


def test_cli_ema_option(ws, tmp_path):
    from tests.forked_cli import run_module
    out = tmp_path / "ema.safetensors"
    f = ws.dirs.ckpt / "sd1-with-ema.safetensors"
    r = run_module("merger", "merge", "--model-a", f, "--model-b", f, "--mode", "weight_sum", "--ema", "--output", out,
                   "--no-history", "--quiet")
    assert r.returncode == 0, r.stderr
    got = st.load_file(str(out))
    assert torch.equal(got["model.diffusion_model.out.2.bias"],
                       VARIANTS["sd1-with-ema"].tensors["model_ema.diffusion_modelout2bias"])
