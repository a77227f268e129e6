"""Features from the source documents (issue 12): sd-scripts prompt variants, DyLoRA extraction,
LoRA metadata legends, and the command lines' negative vectors."""
from dataclasses import replace

import pytest

from merger.errors import MergeError
from merger.pipeline.generate import GenParams
from merger.pipeline.prompt import check_variants, choose_variants, enumerate_variants

GEN = GenParams(prompt="a cat", steps=2, width=64, height=64, seed=11)


def test_variant_syntax_as_sd_scripts():
    assert enumerate_variants("a {e$$red|green|blue|pink|gold} {E$$cat|dog|fox}")[:4] == [
        "a red cat", "a red dog", "a red fox", "a green cat"]
    assert len(enumerate_variants("a {e$$red|green|blue|pink|gold} {E$$cat|dog|fox}")) == 15
    assert enumerate_variants("{e$$1-2$$ and $$x|y}") == ["x", "y", "x and y"]
    one = {choose_variants("{a|b|c}", s) for s in range(200)}
    assert one == {"a", "b", "c"}
    two = choose_variants("{2$$a|b|c}", 3)
    assert len(two.split(", ")) == 2 and len(set(two.split(", "))) == 2
    some = {len(choose_variants("{1-2$$ and $$a|b|c}", s).split(" and ")) for s in range(100)}
    assert some == {1, 2}
    assert choose_variants("x {a|b|c} y", 42) == choose_variants("x {a|b|c} y", 42)         # seeded
    assert choose_variants(r"literal \{braces\} {a|a}", 1) == "literal {braces} a"
    assert enumerate_variants("no variants here") == ["no variants here"]


@pytest.mark.parametrize("prompt, msg", [
    ("a {b|c", "'{' at position 3 is never closed"),
    ("a b|c} d", "'}' at position 6 has no opening '{'"),
    ("{x {a|b}}", "nested '{' at position 4"),
    ("cat {3$$a|b}", "'{3$$a|b}' at position 5 asks for 3 of 2 choices"),
    ("cat {2-1$$a|b}", "bad count '2-1' at position 5"),
])
def test_bad_variants_name_the_position(prompt, msg):
    with pytest.raises(MergeError, match="prompt: " + msg.replace("$", r"\$").replace("{", r"\{").replace("(", r"\(")):
        check_variants(prompt)
    with pytest.raises(MergeError, match="position"):
        replace(GEN, prompt=prompt).check()


def test_generation_runs_every_combination_and_records_the_chosen_text(demo_ws):
    ws = demo_ws
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.5))
    p = replace(GEN, prompt="a {e$$red|green} {cat|dog|fox}", batch_count=2)
    out = ws.generate(p, save=False).result.images
    prompts = [im.infotext.splitlines()[0] for im in out]
    assert len(out) == 4 and [x.split()[1] for x in prompts] == ["red", "red", "green", "green"]
    assert all(x.split()[2] in ("cat", "dog", "fox") for x in prompts)
    assert [im.seed for im in out] == [11, 12, 11, 12]                          # the same seeds per combination
    again = [im.infotext.splitlines()[0] for im in ws.generate(p, save=False).result.images]
    assert again == prompts                                                     # prompt + seed: reproducible
    # the XYZ prompt axis and dice runs go through the same generation
    from merger.sweeps.xyz_run import PlotSpec, prepare, run
    spec = PlotSpec(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"), GEN,
                    {"X": ("prompt", "a {cat|dog}\na {e$$red|blue} fox"), "Y": ("none", ""), "Z": ("none", "")})
    res = run(ws, prepare(ws, spec))
    assert res.cells_done == 2
    bad = PlotSpec(spec.recipe, GEN, {"X": ("prompt", "a {cat|dog\nfine"), "Y": ("none", ""), "Z": ("none", "")})
    with pytest.raises(MergeError, match="never closed"):
        prepare(ws, bad)


