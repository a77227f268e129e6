"""What SuperMerger users look for next to the review loop (issue 11): hires fix and img2img on
the resident pipeline, PNG info read back into settings, the merge ID on the image, Analysis
"attn2", include/exclude "print"."""
from dataclasses import replace

import pytest
from PIL import Image

from merger.analysis import block_cosines, tensor_cosines
from merger.errors import MergeError
from merger.files.saving import model_label
from merger.pipeline.generate import GenParams, infotext
from merger.pipeline.pnginfo import parse_infotext, recipe_from_label, settings_from_png
from merger.engine.ratios import inex_selection
from merger.recipe import Recipe
from tests.conftest import tiny

A, B, C = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", "demo-sd1-tiny-C.safetensors"
CKPTS = [A, B, C, "demo-sdxl-tiny.safetensors"]
GEN = GenParams(prompt="a cat", steps=3, width=64, height=64, seed=7)


def test_infotext_reads_back_with_hires_fields_and_a_multiline_negative():
    p = replace(GEN, negative="blurry\nlow quality", hires_scale=1.5, hires_steps=4, hires_upscaler="Lanczos",
                denoise=0.55, clip_skip=2, cfg=6.5, sampler="DPM++ 2M Karras")
    text = infotext(p, 123, "model", "abc", {"Merge ID": 9, "Note": 'a "quoted, text"'})
    prompt, negative, fields = parse_infotext(text)
    assert (prompt, negative) == ("a cat", "blurry\nlow quality")
    assert fields["Steps"] == "3" and fields["Sampler"] == "DPM++ 2M Karras" and fields["Seed"] == "123"
    assert fields["Hires upscale"] == "1.5" and fields["Hires steps"] == "4" and fields["Hires upscaler"] == "Lanczos"
    assert fields["Denoising strength"] == "0.55" and fields["Clip skip"] == "2" and fields["Merge ID"] == "9"
    _, gen, notes = settings_from_png({"parameters": text}, CKPTS)
    assert gen == {"prompt": "a cat", "negative": "blurry\nlow quality", "steps": 3, "sampler": "DPM++ 2M Karras",
                   "cfg": 6.5, "seed": 123, "clip_skip": 2, "denoise": 0.55, "hires_scale": 1.5, "hires_steps": 4,
                   "hires_upscaler": "Lanczos", "width": 64, "height": 64}


@pytest.mark.parametrize("recipe", [
    Recipe(A, B, alpha=0.3),
    Recipe(A, B, C, mode="add_difference", alpha=0.8),
    Recipe(A, B, C, mode="triple_sum", alpha=0.2, beta=0.3),
    Recipe(A, B, C, mode="sum_twice", alpha=0.4, beta=0.1),
    Recipe(A, B, alpha=0.5, calcmode="cosineA"),
    Recipe(A, B, C, mode="add_difference", calcmode="trainDifference", mbw_alpha=[i / 25 for i in range(26)]),
    Recipe(A, B, C, mode="triple_sum", mbw_alpha=[0.5] * 26, mbw_beta=[0.25] * 26),
    Recipe(A, alpha=1.0, calcmode="self"),
])
@pytest.mark.parametrize("style", ["here", "supermerger"])
def test_a_merge_description_reads_back_as_the_recipe(recipe, style):
    label = model_label(recipe)
    if style == "supermerger":        # SuperMerger's infotext: commas become spaces, " ID n" appended
        label = label.replace(",", " ") + " ID 12"
    got, notes = recipe_from_label(label, CKPTS)
    assert notes == [] and got is not None
    for f in ("model_a", "model_b", "model_c", "mode", "calcmode", "mbw_alpha", "mbw_beta"):
        want = getattr(recipe, f)
        if f == "model_c" and not recipe.uses_c():
            continue
        if f == "mbw_beta" and recipe.mode not in ("triple_sum", "sum_twice"):
            continue
        assert getattr(got, f) == (pytest.approx(want, abs=5e-4) if isinstance(want, list) else want), f
    if recipe.mbw_alpha is None:
        assert got.alpha == pytest.approx(recipe.alpha, abs=5e-4)
        if recipe.uses_beta():
            assert got.beta == pytest.approx(recipe.beta, abs=5e-4)


def test_png_settings_prefer_the_exact_recipe_and_say_what_is_missing():
    r = Recipe(A, "gone.safetensors", alpha=0.37, elemental="IN01:in_layers:0.2")
    recipe, gen, notes = settings_from_png({"parameters": infotext(GEN, 5, "x", "h"), "sdmw_recipe": r.to_line()},
                                           CKPTS)
    assert recipe == r and gen["seed"] == 5
    assert notes == ["model B 'gone.safetensors' is not in the checkpoint folder"]
    recipe, _, notes = settings_from_png({"parameters": infotext(GEN, 5, "demo-sd1-tiny-A", "h")}, CKPTS)
    assert recipe is None and notes == []           # a plain model: nothing to merge, nothing to note
    recipe, _, notes = settings_from_png({"parameters": infotext(GEN, 5, "mine x 0.5 + theirs x 0.5", "h")}, CKPTS)
    assert recipe.mode == "weight_sum" and "model A 'mine' is not in the checkpoint folder" in notes
    with pytest.raises(MergeError, match="no generation settings"):
        settings_from_png({"Software": "x"}, CKPTS)


