"""Resident pipeline: offline build, in-place swap equal to diffusers' own single-file loader,
consistency under stop/errors, generation, PNG info, VAE choice, demo models."""
from pathlib import Path

import numpy as np
import pytest
import torch

from merger.files.checkpoint_io import Checkpoint, load_checkpoint
from merger.demo import DEMO_CHECKPOINTS, DEMO_LORA, DEMO_VAE, ensure_demo_models
from merger.engine import merge, plan_merge
from merger.errors import MergeError, MergeStopped
from merger.pipeline.generate import SAMPLERS, GenParams, encode_prompt, generate
from merger.files.model_dirs import ModelDirs
from merger.pipeline.resident import ResidentPipeline, spec_for, storage_dtypes
from merger.pipeline.pipeline_config import clip_vocab
from merger.pipeline.pnginfo import read_png_info
from merger.recipe import Recipe
from merger.files.saving import SaveOptions, save_tensors
from merger.synthetic import random_checkpoint
from merger.workstation import Workstation
from tests.conftest import demo_models


def ck(arch, seed, dtype=torch.float16):
    return Checkpoint(Path(f"{arch}_{seed}.safetensors"), random_checkpoint(arch, seed=seed, dtype=dtype))


def small(**kw):
    return GenParams(**{"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1, **kw})


def img(res, i=0):
    return np.asarray(res.images[i].image, dtype=np.float32)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_swap_equals_diffusers_single_file_loader(arch, tmp_path):
    """Every pipeline parameter after a swap equals what diffusers' from_single_file loads
    from the same merge saved to disk (fp32, exact)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    A, B = ck(arch, 1), ck(arch, 2)
    r = Recipe("a", "b", alpha=0.3)
    rp = ResidentPipeline("cpu", torch.float32)
    rp.swap(plan_merge(r, A, B))
    path = save_tensors(tmp_path / "m.safetensors", merge(r, A, B).tensors, SaveOptions())
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    kw = {} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    ref = cls.from_single_file(str(path), config=str(rp.folder), local_files_only=True,
                               torch_dtype=torch.float32, **kw)
    n = 0
    for comp, mine in rp.modules.items():
        theirs = dict(getattr(ref, comp).named_parameters())
        for name, p in mine.named_parameters():
            assert torch.equal(p, theirs[name]), f"{comp}.{name}"
            n += 1
    assert n == sum(1 for c in rp.modules for _ in getattr(ref, c).parameters())


def test_swap_is_in_place_and_rebuilds_only_on_arch_change():
    A, B = ck("sd1", 1, torch.float32), ck("sd1", 2, torch.float32)
    rp = ResidentPipeline("cpu", torch.float32)
    stats = rp.swap(plan_merge(Recipe("a", "b", alpha=0.5), A, B))
    ptrs = {n: p.data_ptr() for n, p in rp.modules["unet"].named_parameters()}
    stats = rp.swap(plan_merge(Recipe("a", "b", alpha=0.7), A, B))
    # every U-Net/VAE/text tensor that maps 1:1 was computed inside the parameter's memory
    assert stats.in_place >= 900 and stats.copied == 0
    assert ptrs == {n: p.data_ptr() for n, p in rp.modules["unet"].named_parameters()}
    assert rp.builds == 1
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    want = torch.lerp(A.tensors[k], B.tensors[k], 0.7)
    assert torch.equal(rp.modules["unet"].down_blocks[0].attentions[0].proj_in.weight, want)
    rp.swap(plan_merge(Recipe("a", "b"), ck("sdxl", 1), ck("sdxl", 2)))
    assert rp.builds == 2 and rp.spec.arch == "sdxl"


def test_stop_or_error_marks_incomplete_until_next_merge():
    A, B = ck("sd1", 1), ck("sd1", 2)
    rp = ResidentPipeline("cpu", torch.float32)
    rp.swap(plan_merge(Recipe("a", "b"), A, B))
    assert rp.state == "ok"
    n = []
    with pytest.raises(MergeStopped):
        rp.swap(plan_merge(Recipe("a", "b", alpha=0.9), A, B), should_stop=lambda: len(n) > 50 or n.append(1))
    assert rp.state == "incomplete" and "did not finish" in rp.problem
    with pytest.raises(MergeError, match="incomplete"):
        generate(rp, small())
    rp.swap(plan_merge(Recipe("a", "b", alpha=0.2), A, B))
    assert rp.state == "ok" and len(generate(rp, small()).images) == 1
    before = {n: p.clone() for n, p in rp.modules["unet"].named_parameters()}
    B.tensors["model.diffusion_model.out.2.weight"] = B.tensors["model.diffusion_model.out.2.weight"].clone()
    B.tensors["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = float("inf")
    with pytest.raises(MergeError, match="NaN/Inf"):      # refused before anything is written:
        rp.swap(plan_merge(Recipe("a", "b"), A, B))     # the pipeline keeps its previous weights
    assert rp.state == "ok" and all(torch.equal(p, before[n]) for n, p in rp.modules["unet"].named_parameters())
    with pytest.raises(MergeError, match="NaN/Inf"):      # a merge that overflows mid-way is marked
        rp.swap(plan_merge(Recipe("a", "b", "c", mode="add_difference", alpha=1e6), A, ck("sd1", 3), ck("sd1", 4)))
    assert rp.state == "incomplete"
    rp.swap(plan_merge(Recipe("a", "b"), A, ck("sd1", 3)))
    assert rp.state == "ok"


def _param_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fp16_merge_is_stored_in_fp16_and_computes_as_fp32(arch):
    """Computing in fp32, an fp16 merge stays fp16 in memory (Linear/Conv layers; norms, text
    embeddings and each component's first layer in fp32) and is upcast layer by layer: the U-Net, text encoders and
    images are bit-identical to a pipeline holding the same values in fp32."""
    A, B = ck(arch, 1), ck(arch, 2)
    plan = plan_merge(Recipe("a", "b", alpha=0.3), A, B)
    half, full = ResidentPipeline("cpu", torch.float32), ResidentPipeline("cpu", torch.float32, storage="compute")
    half.swap(plan)
    full.swap(plan)
    unet = half.modules["unet"]
    assert unet.conv_out.weight.dtype == torch.float16 and unet.conv_norm_out.weight.dtype == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        assert half.modules[name].dtype == torch.float32            # what the pipeline casts inputs to
    assert _param_bytes(unet) < 0.55 * _param_bytes(full.modules["unet"])
    for comp, m in half.modules.items():
        other = dict(full.modules[comp].named_parameters())
        assert all(torch.equal(p, other[n]) for n, p in m.named_parameters()), comp
    with torch.no_grad():
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        ctx = torch.randn(1, 3, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        extra = {}
        if arch == "sdxl":
            c = unet.config
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.ones(1, pooled), "time_ids": torch.ones(1, 6)}}
        assert torch.equal(unet(x, t, ctx, **extra).sample, full.modules["unet"](x, t, ctx, **extra).sample)
        ids = torch.tensor([[49406, 320, 1125, 49407]])
        for name in [n for n in half.modules if n.startswith("text")]:
            assert torch.equal(half.modules[name](ids, output_hidden_states=True).hidden_states[-2],
                               full.modules[name](ids, output_hidden_states=True).hidden_states[-2])
    g = small(prompt="a (cat:1.2) --n dog", clip_skip=2)
    assert np.array_equal(img(generate(half, g)), img(generate(full, g)))
    assert unet.conv_out.weight.dtype == torch.float16              # back to fp16 after the forward passes


def test_low_precision_layers_compute_with_the_weights_as_they_are_now():
    """The fp32 views a stored-in-fp16 layer computes with are made once and reused: they must
    follow a merge written into the stored weights in place, a parameter replaced by another,
    and the shared scratch buffer growing while the first forward pass meets larger layers."""
    import copy

    from torch import nn

    from merger.pipeline.weight_storage import store_low_precision
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 64), nn.Linear(64, 4)).half().float()
    low = copy.deepcopy(ref)
    store_low_precision(low, torch.float16, torch.float32)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(low(x), ref(x))               # the buffer grew during this pass
        assert torch.equal(low(x), ref(x))
        kept = {m._lowp_views[1]["weight"].untyped_storage().data_ptr() for m in low}
        assert len(kept) == 1                            # no layer holds on to an outgrown buffer
        for m in (ref, low):
            m[1].weight.mul_(0.5)                        # a re-merge writes into the stored weights
        assert torch.equal(low(x), ref(x))
        new = torch.randn(64, 16).half()
        ref[1].weight, low[1].weight = nn.Parameter(new.float()), nn.Parameter(new)
        assert torch.equal(low(x), ref(x))
        w1, b1, w2 = torch.randn(32, 16).half(), torch.randn(32).half(), torch.randn(4, 32).half()
        for m, dt in ((ref, torch.float32), (low, torch.float16)):    # narrower: new shapes
            m[1].weight, m[1].bias = nn.Parameter(w1.to(dt)), nn.Parameter(b1.to(dt))
            m[2].weight = nn.Parameter(w2.to(dt))
        assert torch.equal(low(x), ref(x))
        w1, b1, w2 = torch.randn(48, 16).half(), torch.randn(48).half(), torch.randn(4, 48).half()
        for m, dt in ((ref, torch.float32), (low, torch.float16)):    # same objects, new shapes
            m[1].weight.data, m[1].bias.data, m[2].weight.data = w1.to(dt), b1.to(dt), w2.to(dt)
        assert torch.equal(low(x), ref(x))
        with pytest.raises(RuntimeError):
            low(torch.randn(3, 5))                       # a forward that fails puts the weights back
    assert all(m.weight.dtype == torch.float16 for m in low)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in low)     # torch's fast call path


def test_storage_dtypes_per_component():
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    sd1 = {"model.diffusion_model.a.weight": f16, "model.diffusion_model.b.bias": f16, "model.diffusion_model.c": torch.int64,
           "first_stage_model.a.weight": bf16, "cond_stage_model.transformer.text_model.a.weight": f16,
           "cond_stage_model.transformer.text_model.b.weight": f32}           # mixed: stays fp32
    assert storage_dtypes(sd1, "sd1", f32) == (("unet", "float16"), ("vae", "bfloat16"))
    assert storage_dtypes(sd1, "sd1", f16) == ()                              # only below an fp32 compute dtype
    xl = {"conditioner.embedders.0.transformer.text_model.a.weight": f16, "conditioner.embedders.1.model.a.weight": f16}
    assert storage_dtypes(xl, "sdxl", f32) == (("text_encoder", "float16"), ("text_encoder_2", "float16"))
    with pytest.raises(ValueError, match="storage"):
        ResidentPipeline("cpu", f32, storage="half")


def test_storage_follows_the_precision_of_each_component():
    """fp32 models are stored in fp32; a model with an fp16 U-Net and an fp32 VAE keeps its VAE in
    fp32; a later fp16 merge rebuilds the pipeline with fp16 storage."""
    rp = ResidentPipeline("cpu", torch.float32)
    rp.load_checkpoint(ck("sd1", 1, torch.float32))
    assert rp.modules["unet"].conv_in.weight.dtype == torch.float32 and rp.spec.storage == ()
    mixed = {k: v.float() if k.startswith("first_stage_model.") else v for k, v in ck("sd1", 2).tensors.items()}
    rp.load_checkpoint(Checkpoint(Path("mixed.safetensors"), mixed))
    assert rp.builds == 2 and dict(rp.spec.storage) == {"unet": "float16", "text_encoder": "float16"}
    assert rp.modules["vae"].decoder.conv_in.weight.dtype == torch.float32
    sd = rp.state_dict()
    assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in mixed.items() if k in sd and v.is_floating_point())
    assert ResidentPipeline("cpu", torch.float16)._spec(mixed, "m", None, {k: v.dtype for k, v in mixed.items()}).storage == ()


def test_save_current_merge_is_what_the_pipeline_holds(tmp_path):
    A, B = ck("sd2", 1, torch.float32), ck("sd2", 2, torch.float32)
    r = Recipe("a", "b", alpha=0.25)
    rp = ResidentPipeline("cpu", torch.float32)
    rp.swap(plan_merge(r, A, B))
    sd = rp.state_dict()
    want = merge(r, A, B).tensors
    for k, v in want.items():
        if v.is_floating_point():
            assert torch.equal(sd[k], v), k   # incl. fused q/k/v, VAE 1x1 convs, SD2's unused last layer
    rp2 = ResidentPipeline("cpu", torch.float32)
    rp2.load_checkpoint(Checkpoint(Path("x"), sd))
    for comp, m in rp.modules.items():
        other = dict(rp2.modules[comp].named_parameters())
        assert all(torch.equal(p, other[n]) for n, p in m.named_parameters())


def test_generation_seeds_batches_samplers_and_prompt_options():
    rp = ResidentPipeline("cpu", torch.float32)
    rp.load_checkpoint(ck("sd1", 1))
    a, b = generate(rp, small()), generate(rp, small())
    assert np.array_equal(img(a), img(b))                          # same seed, same image
    assert not np.array_equal(img(a), img(generate(rp, small(seed=2))))
    r = generate(rp, small(seed=-1))
    assert 0 <= r.images[0].seed < 2**32 and f"Seed: {r.images[0].seed}" in r.images[0].infotext
    r = generate(rp, small(seed=10, batch_count=2, batch_size=2))
    assert [i.seed for i in r.images] == [10, 11, 12, 13]
    # image 3 of the run is seed 12's image (up to batched-arithmetic rounding of a pixel level)
    assert np.abs(img(r, 2) - img(generate(rp, small(seed=12)))).max() <= 2
    for s in SAMPLERS:
        assert generate(rp, small(sampler=s)).images[0].image.size == (64, 64)
    r = generate(rp, small(prompt="a dog --n ugly --w 96 --h 64 --d 5 --l 4.5 --s 3"))
    info = r.images[0].infotext
    assert r.images[0].image.size == (96, 64) and r.images[0].seed == 5
    assert info.startswith("a dog\nNegative prompt: ugly\nSteps: 3, Sampler: Euler a, CFG scale: 4.5, Seed: 5, Size: 96x64")
    with pytest.raises(MergeError, match="multiples of 8"):
        generate(rp, small(width=100))
    with pytest.raises(MergeError, match="unknown sampler"):
        generate(rp, small(sampler="Nope"))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_prompt_weights_clip_skip_and_long_prompts(arch):
    rp = ResidentPipeline("cpu", torch.float32)
    rp.load_checkpoint(ck(arch, 1))
    pipe = rp.pipe
    plain, _, n = encode_prompt(pipe, arch, "a cat on a mat", 1)
    weighted, _, _ = encode_prompt(pipe, arch, "a (cat:1.5) on a mat", 1)
    assert n == 1 and plain.shape[1] == 77 and not torch.equal(plain, weighted)
    same, _, _ = encode_prompt(pipe, arch, "a (cat:1.0) on a mat", 1)
    torch.testing.assert_close(plain, same)
    skip2, _, _ = encode_prompt(pipe, arch, "a cat on a mat", 2)
    assert not torch.equal(plain, skip2)
    long, pooled, n = encode_prompt(pipe, arch, " ".join(["cat"] * 100), 1)
    assert n == 2 and long.shape[1] == 154
    brk, _, n = encode_prompt(pipe, arch, "a cat BREAK a mat", 1)
    assert n == 2
    if arch == "sdxl":
        assert plain.shape[-1] == 32 + 48 and pooled.shape == (1, 48)


def test_tokenizers_are_the_real_clip_ones():
    vocab, merges = clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    rp = ResidentPipeline("cpu", torch.float32)
    rp.ensure(spec_for(random_checkpoint("sdxl", seed=1)))
    assert rp.pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    pad1 = rp.pipe.tokenizer("a cat", padding="max_length", max_length=6).input_ids
    pad2 = rp.pipe.tokenizer_2("a cat", padding="max_length", max_length=6).input_ids
    assert pad1 == [49406, 320, 2368, 49407, 49407, 49407] and pad2 == [49406, 320, 2368, 49407, 0, 0]


def test_tokenizers_are_loaded_once_per_pad_token(tmp_path, monkeypatch):
    """Pipelines built from other folders share the tokenizer of each pad token (the files are
    the same but for it), which encodes as one loaded from its own folder."""
    from transformers import CLIPTokenizer

    from merger.pipeline.pipeline_config import clip_tokenizer
    pipes = []
    for sub in ("one", "two"):
        monkeypatch.setenv("SDMW_DATA_DIR", str(tmp_path / sub))
        rp = ResidentPipeline("cpu", torch.float32)
        rp.ensure(spec_for(random_checkpoint("sdxl", seed=1)))
        pipes.append(rp.pipe)
    assert pipes[0].tokenizer is pipes[1].tokenizer and pipes[0].tokenizer_2 is pipes[1].tokenizer_2
    assert pipes[0].tokenizer is not pipes[0].tokenizer_2                       # pads "<|endoftext|>" and "!"
    folder = next((tmp_path / "two" / "pipelines").glob("sdxl-*")) / "tokenizer_2"
    assert clip_tokenizer(folder) is pipes[1].tokenizer_2
    fresh = CLIPTokenizer.from_pretrained(folder)
    text = "a photo of a cat, (masterpiece:1.2) BREAK 日本"
    assert pipes[1].tokenizer_2(text, padding="max_length", max_length=40).input_ids == \
        fresh(text, padding="max_length", max_length=40).input_ids


def test_prediction_type_override_and_detection():
    rp = ResidentPipeline("cpu", torch.float32)
    rp.load_checkpoint(ck("sd2", 1), prediction_type="v_prediction")
    assert rp.pipe.scheduler.config.prediction_type == "v_prediction"
    rp.load_checkpoint(ck("sd2", 1))            # auto: A1111's test decides
    assert rp.prediction_type in ("epsilon", "v_prediction")
    rp.load_checkpoint(ck("sd1", 1))
    assert rp.pipe.scheduler.config.prediction_type == "epsilon"


# ----------------------------------------------------------------------------- workstation
@pytest.fixture
def ws(tmp_path):
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    demo_models(dirs)
    return Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")


def test_a_workstation_keeps_the_history_it_is_given_even_empty(tmp_path):
    """An empty MergeHistory is falsy (len 0): it was replaced by the default one, so a caller's
    own (new) history file was ignored and its merges went into the data folder's."""
    from mergehistory import MergeHistory
    mine = MergeHistory(tmp_path / "mine.csv")
    ws = Workstation(ModelDirs.from_models_dir(tmp_path / "models"), device="cpu", dtype=torch.float32,
                     outputs=tmp_path / "out", history=mine)
    assert ws.history is mine


def test_demo_models_written_once(tmp_path):
    dirs = ModelDirs.from_models_dir(tmp_path / "m")
    first = ensure_demo_models(dirs)
    assert {p.name for p in first} == set(DEMO_CHECKPOINTS) | {DEMO_LORA, DEMO_VAE}
    assert ensure_demo_models(dirs) == []
    assert all(n.startswith("demo-") for n in dirs.checkpoints() + dirs.loras() + dirs.vaes())


def test_merge_and_gen_png_info_reloads_the_merge(ws):
    names = sorted(n for n in ws.dirs.checkpoints() if "sd1" in n)
    r = ws.recipe(names[0], names[1], alpha=0.35)
    out = ws.merge(r)
    assert out.history_id == 1 and out.timings.merge > 0
    g = ws.generate(small())
    pngs = list((ws.outputs / "images").glob("*.png"))
    assert len(pngs) == 1
    info = read_png_info(pngs[0])
    assert "Merge ID: 1" in info["parameters"] and Recipe.from_line(info["sdmw_recipe"]) == r
    assert info["sdmw_merge_id"] == "1" and g.result.images[0].image.info["parameters"] == info["parameters"]
    assert ws.history.recipe(-1) == r


def test_alpha_changes_the_image_and_vae_choice(ws):
    names = sorted(n for n in ws.dirs.checkpoints() if "sd1" in n)
    ws.merge(ws.recipe(names[0], names[1], alpha=0.2))
    a = img(ws.generate(small(), save=False).result)
    ws.merge(ws.recipe(names[0], names[1], alpha=0.8))
    b = img(ws.generate(small(), save=False).result)
    assert np.abs(a - b).mean() > 0.5
    ws.set_vae(DEMO_VAE)
    c = ws.generate(small(), save=False).result
    assert not np.array_equal(b, img(c)) and f"VAE: {DEMO_VAE}" in c.images[0].infotext
    ws.set_vae(None)
    assert np.array_equal(b, img(ws.generate(small(), save=False).result))


def test_workstation_errors_and_saving(ws):
    names = ws.dirs.checkpoints()
    sd1 = sorted(n for n in names if "sd1" in n)
    with pytest.raises(MergeError, match="SD 1.x.*SDXL|SDXL.*SD 1.x"):
        ws.merge(ws.recipe(sd1[0], "demo-sdxl-tiny.safetensors"))
    ws.merge(ws.recipe(sd1[0], sd1[1], alpha=0.5))       # still works after the error
    saved = ws.save_current("current", SaveOptions(fp16=True)).path
    assert saved.name == "current.safetensors" and saved.parent == ws.dirs.ckpt
    with pytest.raises(MergeError, match="already exists"):
        ws.save_current("current", SaveOptions(fp16=True))
    row = ws.history.recipe(-1)
    p = ws.save_recipe(row, "from-history").path
    a = load_checkpoint(p).tensors
    b = load_checkpoint(saved).tensors
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert torch.equal(a[k], b[k])
    with pytest.raises(MergeError, match="model not found"):
        ws.recipe("nope.safetensors", sd1[0])