def test_vector_options_may_start_with_a_negative_number(tmp_path, models):
    from merger.cli import join_negative_values, main
    assert join_negative_values(["--adjust", "-6,0,0", "--alpha", "-0.5", "--x=-1,2"]) == \
        ["--adjust=-6,0,0", "--alpha", "-0.5", "--x=-1,2"]
    out = tmp_path / "neg.safetensors"
    mbw = ",".join(["-0.5"] + ["0.5"] * 25)
    assert main(["merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--mode", "weight_sum",
                 "--adjust", "-1,0,0,0,0,0,0,0", "--mbw-alpha", mbw, "--alpha", "-0.2", "--output", str(out),
                 "--no-history", "--quiet"]) == 0
    import json

    from merger.files.checkpoint_io import read_safetensors_header
    recipe = json.loads(read_safetensors_header(out)[0]["__metadata__"]["sdmw_recipe"])
    assert recipe["adjust"][0] == -1 and recipe["mbw_alpha"][0] == -0.5 and recipe["alpha"] == -0.2


def _dylora(tmp_path, rank=8, unit=4):
    import json

    import safetensors.torch as st

    from merger.demo import demo_lora
    from merger.synthetic import random_checkpoint
    sd = demo_lora(random_checkpoint("sd1", seed=1, extras=False), rank=rank, alpha=4.0)
    path = tmp_path / "dy.safetensors"
    st.save_file(sd, str(path), metadata={"ss_network_module": "networks.dylora", "ss_network_dim": str(rank),
                                          "ss_network_args": json.dumps({"unit": str(unit)})})
    return path, sd


def test_dylora_gives_the_first_r_ranks_as_an_ordinary_lora(tmp_path):
    from lora_ops.dylora import extract_dylora_rank
    from lora_ops.formats import load_lora
    path, full = _dylora(tmp_path)
    dy = load_lora(path)
    assert dy.network_type() == "DyLoRA"
    sd, meta = extract_dylora_rank(dy, 4)
    name = next(k for k in full if k.endswith("lora_down.weight"))[: -len(".lora_down.weight")]
    import torch
    assert torch.equal(sd[f"{name}.lora_down.weight"], full[f"{name}.lora_down.weight"][:4])
    assert torch.equal(sd[f"{name}.lora_up.weight"], full[f"{name}.lora_up.weight"][:, :4])
    assert sd[f"{name}.alpha"].item() == 4.0                                     # alpha kept, as sd-scripts
    assert meta["ss_network_dim"] == "4" and "split from DyLoRA, rank 8 to 4" in meta["ss_training_comment"]
    for bad in (6, 12, 0):
        with pytest.raises(MergeError, match="multiple of dy's unit 4 from 4 to its dim 8"):
            extract_dylora_rank(dy, bad)
    import lora_ops.cli as lcli
    out = tmp_path / "r4.safetensors"
    assert lcli.main(["extract-dylora", "--lora", str(path), "--rank", "4", "--output", str(out)]) == 0
    fixed = load_lora(out)
    assert fixed.network_type() == "LoRA" and fixed.dims() == (4, 0)
    with pytest.raises(MergeError, match="not a DyLoRA"):
        extract_dylora_rank(fixed, 4)


def test_dylora_from_the_lora_folder(demo_ws, tmp_path):
    path, _ = _dylora(tmp_path)
    (demo_ws.dirs.lora / "mydy.safetensors").write_bytes(path.read_bytes())
    out = demo_ws.extract_dylora("mydy", 8)
    assert out.path.name == "mydy-0008.safetensors"
    with pytest.raises(MergeError, match="already exists"):
        demo_ws.extract_dylora("mydy", 8)


