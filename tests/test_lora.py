"""LoRA loading and merging into checkpoints, checked against diffusers and lycoris-lora."""
import math
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from lora_ops.delta import loha_delta, lokr_delta, lora_delta, module_delta
from lora_ops.formats import LoraModule, load_lora
from lora_ops.merge_ckpt import merge_loras, merged_checkpoint, parse_specs
from lora_ops.naming import kohya_targets
from merger.blocks import block_of
from merger.files.checkpoint_io import Checkpoint
from merger.demo import demo_lora
from merger.errors import MergeError
from merger.pipeline.resident import ResidentPipeline
from merger.synthetic import random_checkpoint


@pytest.fixture
def base():
    return random_checkpoint("sd1", seed=101, extras=False)


def save(tmp_path, name, tensors, meta=None):
    p = tmp_path / name
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta)
    return p


def test_merge_matches_diffusers_load_lora_weights_and_fuse(base, tmp_path):
    """kohya LoRA merged into the checkpoint = diffusers' load_lora_weights + fuse_lora."""
    path = save(tmp_path, "demo.safetensors", {k: v.float() for k, v in demo_lora(base).items()})
    lora = load_lora(path)
    ours = ResidentPipeline("cpu", torch.float32)
    ours.load_checkpoint(Checkpoint(Path("m"), merged_checkpoint(base, [(lora, parse_specs("demo:0.7", "sd1")[0])], "sd1")))
    ref = ResidentPipeline("cpu", torch.float32)
    ref.load_checkpoint(Checkpoint(Path("m"), base))
    ref.pipe.load_lora_weights(str(path), adapter_name="demo")
    ref.pipe.fuse_lora(lora_scale=0.7)
    # diffusers 0.42's kohya converter renames the mid block's proj_in/proj_out LoRA to
    # "mid_block.1.proj_in" and reports them as unexpected keys (it does not apply them as
    # kohya does); the same 1x1-conv LoRA on every down/up block matches exactly, so those two
    # are left out of the comparison.
    skip = ("mid_block.attentions.0.proj_in.", "mid_block.attentions.0.proj_out.")
    base_pipe = ResidentPipeline("cpu", torch.float32)
    base_pipe.load_checkpoint(Checkpoint(Path("b"), base))
    changed = 0
    for comp in ("unet", "text_encoder"):
        theirs = {n.replace(".base_layer", ""): p for n, p in ref.modules[comp].named_parameters()
                  if "lora_" not in n}
        before = dict(base_pipe.modules[comp].named_parameters())
        for n, p in ours.modules[comp].named_parameters():
            if n.startswith(skip):
                continue
            torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6, msg=f"{comp}.{n}")
            changed += not torch.equal(p, before[n])
    assert changed > 100