@pytest.mark.parametrize("model", [A, "demo-sdxl-tiny.safetensors"])
def test_hires_fix_and_img2img_on_the_resident_pipeline(demo_ws, model):
    ws = demo_ws
    ws.load_model(model)
    vae_dtypes = {n: p.dtype for n, p in ws.pipeline.pipe.vae.named_parameters()}
    plain = ws.generate(GEN, save=False).result.images[0]
    latent = ws.generate(replace(GEN, hires_scale=2.0), save=False).result.images[0]
    lanczos = ws.generate(replace(GEN, hires_scale=1.5, hires_upscaler="Lanczos", hires_steps=2), save=False).result.images[0]
    assert plain.image.size == (64, 64) and latent.image.size == (128, 128) and lanczos.image.size == (96, 96)
    assert "Hires upscale: 2, Hires upscaler: Latent" in latent.infotext and "Denoising strength: 0.7" in latent.infotext
    assert "Hires steps: 2" in lanczos.infotext
    again = ws.generate(replace(GEN, hires_scale=2.0), save=False).result.images[0]
    assert again.image.tobytes() == latent.image.tobytes()                      # seeded: reproducible
    red, blue = Image.new("RGB", (80, 80), (220, 30, 30)), Image.new("RGB", (80, 80), (30, 30, 220))
    i2i = replace(GEN, denoise=0.3, steps=4)                                    # int(4 × 0.3) = 1 step
    from_red = ws.generate(i2i, save=False, init_image=red).result.images[0]
    from_blue = ws.generate(i2i, save=False, init_image=blue).result.images[0]
    assert from_red.image.size == (64, 64) and "Denoising strength: 0.3" in from_red.infotext
    assert from_red.image.tobytes() != from_blue.image.tobytes()                 # the start image matters
    # the resident VAE keeps its held precision (SDXL's img2img would upcast it for good)
    assert {n: p.dtype for n, p in ws.pipeline.pipe.vae.named_parameters()} == vae_dtypes


def test_bad_hires_and_img2img_settings_are_clear_errors(demo_ws):
    for kw, msg in (({"hires_scale": 5}, "hires upscale must be"), ({"hires_upscaler": "ESRGAN"}, "hires upscaler"),
                    ({"denoise": 1.5}, "denoising strength"), ({"hires_scale": 4, "width": 2048}, "at most 4096")):
        with pytest.raises(MergeError, match=msg):
            replace(GEN, **kw).check()
    demo_ws.load_model(A)
    with pytest.raises(MergeError, match=r"img2img would run no step: 3 steps × denoising strength 0.3 < 1"):
        demo_ws.generate(replace(GEN, denoise=0.3), save=False, init_image=Image.new("RGB", (64, 64)))
    with pytest.raises(MergeError, match=r"the hires pass would run no step: 2 steps × denoising strength 0.2"):
        demo_ws.generate(replace(GEN, hires_scale=2.0, hires_steps=2, denoise=0.2), save=False)


def test_merge_id_goes_to_the_png_info_and_or_onto_the_image(demo_ws):
    from merger.pipeline.pnginfo import read_png_info
    ws = demo_ws
    out = ws.merge(ws.recipe(A, B, alpha=0.4))
    plain = ws.generate(GEN, id_to=())
    info = read_png_info(plain.files[0])
    assert "Merge ID" not in info["parameters"] and "sdmw_merge_id" not in info and "sdmw_recipe" in info
    both = ws.generate(GEN, id_to=("image", "PNG info"))
    info = read_png_info(both.files[0])
    assert f"Merge ID: {out.history_id}" in info["parameters"] and info["sdmw_merge_id"] == str(out.history_id)
    a, b = plain.result.images[0].image, both.result.images[0].image
    import numpy as np
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).sum(axis=2)
    assert diff[:8, :8].any() and not diff[32:, :].any()                       # only the corner label differs


def test_analysis_attn2_uses_each_blocks_cross_attention_output():
    a, b = tiny("sd1", 1).tensors, tiny("sd1", 2).tensors
    rows = block_cosines(a, b, "sd1", ("U-Net",), "attn2")
    blocks = [blk for blk, _ in rows]
    assert blocks == ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(3, 12)]
    direct = {blk: sim for blk, key, sim in tensor_cosines(a, b, "sd1", ("U-Net",)) if key.endswith("attn2.to_out.0.weight")}
    assert dict(rows) == direct
    assert block_cosines(a, b, "sd1", ("U-Net",), "mean") != rows


def test_include_exclude_print_lists_what_is_kept(tmp_path, models, capsys):
    from merger.cli import main
    a = tiny("sd1", 1).tensors
    merged, kept = inex_selection(Recipe("a", "b", inex="exclude", inex_blocks=["IN01", "OUT11"], inex_elements=[]),
                                  a, "sd1")
    from merger.blocks import block_of
    assert kept and {block_of(k, "sd1") for k in kept} == {"IN01", "OUT11"}       # OUT11 includes .out.
    assert merged and not {block_of(k, "sd1") for k in merged} & {"IN01", "OUT11"}
    out = tmp_path / "dry.safetensors"
    assert main(["merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--mode", "weight_sum",
                 "--include", "attn2", "--print-keys", "--output", str(out), "--no-history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n_kept = int(lines[0].split()[0])
    assert lines[0].endswith("merged") and len(lines) == 1 + n_kept and not out.exists()
    assert all("attn2" not in k for k in lines[1:])