def test_lora_axis_labels_carry_metadata_legends(demo_ws, tmp_path):
    from merger.sweeps.xyz import grid_image
    from merger.sweeps.xyz_run import PlotSpec, prepare
    ws = demo_ws
    spec = PlotSpec(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"), GEN,
                    {"X": ("lora", "demo-sd1-tiny-lora:0.5\ndemo-sd1-tiny-lora:1"), "Y": ("none", ""),
                     "Z": ("none", "")}, lora_legend="ss_network_dim, ss_base_model_version, ss_num_epochs")
    prep = prepare(ws, spec)
    assert prep.axes["X"].labels[0] == ("demo-sd1-tiny-lora:0.5\ndemo-sd1-tiny-lora: ss_network_dim=4, "
                                        "ss_base_model_version=sd_v1, ss_num_epochs=-")
    from PIL import Image
    im = Image.new("RGB", (64, 64))
    plain = PlotSpec(spec.recipe, GEN, spec.axes)
    short = grid_image([im, im], prepare(ws, plain).axes["X"], prepare(ws, plain).axes["Y"])
    tall = grid_image([im, im], prep.axes["X"], prep.axes["Y"])
    assert tall.height > short.height                                            # the legend is drawn
    assert PlotSpec.from_dict(spec.to_dict()).lora_legend == spec.lora_legend   # kept by reservations


def _kohya_module_names(pipe, conv: bool) -> set[str]:
    """kohya networks/lora.py create_modules, written from its description: Linear / Conv2d children
    of the target classes (Transformer2DModel; with a conv dim also ResnetBlock2D, Downsample2D,
    Upsample2D; CLIPAttention / CLIPMLP in the text encoder), named prefix + dotted path with '_'."""
    unet_classes = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    names = set()
    te = pipe.text_encoder       # kohya names from CLIPTextModel: "text_model.encoder..."
    te_prefix = "lora_te" if hasattr(te, "text_model") else "lora_te_text_model"
    for prefix, root, classes in (("lora_unet", pipe.unet, unet_classes),
                                  (te_prefix, te, {"CLIPAttention", "CLIPMLP"})):
        for name, module in root.named_modules():
            if module.__class__.__name__ in classes:
                for child_name, child in module.named_modules():
                    kind = child.__class__.__name__
                    if kind == "Linear" or (kind in ("Conv2d", "LoRACompatibleConv") and
                                            (conv or child.kernel_size == (1, 1))):
                        names.add(f"{prefix}_{name}.{child_name}".replace(".", "_"))
    return names


@pytest.mark.parametrize("conv", [False, True])
def test_extraction_covers_kohyas_module_set(demo_ws, conv):
    from lora_ops.extract import lora_modules
    from merger.files.checkpoint_io import load_checkpoint
    ws = demo_ws
    ws.load_model("demo-sd1-tiny-A.safetensors")
    tensors = load_checkpoint(ws.dirs.ckpt / "demo-sd1-tiny-A.safetensors").tensors
    ours = set(lora_modules(tensors, "sd1", conv))
    assert ours == _kohya_module_names(ws.pipeline.pipe, conv)
    if conv:
        assert any("time_emb_proj" in n for n in ours) and any("conv_shortcut" in n for n in ours)
        assert not any(n in ("lora_unet_conv_in", "lora_unet_conv_out") for n in ours)
        extra = set(lora_modules(tensors, "sd1", conv, conv_in_out=True)) - ours
        assert extra == {"lora_unet_conv_in", "lora_unet_conv_out"}


def test_sdxl_fine_block_names_as_supermerger():
    from merger.blocks import BLOCKS_XL_EXT, xl_fine_block
    from merger.ldm_layout import sized_layout
    cases = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": "IN410",
             "model.diffusion_model.input_blocks.4.0.in_layers.2.weight": "IN40",
             "model.diffusion_model.middle_block.1.transformer_blocks.3.ff.net.2.bias": "MID103",
             "model.diffusion_model.output_blocks.2.2.conv.weight": "OUT22",
             "model.diffusion_model.out.2.weight": "OUT9", "model.diffusion_model.time_embed.0.weight": "TIME",
             "model.diffusion_model.label_emb.0.0.bias": "LABEL",
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": "CLIPL",
             "conditioner.embedders.1.model.ln_final.bias": "CLIPG", "first_stage_model.encoder.conv_in.weight": "VAE"}
    for key, want in cases.items():
        assert xl_fine_block(key) == want, key
    fines = {xl_fine_block(k) for k in sized_layout("sdxl", "full")}      # shapes only: no weights
    assert set(BLOCKS_XL_EXT) - fines == {"IN0"} and fines - {None} <= set(BLOCKS_XL_EXT)