def test_loha_and_lokr_match_lycoris():
    lyc_loha = pytest.importorskip("lycoris.functional.loha")
    lyc_lokr = pytest.importorskip("lycoris.functional.lokr")
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w1a, w1b, w2a, w2b = r(12, 4), r(4, 10), r(12, 4), r(4, 10)
    ours = loha_delta(w1a, w1b, w2a, w2b, 8 / 4)
    theirs = lyc_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=8 / 4)
    torch.testing.assert_close(ours, theirs)
    c1a, c1b, c2a, c2b = r(12, 4), r(4, 10 * 9), r(12, 4), r(4, 10 * 9)      # conv 3x3 without Tucker
    ours = loha_delta(c1a, c1b.reshape(4, 10, 3, 3), c2a, c2b.reshape(4, 10, 3, 3), 0.5)
    theirs = lyc_loha.diff_weight(c1b.reshape(4, 10, 3, 3), c1a, c2b.reshape(4, 10, 3, 3), c2a, None, None, gamma=0.5)
    torch.testing.assert_close(ours, theirs.reshape(ours.shape))
    k1, k2a, k2b = r(4, 2), r(3, 2), r(2, 5)                                  # lokr: w1 whole, w2 = a @ b
    m = LoraModule("x", "lokr", {"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b}, alpha=1.0)
    ours = module_delta(m, (12, 10))
    theirs = lyc_lokr.diff_weight(k1, None, None, None, k2a, k2b, None, gamma=1.0)
    torch.testing.assert_close(ours, theirs.reshape(12, 10))
    full = LoraModule("y", "lokr", {"lokr_w1": k1, "lokr_w2": r(3, 5)}, alpha=4.0)   # undecomposed: scale 1
    torch.testing.assert_close(module_delta(full, (12, 10)), torch.kron(k1, full.tensors["lokr_w2"]))


def test_lora_delta_shapes_and_missing_alpha():
    down, up = torch.randn(4, 6), torch.randn(5, 4)
    torch.testing.assert_close(lora_delta(down, up, 0.5), up @ down * 0.5)
    d4, u4 = torch.randn(4, 6, 3, 3), torch.randn(5, 4, 1, 1)
    want = torch.einsum("or,rikl->oikl", u4[:, :, 0, 0], d4)
    torch.testing.assert_close(lora_delta(d4, u4, 1.0), want, rtol=1e-5, atol=1e-5)
    m = LoraModule("m", "lora", {"lora_down.weight": down, "lora_up.weight": up})   # no alpha: = rank
    torch.testing.assert_close(module_delta(m, (5, 6)), up @ down)
    assert lokr_delta(torch.ones(2, 2), torch.ones(1, 3), 2.0).shape == (2, 6)


def test_block_weights_ratios_and_file_formats(base, tmp_path):
    lora = demo_lora(base)
    for dtype, name in ((torch.bfloat16, "bf.safetensors"), (torch.float32, "f.safetensors")):
        lf = load_lora(save(tmp_path, name, {k: v.to(dtype) for k, v in lora.items()},
                            {"ss_network_module": "networks.lora", "ss_network_dim": "4"}))
        assert lf.network_type() == "LoRA" and lf.dims() == (4, 0) and lf.metadata["ss_network_dim"] == "4"
    spec = parse_specs("demo:-0.5:1,1,1,1,1,1,1,1,1,1,0,1,1,1,1,1,1", "sd1")[0]       # OUT05 off
    assert spec.blocks["OUT05"] == 0 and spec.blocks["IN01"] == -0.5 and spec.blocks["IN00"] == 0
    changed = merge_loras(base, [(lf, spec)], "sd1")
    assert changed and not any(block_of(k, "sd1") == "OUT05" for k in changed)
    assert any(block_of(k, "sd1") == "OUT06" for k in changed)
    k = next(k for k in changed if "attn2.to_q" in k and ".output_blocks.6." in k)
    name = next(n for n, t in kohya_targets(k, "sd1") if n in lf.modules)
    want = base[k] - 0.5 * module_delta(lf.modules[name], tuple(base[k].shape))
    torch.testing.assert_close(changed[k], want)
    preset = parse_specs("demo:2:OUTALL, other:1", "sd1")
    assert preset[0].blocks["IN01"] == 0 and preset[0].blocks["OUT04"] == 2 and preset[1].blocks["IN05"] == 1
    with pytest.raises(MergeError, match="12, 17, 20 or 26"):
        parse_specs("demo:1:1,2,3", "sd1")


def test_locon_dylora_rank_and_sdxl_names(tmp_path):
    xl = random_checkpoint("sdxl", seed=3, extras=False)
    key = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"      # a 3x3 conv (LoCon)
    w = xl[key]
    names = [n for n, _ in kohya_targets(key, "sdxl")]
    assert "lora_unet_input_blocks_4_0_in_layers_2" in names                 # kohya's SDXL naming
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    rows = {n: t.rows for n, t in kohya_targets(te2, "sdxl", xl[te2].shape[1])}
    assert rows["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"] == (48, 96)
    rank = 384                                                               # ranks above 320 are fine
    lora = {"lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight": torch.randn(rank, w.shape[1], 3, 3),
            "lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight": torch.randn(w.shape[0], rank, 1, 1) * 0.01,
            "lora_unet_input_blocks_4_0_in_layers_2.alpha": torch.tensor(8.0),
            "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": torch.randn(2, 48),
            "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": torch.randn(48, 2)}
    lf = load_lora(save(tmp_path, "locon.safetensors", lora, {"ss_network_module": "networks.dylora"}))
    assert lf.network_type() == "DyLoRA" and lf.dims() == (2, rank)
    out = merge_loras(xl, [(lf, parse_specs("x:1", "sdxl")[0])], "sdxl")
    assert torch.equal(out[te2][:48], xl[te2][:48]) and not torch.equal(out[te2][48:96], xl[te2][48:96])
    conv = lora_delta(lora["lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight"],
                      lora["lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight"], 8 / rank)
    torch.testing.assert_close(out[key], w + conv, rtol=1e-4, atol=1e-5)
    assert math.isfinite(out[key].sum().item())


def test_wrong_architecture_and_bad_files_are_clear(base, tmp_path):
    xl_lora = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(640, 2),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(5120, 2)}
    lf = load_lora(save(tmp_path, "xl.safetensors", xl_lora))
    with pytest.raises(MergeError, match="LoRA xl does not fit this"):
        merge_loras(base, [(lf, parse_specs("xl:1", "sd1")[0])], "sd1")
    with pytest.raises(MergeError, match="looks like a checkpoint"):
        load_lora(save(tmp_path, "ckpt.safetensors", base))
    bad = {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}
    with pytest.raises(MergeError, match="lacks lora_up.weight"):
        load_lora(save(tmp_path, "bad.safetensors", bad))


def test_cli_merge_and_info(base, tmp_path):
    """The first call in a fresh interpreter, as the user runs it; the others forked
    (``tests/forked_cli.py``)."""
    from tests.forked_cli import run_module
    ck = save(tmp_path, "base.safetensors", base)
    save(tmp_path, "demo.safetensors", demo_lora(base), {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    out = tmp_path / "out.safetensors"
    r = run_module("lora_ops", "merge-ckpt", "--model", ck, "--loras", "demo:0.5:OUTALL", "--lora-dir", tmp_path,
                   "--output", out, fresh=True)
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
    merged = st.load_file(str(out))
    assert sum(not torch.equal(merged[k], base[k]) for k in base) > 50
    r = run_module("lora_ops", "info", tmp_path / "demo.safetensors")
    assert r.returncode == 0 and "LoRA, " in r.stdout and "dim 4" in r.stdout and "ss_network_dim: 4" in r.stdout
    r = run_module("lora_ops", "merge-ckpt", "--model", ck, "--loras", "nope:1", "--lora-dir", tmp_path,
                   "--output", tmp_path / "x.safetensors")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: LoRA not found: nope")


# ----------------------------------------------------------------------------- LoRA -> LoRA, extract
def _lf(tmp_path, name, sd):
    return load_lora(save(tmp_path, name, sd))


def _delta_of(sd_lora, tmp_path, name, module, shape):
    return module_delta(_lf(tmp_path, name, sd_lora).modules[module], shape)


def test_concat_and_svd_merges(base, tmp_path):
    from lora_ops.merge_loras import merge_concat, merge_same_rank, merge_svd
    a = _lf(tmp_path, "a.safetensors", demo_lora(base, rank=4, seed=1))
    b = _lf(tmp_path, "b.safetensors", demo_lora(base, rank=2, alpha=1.0, seed=2))
    name = next(iter(a.modules))
    w_key = next(k for k in base if name in [n for n, _ in kohya_targets(k, "sd1")])
    shape = tuple(base[w_key].shape)
    want = 0.7 * module_delta(a.modules[name], shape) - 0.4 * module_delta(b.modules[name], shape)
    cat = merge_concat([(a, 0.7), (b, -0.4)], shuffle=True)
    assert cat[f"{name}.lora_down.weight"].shape[0] == 6
    torch.testing.assert_close(_delta_of(cat, tmp_path, "c.safetensors", name, shape), want, rtol=1e-4, atol=1e-6)
    full = merge_svd([(a, 0.7), (b, -0.4)], new_rank=6, clamp_quantile=1.0)
    torch.testing.assert_close(_delta_of(full, tmp_path, "s.safetensors", name, shape), want, rtol=1e-3, atol=1e-5)
    errs = [(_delta_of(merge_svd([(a, 0.7), (b, -0.4)], new_rank=r, clamp_quantile=1.0), tmp_path, f"r{r}.safetensors",
                       name, shape) - want).norm().item() for r in (1, 3, 6)]
    assert errs[0] > errs[1] > errs[2]
    same = merge_same_rank([(a, 0.5)], same_strength=True)
    torch.testing.assert_close(_delta_of(same, tmp_path, "ss.safetensors", name, shape),
                               0.5 * module_delta(a.modules[name], shape), rtol=1e-4, atol=1e-6)
    plain = merge_same_rank([(a, 0.5)])
    torch.testing.assert_close(_delta_of(plain, tmp_path, "sp.safetensors", name, shape),
                               0.25 * module_delta(a.modules[name], shape), rtol=1e-4, atol=1e-6)   # kohya: ratio²
    with pytest.raises(MergeError, match="ranks differ"):
        merge_same_rank([(a, 1), (b, 1)])
    half = merge_concat([(a, 0.7), (b, -0.4)], precision="fp16")          # calculation precision
    assert half[f"{name}.lora_down.weight"].dtype == torch.float16
    torch.testing.assert_close(_delta_of(half, tmp_path, "h.safetensors", name, shape), want, rtol=2e-2, atol=2e-3)


def test_same_rank_merge_puts_the_sign_on_down_as_kohya(base, tmp_path):
    """kohya merge_lora_models: s = sqrt(alpha/base_alpha)·ratio; up gets |s|, down gets s."""
    from lora_ops.merge_loras import merge_same_rank
    a = _lf(tmp_path, "a.safetensors", demo_lora(base, rank=4, alpha=2.0, seed=1))
    b = _lf(tmp_path, "b.safetensors", demo_lora(base, rank=4, alpha=1.0, seed=2))
    out = merge_same_rank([(a, 0.6), (b, -0.4)])
    for name in list(a.modules)[:5]:
        ta, tb = a.modules[name].tensors, b.modules[name].tensors
        s_a, s_b = math.sqrt(2.0 / 2.0) * 0.6, math.sqrt(1.0 / 2.0) * -0.4
        up = ta["lora_up.weight"].float() * abs(s_a) + tb["lora_up.weight"].float() * abs(s_b)
        down = ta["lora_down.weight"].float() * s_a + tb["lora_down.weight"].float() * s_b
        torch.testing.assert_close(out[f"{name}.lora_up.weight"], up)
        torch.testing.assert_close(out[f"{name}.lora_down.weight"], down)
        assert out[f"{name}.alpha"].item() == 2.0
    # a single LoRA at a negative ratio subtracts (before, the sign on both sides cancelled)
    name = next(iter(a.modules))
    w_key = next(k for k in base if name in [n for n, _ in kohya_targets(k, "sd1")])
    shape = tuple(base[w_key].shape)
    neg = _delta_of(merge_same_rank([(a, -0.5)]), tmp_path, "neg.safetensors", name, shape)
    torch.testing.assert_close(neg, -0.25 * module_delta(a.modules[name], shape), rtol=1e-4, atol=1e-6)


def test_svd_merge_clamp_quantile_is_an_option(base, tmp_path):
    from lora_ops.merge_loras import merge_lora_set
    a = _lf(tmp_path, "a.safetensors", demo_lora(base, rank=4, seed=1))
    name = next(iter(a.modules))
    full = merge_lora_set([(a, 1.0)], "svd", new_rank=4, clamp_quantile=1.0)
    clamped = merge_lora_set([(a, 1.0)], "svd", new_rank=4, clamp_quantile=0.5)
    up_full, up_clamped = full[f"{name}.lora_up.weight"], clamped[f"{name}.lora_up.weight"]
    assert up_clamped.abs().max() < up_full.abs().max()
    with pytest.raises(MergeError, match="clamp quantile must be in"):
        merge_lora_set([(a, 1.0)], "svd", clamp_quantile=0)


def test_extract_reconstructs_b_minus_a_better_with_rank_and_fast_svd_keeps_the_error():
    from lora_ops.extract import extract_lora, lora_modules
    a = random_checkpoint("sd1", seed=1, extras=False)
    g = torch.Generator().manual_seed(5)
    b = {k: (v + 0.02 * (torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v[0].numel(), generator=g)).reshape(v.shape)
             if v.dim() >= 2 and k.startswith("model.") else v) for k, v in a.items()}
    mods = lora_modules(b, "sd1", conv=False)
    errs = {}
    for fast in (False, True):
        for dim in (1, 2, 8):
            sd, meta = extract_lora(b, a, "sd1", dim=dim, clamp_quantile=1.0, fast=fast)
            assert "text encoder skipped" in meta["sdmw_extract"] and not any(k.startswith("lora_te") for k in sd)
            lf = load_lora(save_tmp(sd))
            err = tot = 0.0
            for name, (key, _) in mods.items():
                if name in lf.modules:
                    d = module_delta(lf.modules[name], tuple(a[key].shape))
                    err += (d - (b[key] - a[key])).norm().item() ** 2
                    tot += (b[key] - a[key]).norm().item() ** 2
            errs[(fast, dim)] = math.sqrt(err / tot)
    assert errs[(False, 1)] > errs[(False, 2)] > errs[(False, 8)] and errs[(False, 8)] < 1e-3
    for dim in (1, 2, 8):
        assert errs[(True, dim)] <= errs[(False, dim)] * 1.05 + 1e-4
    te = dict(b)
    k = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    te[k] = a[k] + 1.0
    sd, meta = extract_lora(te, a, "sd1", dim=2, conv_dim=2)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in sd
    assert any(".lora_down.weight" in n and sd[n].dim() == 4 and sd[n].shape[2] == 3 for n in sd)   # LoCon convs


def save_tmp(sd):
    import tempfile
    d = Path(tempfile.mkdtemp())
    return save(d, "x.safetensors", sd)


def test_cli_merge_loras_and_extract(base, tmp_path):
    from tests.forked_cli import run_module
    save(tmp_path, "a.safetensors", demo_lora(base, seed=1))
    save(tmp_path, "b.safetensors", demo_lora(base, seed=2))

    def run(*a):
        return run_module("lora_ops", *a)
    for method in ("same-rank", "concat", "svd"):
        out = tmp_path / f"m-{method}.safetensors"
        r = run("merge-loras", "--loras", "a:0.6, b:0.4", "--lora-dir", tmp_path, "--method", method,
                "--new-rank", 8, "--output", out)
        assert r.returncode == 0, r.stderr
        lf = load_lora(out)
        assert lf.dims()[0] == {"same-rank": 4, "concat": 8, "svd": 8}[method]
    tuned = {k: (v + 0.01 if k.startswith("model.") and v.dim() >= 2 else v) for k, v in base.items()}
    save(tmp_path, "tuned.safetensors", tuned)
    save(tmp_path, "base.safetensors", base)
    r = run("extract", "--model-a", tmp_path / "tuned.safetensors", "--model-b", tmp_path / "base.safetensors",
            "--dim", 4, "--output", tmp_path / "ex.safetensors")
    assert r.returncode == 0, r.stderr
    lf = load_lora(tmp_path / "ex.safetensors")
    assert lf.dims() == (4, 0) and lf.metadata["ss_network_dim"] == "4"
    r = run("extract-loras", "--lora-b", tmp_path / "a.safetensors", "--lora-c", tmp_path / "b.safetensors",
            "--rank", 3, "--output", tmp_path / "feat.safetensors")
    assert r.returncode == 0, r.stderr
    assert load_lora(tmp_path / "feat.safetensors").dims() == (3, 0)
    r = run("merge-loras", "--loras", "a:1", "--lora-dir", tmp_path, "--metadata", "use first LoRA",
            "--output", tmp_path / "meta.safetensors")
    assert r.returncode == 0 and load_lora(tmp_path / "meta.safetensors").metadata["sdmw_method"] == "svd"


# ----------------------------------------------------------------------------- in the workstation
@pytest.fixture
def ws(tmp_path):
    from tests.conftest import demo_models
    from merger.files.model_dirs import ModelDirs
    from merger.workstation import Workstation
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    demo_models(dirs)
    return Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")


def test_prompt_lora_tags():
    from merger.pipeline.prompt import extract_lora_tags
    text, tags = extract_lora_tags("a cat, <lora:style:0.8>, on a mat <lora:char:1:lbw=OUTALL>")
    assert text == "a cat, on a mat" and tags == ["style:0.8", "char:1:OUTALL"]
    with pytest.raises(MergeError, match="must be a number"):
        extract_lora_tags("<lora:x:big>")


def test_recipe_loras_merge_history_and_save(ws):
    from merger.pipeline.generate import GenParams
    from merger.recipe import Recipe
    r = ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.3,
                  loras="demo-sd1-tiny-lora:0.8:OUTALL")
    ws.merge(r)
    assert ws.history.recipe(-1).loras == "demo-sd1-tiny-lora:0.8:OUTALL"
    assert "demo-sd1-tiny-lora" in ws.history.get(-1)["label"]
    held = ws.pipeline.state_dict()
    path = ws.save_recipe(Recipe.from_line(r.to_line()), "with-lora").path
    got = st.load_file(str(path))
    k = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_q.weight"
    plain = ws.cache.get(ws.dirs.resolve("ckpt", "demo-sd1-tiny-A.safetensors")).tensors[k]
    assert not torch.equal(got[k], plain)
    assert got[k].dtype == held[k].dtype == torch.float16 and torch.equal(got[k], held[k])  # rounded once, alike
    k_in = "model.diffusion_model.input_blocks.1.1.proj_in.weight"                # OUTALL: IN blocks untouched
    from merger.engine import merge
    m = ws.cache.get(ws.dirs.resolve("ckpt", "demo-sd1-tiny-A.safetensors"))
    b = ws.cache.get(ws.dirs.resolve("ckpt", "demo-sd1-tiny-B.safetensors"))
    assert torch.equal(got[k_in], merge(Recipe("a", "b", alpha=0.3), m, b).tensors[k_in])
    ws.generate(GenParams(prompt="a cat", steps=2, width=64, height=64, seed=1), save=False)


def test_loras_at_generation_change_the_image_and_leave_the_merge(ws):
    import numpy as np

    from merger.pipeline.generate import GenParams
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.5))
    before = {n: p.clone() for n, p in ws.pipeline.modules["unet"].named_parameters()}
    g = dict(prompt="a cat", steps=2, width=64, height=64, seed=1)
    plain = np.asarray(ws.generate(GenParams(**g), save=False).result.images[0].image, dtype=np.float32)
    tagged = ws.generate(GenParams(**{**g, "prompt": "a cat <lora:demo-sd1-tiny-lora:1.5>"}), save=False).result
    assert np.abs(np.asarray(tagged.images[0].image, dtype=np.float32) - plain).max() > 0
    # the same LoRA merged into the recipe gives the very same weights, hence the same image
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.5,
                       loras="demo-sd1-tiny-lora:1.5"))
    merged = ws.generate(GenParams(**g), save=False).result
    assert np.array_equal(np.asarray(merged.images[0].image), np.asarray(tagged.images[0].image))
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.5))
    assert "LoRAs: demo-sd1-tiny-lora:1.5" in tagged.images[0].infotext and tagged.images[0].infotext.startswith("a cat\n")
    slots = ws.generate(GenParams(**g), save=False, loras="demo-sd1-tiny-lora:1.5").result
    assert np.array_equal(np.asarray(slots.images[0].image), np.asarray(tagged.images[0].image))
    assert all(torch.equal(p, before[n]) for n, p in ws.pipeline.modules["unet"].named_parameters())
    with pytest.raises(MergeError, match="LoRA not found"):
        ws.generate(GenParams(**{**g, "prompt": "<lora:missing:1> a cat"}), save=False)
    assert all(torch.equal(p, before[n]) for n, p in ws.pipeline.modules["unet"].named_parameters())