def test_sdxl_include_exclude_takes_fine_names():
    from merger.engine.ratios import inex_selection, split_inex
    from tests.conftest import tiny
    xl = tiny("sdxl", 1).tensors
    blocks, elems = split_inex("CLIPL TIME IN41", "sdxl")
    assert blocks == ["CLIPL", "TIME", "IN41"] and elems == []
    from merger.recipe import Recipe
    merged, kept = inex_selection(Recipe("a", "b", inex="exclude", inex_blocks=blocks, inex_elements=[]), xl, "sdxl")
    assert kept and all(k.startswith("conditioner.embedders.0.") or "time_embed" in k
                        or ".input_blocks.4.1." in k for k in kept)
    assert any(k.startswith("conditioner.embedders.0.") for k in kept) and any("time_embed" in k for k in kept)
    assert any(".input_blocks.4.1." in k for k in kept)
    assert not any(k.startswith("conditioner.embedders.1.") for k in kept)      # CLIPG stays merged
    assert split_inex("CLIPL", "sd1") == ([], ["CLIPL"])                        # SD1: just a key substring


def test_a_110_value_extended_sdxl_vector_merges_each_sub_block():
    import torch

    from merger.blocks import BLOCKS_XL_EXT, block_of, xl_fine_block
    from merger.engine import merge
    from merger.recipe import Recipe
    from tests.conftest import tiny
    A, B = tiny("sdxl", 1), tiny("sdxl", 2)
    vec = [round(i / 109, 4) for i in range(110)]
    res = merge(Recipe("a", "b", mbw_alpha=vec), A, B).tensors
    checked = 0
    for key, t in A.tensors.items():
        fine = xl_fine_block(key)
        if fine is None or not t.is_floating_point() or "model" not in key:
            continue
        want = 0 if (block_of(key, "sdxl") == "BASE" and fine != "CLIPG") else BLOCKS_XL_EXT.index(fine)
        ratio = vec[want]
        torch.testing.assert_close(res[key], torch.lerp(t, B.tensors[key], ratio), rtol=0, atol=1e-6)
        checked += 1
    assert checked > 500
    from merger.sweeps.xyz import pin
    with pytest.raises(MergeError, match="pinpoint blocks works on 20-block MBW vectors"):
        pin(Recipe("a", "b", mbw_alpha=vec), ["IN01"], "alpha", 0.5, "sdxl")
    from merger.presets import parse_vector
    assert len(parse_vector(",".join(map(str, vec)), "sdxl")) == 110
    with pytest.raises(MergeError, match="or 110 .extended."):
        parse_vector(",".join(["0.5"] * 50), "sdxl")


def test_mask_levels_follow_additional_networks():
    import torch

    from merger.pipeline.regional import mask_levels
    m = torch.ones(100, 80)
    levels = mask_levels(m, [(64, 64)])
    assert sorted(levels) == [1, 4, 16, 64]                                     # 8x8, 4x4, 2x2, 1x1
    odd = mask_levels(m, [(72, 64)])                                            # 8 x 9 latents: odd width
    assert {(t.shape[2], t.shape[3]) for t in odd.values()} >= {(8, 9), (8, 10), (4, 5), (4, 6), (2, 3), (2, 4), (1, 2)}
    both = mask_levels(m, [(64, 64), (128, 128)])
    assert 256 in both and 64 in both
    half = torch.zeros(8, 8)
    half[:, :4] = 1
    lv = mask_levels(half, [(64, 64)])[64][0, 0]
    assert lv[:, :3].min() == 1 and lv[:, 5:].max() == 0


def test_regional_lora_with_a_white_mask_equals_the_added_lora_and_is_recorded(demo_ws):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from merger.pipeline.pnginfo import read_png_info
    ws = demo_ws
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.5))
    p = replace(GEN, steps=4, seed=21)
    lora = "demo-sd1-tiny-lora:4"          # strong enough to show on the tiny random model
    added = ws.generate(p, save=False, loras=lora).result.images[0].image
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    hooked = ws.generate(p, mask=white, regional=[lora, "", ""])
    img = hooked.result.images[0].image
    diff = np.abs(np.asarray(added, dtype=int) - np.asarray(img, dtype=int))
    assert diff.max() <= 1, diff.max()                                          # ≤ 1/255 per channel
    plain = ws.generate(p, save=False).result.images[0].image
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(added, dtype=int)).max() > 3   # the LoRA shows
    left = Image.new("RGB", (32, 32), (0, 0, 0))
    left.paste((255, 0, 0), (0, 0, 16, 32))                                     # R: slot 1 on the left half only
    part = ws.generate(p, save=False, mask=left, regional=[lora, "", ""]).result.images[0].image
    assert np.asarray(part, dtype=int).tobytes() not in (np.asarray(added, dtype=int).tobytes(),
                                                         np.asarray(plain, dtype=int).tobytes())
    info = read_png_info(hooked.files[0])
    assert "LoRA mask: R: demo-sd1-tiny-lora:4" in info["parameters"]
    stored = Image.open(io.BytesIO(base64.b64decode(info["sdmw_lora_mask"])))
    assert stored.size == (32, 32) and stored.getpixel((0, 0)) == (255, 255, 255)
    # the merged weights are back exactly afterwards
    again = ws.generate(p, save=False).result.images[0].image
    assert again.tobytes() == plain.tobytes()
    assert ws.generate(p, save=False, regional=[lora, "", ""]).result.images[0].image.tobytes() == added.tobytes()


def test_old_sd1_text_encoder_names_are_read_as_a1111_reads_them(tmp_path, models):
    """An SD1 file whose text encoder lacks ``text_model.`` (A1111's checkpoint_dict_replacements)
    merges exactly like the canonical file: before, its text encoder was silently not merged."""
    import safetensors.torch as st
    import torch

    from merger.arch import detect_arch_of_file
    from merger.cli import main
    from merger.files.checkpoint_io import load_checkpoint
    canon = load_checkpoint(models["b"]).tensors
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in canon.items()}
    assert any(k.startswith("cond_stage_model.transformer.encoder.") for k in old)
    old_path = tmp_path / "old_b.safetensors"
    st.save_file(old, str(old_path))
    assert load_checkpoint(old_path).tensors.keys() == canon.keys()
    outs = {}
    for tag, b in (("canon", models["b"]), ("old", old_path)):
        outs[tag] = tmp_path / f"{tag}.safetensors"
        assert main(["merge", "--model-a", str(models["a"]), "--model-b", str(b), "--mode", "weight_sum",
                     "--alpha", "0.5", "--output", str(outs[tag]), "--no-history", "--quiet", "--no-metadata"]) == 0
    x, y = load_checkpoint(outs["canon"]).tensors, load_checkpoint(outs["old"]).tensors
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(x[te], y[te]) and all(torch.equal(x[k], y[k]) for k in x)
    # SD 2.1 Turbo's SGM names (A1111: ln_final 1024 wide) read as SD 2.x
    from merger.synthetic import random_checkpoint
    sd2 = {("conditioner.embedders.0." + k[len("cond_stage_model."):] if k.startswith("cond_stage_model.") else k): v
           for k, v in random_checkpoint("sd2", seed=1).items()}
    sd2["conditioner.embedders.0.model.ln_final.weight"] = torch.ones(1024)
    turbo = tmp_path / "turbo.safetensors"
    st.save_file(sd2, str(turbo))
    assert detect_arch_of_file(turbo) == "sd2"
    assert "cond_stage_model.model.ln_final.weight" in load_checkpoint(turbo).tensors