def test_lora_list_is_cached_and_only_new_files_are_read(ws, tmp_path, monkeypatch):
    from lora_ops import catalog
    calls = []
    real = catalog.load_lora
    monkeypatch.setattr(catalog, "load_lora", lambda p: calls.append(p) or real(p))
    cache = tmp_path / "dims.json"
    rows = catalog.lora_table(ws.dirs.lora, ws.dirs.loras(), cache)
    assert rows[0]["name"] == "demo-sd1-tiny-lora.safetensors" and rows[0]["dim"] == 4 and rows[0]["type"] == "LoRA"
    assert len(calls) == 1
    out = ws.merge_lora_files("demo-sd1-tiny-lora:0.5, demo-sd1-tiny-lora:0.5", "concat", name="twice")
    rows = catalog.lora_table(ws.dirs.lora, ws.dirs.loras(), cache)
    assert len(calls) == 2 and {r["name"]: r["dim"] for r in rows}["twice.safetensors"] == 8
    assert out.path.parent == ws.dirs.lora


def test_workstation_extract(ws):
    out = ws.extract_lora("demo-sd1-tiny-B.safetensors", "demo-sd1-tiny-A.safetensors", dim=4, name="b-minus-a")
    lf = load_lora(out.path)
    assert lf.dims() == (4, 0) and "text encoder included" in lf.metadata["sdmw_extract"]


def test_extract_from_two_loras_and_metadata_modes(ws, base, tmp_path):
    from lora_ops.extract import extract_from_loras
    from lora_ops.merge_loras import merged_metadata
    from merger.engine.calcmodes.extract import extract_features
    b = _lf(tmp_path, "b.safetensors", demo_lora(base, seed=1))
    c = _lf(tmp_path, "c.safetensors", demo_lora(base, seed=2))
    name = next(iter(b.modules))
    shape = tuple(base[next(k for k in base if name in [n for n, _ in kohya_targets(k, "sd1")])].shape)
    db, dc = module_delta(b.modules[name], shape), module_delta(c.modules[name], shape)
    sd = extract_from_loras(b, c, alpha=0.3, beta=0.6, gamma=2.0, rank=64, fast=False)
    got = _delta_of(sd, tmp_path, "e.safetensors", name, shape)
    torch.testing.assert_close(got, extract_features(torch.zeros(shape), db, dc, 0.3, 0.6, 2.0), rtol=1e-3, atol=1e-5)
    with pytest.raises(MergeError, match="extract needs"):
        extract_from_loras(b, c, alpha=2)
    b.metadata, c.metadata = {"ss_a": "1", "ss_x": "b"}, {"ss_b": "2", "ss_x": "c"}
    pairs = [(b, 1.0), (c, 0.5)]
    assert merged_metadata(pairs, "create new", {"k": "v"}) == {"k": "v"}
    assert merged_metadata(pairs, "merge", {})["ss_x"] == "b" and merged_metadata(pairs, "merge", {})["ss_b"] == "2"
    assert merged_metadata(pairs, "use first LoRA", {}) == {"ss_a": "1", "ss_x": "b"}
    assert '"ratio": 0.5' in merged_metadata(pairs, "save all", {})["sdmw_source_1"]
    with pytest.raises(MergeError, match="LoRA B and LoRA C are the same file"):
        ws.extract_from_loras("demo-sd1-tiny-lora", "demo-sd1-tiny-lora.safetensors", 0.5, 0.0, rank=4, name="same")
    copy = ws.dirs.lora / "copy.safetensors"
    copy.write_bytes((ws.dirs.lora / "demo-sd1-tiny-lora.safetensors").read_bytes())
    out = ws.extract_from_loras("demo-sd1-tiny-lora", "copy", 0.5, 0.0, rank=4, name="same")
    assert load_lora(out.path).dims()[0] == 4
    with pytest.raises(MergeError, match="same.safetensors already exists in the LoRA folder .overwrite is off: tick Overwrite"):
        ws.extract_from_loras("demo-sd1-tiny-lora", "copy", 0.5, 0.0, rank=4, name="same")
    assert ws.extract_from_loras("demo-sd1-tiny-lora", "copy", 0.5, 0.0, rank=4, name="same", overwrite=True).path
    out = ws.merge_lora_files("demo-sd1-tiny-lora:1", "svd", new_rank=2, name="m", metadata="use first LoRA",
                              precision="bf16")
    lf = load_lora(out.path)
    # the copied metadata's dim (4) would be wrong: the dims are the merged file's own
    assert lf.metadata["ss_network_dim"] == "2" and next(iter(lf.modules.values())).tensors["lora_up.weight"].dtype == torch.bfloat16
    meta = load_lora(ws.merge_lora_files("demo-sd1-tiny-lora:1, copy:0.5", "concat", name="new").path).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == ("8", "8", "sd_v1")
