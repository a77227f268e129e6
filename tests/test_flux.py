"""Flux.1 checkpoints (issue 16, merging to files): layouts with the real key names, detection,
SuperMerger's 61-block map for every key, MBW/presets, the modes against their formulas, float8
inputs and outputs, saving in model A's layout, and a saved merge loading in diffusers."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from merger.arch import detect_arch_of_file
from merger.blocks import BLOCKS_FLUX, block_of
from merger.engine import merge, plan_merge
from merger.errors import MergeError
from merger.files.checkpoint_io import Checkpoint, load_checkpoint
from merger.files.saving import SaveOptions, save_merge
from merger.flux_layout import PREFIX, flux_layout, strip_prefix
from merger.presets import parse_vector, presets
from merger.recipe import Recipe
from merger.synthetic import random_checkpoint

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def flux(seed: int, dtype=torch.bfloat16, name=None) -> Checkpoint:
    return Checkpoint(Path(name or f"flux{seed}.safetensors"), random_checkpoint("flux", seed=seed, dtype=dtype))


def write_flux(folder: Path, name: str, seed: int, dtype=torch.bfloat16, bare=False) -> Path:
    sd = random_checkpoint("flux", seed=seed, dtype=dtype)
    if bare:                                   # BFL's transformer-only file
        sd = {strip_prefix(k): v for k, v in sd.items() if k.startswith(PREFIX)}
    path = folder / name
    st.save_file(sd, str(path))
    return path


# ----------------------------------------------------------------------------- layout, detection
def test_full_layout_has_flux_dev_sizes_and_bfl_names():
    full = flux_layout("full", all_in_one=False, bare=True)
    assert sum(math.prod(s) for s in full.values()) == 11_901_408_320          # Flux.1-dev: 11.9 B
    assert full["double_blocks.18.img_attn.qkv.weight"] == (9216, 3072)
    assert full["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert full["single_blocks.0.linear2.weight"] == (3072, 15360)
    assert full["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert full["guidance_in.in_layer.weight"] == (3072, 256) and full["txt_in.weight"] == (3072, 4096)
    assert not any(k.startswith("double_blocks.19.") or k.startswith("single_blocks.38.") for k in full)
    aio = flux_layout("full")
    assert aio["text_encoders.t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wi_1.weight"] == (10240, 4096)
    assert aio["vae.encoder.conv_out.weight"] == (32, 512, 3, 3) and "vae.quant_conv.weight" not in aio


def test_bare_and_all_in_one_files_are_flux_and_bare_keys_get_the_prefix(tmp_path):
    bare = write_flux(tmp_path, "bare.safetensors", 1, bare=True)
    aio = write_flux(tmp_path, "aio.safetensors", 2)
    assert detect_arch_of_file(bare) == detect_arch_of_file(aio) == "flux"
    ck = load_checkpoint(bare)
    assert ck.bare_flux and all(k.startswith(PREFIX) for k in ck.tensors)
    assert not load_checkpoint(aio).bare_flux


def test_flux_mixed_with_sdxl_is_refused_naming_both():
    xl = Checkpoint(Path("xl.safetensors"), random_checkpoint("sdxl", seed=1))
    with pytest.raises(MergeError, match=r"different architectures: .*flux1.safetensors is Flux\.1, "
                                         r"xl\.safetensors is SDXL"):
        plan_merge(Recipe("a", "b", alpha=0.5), flux(1), xl)


# ----------------------------------------------------------------------------- blocks
def supermerger_flux_block(key: str):
    """SuperMerger's ``blockfromkey(key, isxl=False, isflux=True)``, transcribed: (block, block
    used for the weight index); "Not Merge" keys are kept as model A's."""
    if "vae" in key:
        return "VAE", "Not Merge"
    if "t5xxl" in key:
        return "T5", "T5"
    if "text_encoders.clip" in key:
        return "CLIP", "CLIP"
    match = re.search(r"\.(\d+)\.", key)
    if "double_blocks" in key:
        return f"D{match.group(1).zfill(2)}", f"D{match.group(1).zfill(2)}"
    if "single_blocks" in key:
        return f"S{match.group(1).zfill(2)}", f"S{match.group(1).zfill(2)}"
    if "_in" in key:
        return "IN", "IN"
    if "final_layer" in key:
        return "OUT", "OUT"
    return "Not Merge", "Not Merge"


def test_every_key_is_in_supermerger_block_and_every_block_is_used():
    layout = flux_layout("full")
    seen = set()
    for key in layout:
        _, sm = supermerger_flux_block(key)
        ours = block_of(key, "flux")
        assert (ours if ours is not None else "Not Merge") == sm, key
        seen.add(ours)
    assert seen - {None} == set(BLOCKS_FLUX) and len(BLOCKS_FLUX) == 61


def merged_key(key: str) -> bool:
    """SuperMerger merges a Flux key when it has a block and names a weight or bias (so the
    RMSNorm ``.scale`` tensors and the VAE keep model A's values)."""
    return block_of(key, "flux") is not None and ("weight" in key or "bias" in key)


def test_mbw_61_values_each_block_its_own_ratio_and_the_vae_is_model_a():
    a, b = flux(1), flux(2)
    vec = [round(0.01 + i / 70, 4) for i in range(61)]
    res = merge(Recipe("a", "b", alpha=0.5, mbw_alpha=vec), a, b).tensors
    assert sum(not merged_key(k) for k in res) == 240 + 4 * 19 + 2 * 38     # VAE, qk-norm scales
    for key, t in res.items():
        blk = block_of(key, "flux")
        if not merged_key(key):
            assert t is a.tensors[key] or torch.equal(t, a.tensors[key]), key
            continue
        want = torch.lerp(a.tensors[key].float(), b.tensors[key].float(), vec[BLOCKS_FLUX.index(blk)])
        assert torch.equal(t, want.to(torch.bfloat16)), key


def test_flux_presets_and_vector_lengths():
    table = presets("flux")
    assert {"ALL_A", "ALL_B", "DOUBLE_ONLY", "SINGLE_ONLY", "GRAD_V"} <= set(table)
    fixed = [n for n, v in table.items() if not any(x in v for x in "RUX")]     # the others are dice templates
    assert len(fixed) >= 10 and all(len(parse_vector(name, "flux")) == 61 for name in fixed)
    v = parse_vector("DOUBLE_ONLY", "flux")
    assert [BLOCKS_FLUX[i] for i, x in enumerate(v) if x == 1] == [f"D{i:02}" for i in range(19)]
    with pytest.raises(MergeError, match="26 values given, 61 needed"):
        parse_vector(",".join(["0.5"] * 26), "flux")


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mode,formula", [
    ("weight_sum", lambda a, b, c, x, y: torch.lerp(a, b, x)),
    ("add_difference", lambda a, b, c, x, y: a + x * (b - c).bfloat16().float()),
    ("triple_sum", lambda a, b, c, x, y: torch.lerp(a, torch.lerp(b, c, y / (x + y)), x + y)),
    ("sum_twice", lambda a, b, c, x, y: torch.lerp(torch.lerp(a, b, x).bfloat16().float(), c, y)),
])
def test_each_mode_on_flux_matches_its_formula(mode, formula):
    a, b, c = flux(1), flux(2), flux(3)
    alpha, beta = 0.3, 0.4
    res = merge(Recipe("a", "b", "c", mode=mode, alpha=alpha, beta=beta), a, b, c).tensors
    worst = 0.0
    for key, t in res.items():
        if not merged_key(key):
            continue
        want = formula(*(m.tensors[key].float() for m in (a, b, c)), alpha, beta).to(torch.bfloat16)
        worst = max(worst, (t.float() - want.float()).abs().max().item())
    assert worst <= 2 ** -7, worst      # one bf16 rounding step at most (values ≈ 1 for norm scales)


def test_every_calcmode_runs_on_flux_and_keeps_a_dtype():
    from merger.engine.calcmodes import ALL_MODES, calcmode_names
    a, b, c = flux(1), flux(2), flux(3)
    for mode in ALL_MODES:
        for cm in calcmode_names(mode):
            res = merge(Recipe("a", "b", "c", mode=mode, calcmode=cm, alpha=0.4, beta=0.3), a, b, c).tensors
            merged = [k for k in res if merged_key(k)]
            assert all(res[k].dtype == torch.bfloat16 and torch.isfinite(res[k].float()).all() for k in merged)
            assert sum(not torch.equal(res[k], a.tensors[k]) for k in merged) > len(merged) // 2, (mode, cm)


def test_each_calcmode_on_flux_is_its_function_applied_key_by_key():
    """Every calcmode without a whole-model pre-pass, on a Flux key, equals the calcmode's own
    function (whose formula tests/test_calcmodes.py checks) called on that key's tensors with
    the key's block ratios: Flux keys go through the same arithmetic as SD's."""
    from merger.engine.calcmodes import ALL_MODES, CalcContext, calcmode_names, get_calcmode
    a, b, c = flux(1), flux(2), flux(3)
    key = PREFIX + "single_blocks.9.linear1.weight"
    vec = [0.2] * 61
    vec[BLOCKS_FLUX.index("S09")] = 0.45
    for mode in ALL_MODES:
        for name in calcmode_names(mode):
            cm = get_calcmode(name)
            if cm.prepare is not None:
                continue
            r = Recipe("a", "b", "c", mode=mode, calcmode=name, alpha=0.3, beta=0.25, mbw_alpha=vec, seed=3)
            got = merge(r, a, b, c).tensors[key]
            want = cm.fn(a.tensors[key], b.tensors[key], c.tensors[key] if r.uses_c() else None, 0.45,
                         r.second_value(), mode=mode, out=None, ctx=CalcContext(key=key, gamma=r.gamma))
            assert torch.equal(got, want.to(got.dtype)), (mode, name)


def test_elemental_and_include_exclude_take_flux_blocks():
    a, b = flux(1), flux(2)
    res = merge(Recipe("a", "b", alpha=0.5, elemental="D03:img_mlp:0.9\nS10::0"), a, b).tensors
    k1, k2, k3 = (PREFIX + k for k in ("double_blocks.3.img_mlp.0.weight", "single_blocks.10.linear1.weight",
                                       "double_blocks.3.txt_mlp.0.weight"))
    assert torch.equal(res[k1], torch.lerp(a.tensors[k1].float(), b.tensors[k1].float(), 0.9).bfloat16())
    assert torch.equal(res[k2], a.tensors[k2])
    assert torch.equal(res[k3], torch.lerp(a.tensors[k3].float(), b.tensors[k3].float(), 0.5).bfloat16())
    only = merge(Recipe("a", "b", alpha=0.5, inex="include", inex_blocks=["T5", "OUT"]), a, b).tensors
    changed = {block_of(k, "flux") for k in only if not torch.equal(only[k], a.tensors[k])}
    assert changed == {"T5", "OUT"}


def test_adjust_is_refused_for_flux():
    with pytest.raises(MergeError, match="Adjust .* Flux"):
        plan_merge(Recipe("a", "b", alpha=0.5, adjust=[1, 0, 0, 0, 0, 0, 0, 0]), flux(1), flux(2))


# ----------------------------------------------------------------------------- float8
def test_fp8_inputs_are_upcast_merged_and_rounded_to_a_dtype():
    a8, b8 = flux(1, E4M3), flux(2, E4M3)
    res = merge(Recipe("a", "b", alpha=0.3), a8, b8).tensors
    key = PREFIX + "single_blocks.7.linear1.weight"
    want = torch.lerp(a8.tensors[key].float(), b8.tensors[key].float(), 0.3).to(E4M3)
    assert res[key].dtype == E4M3 and torch.equal(res[key].view(torch.uint8), want.view(torch.uint8))
    # mixed: float8 A with a bf16 B computes in float32; bf16 A with a float8 B upcasts B exactly
    bb = flux(2, torch.bfloat16)
    mixed = merge(Recipe("a", "b", alpha=0.3), a8, bb).tensors[key]
    assert torch.equal(mixed.view(torch.uint8), torch.lerp(a8.tensors[key].float(), bb.tensors[key].float(),
                                                            0.3).to(E4M3).view(torch.uint8))
    other = merge(Recipe("a", "b", alpha=0.3), bb, flux(1, E5M2)).tensors[key]
    assert other.dtype == torch.bfloat16
    assert torch.equal(other, torch.lerp(bb.tensors[key], flux(1, E5M2).tensors[key].to(torch.bfloat16), 0.3))
    # non-elementwise calcmodes on float8 too
    cos = merge(Recipe("a", "b", calcmode="cosineA", alpha=0.3), a8, b8).tensors[key]
    assert cos.dtype == E4M3 and torch.isfinite(cos.float()).all()


def test_methods_merge_fp8_flux_models_per_block():
    """TIES on float8 Flux models: τ in float32, the result rounded to fp8; the 61-block α vector
    scales λ per block (0 keeps the base)."""
    from merger.engine.methods.ties import disjoint_mean, thresholds
    base, m1, m2 = flux(1, E4M3), flux(2, E4M3), flux(3, E4M3)
    lam = [1.0 if b.startswith("S") else 0.0 for b in BLOCKS_FLUX]
    res = merge(Recipe("a", method="ties", models=["2", "3"], alpha=1.0, mbw_alpha=lam, density=0.5),
                base, models=[m1, m2]).tensors
    single, double = PREFIX + "single_blocks.4.linear2.weight", PREFIX + "double_blocks.4.img_mlp.2.weight"
    assert torch.equal(res[double].float(), base.tensors[double].float())      # (-0 may come back as +0)
    b = base.tensors[single].float()
    taus = torch.stack([m.tensors[single].float() - b for m in (m1, m2)])
    want = (b + disjoint_mean(taus, torch.ones(2), "sum", thresholds(taus, 0.5))).to(E4M3)
    assert res[single].dtype == E4M3 and torch.equal(res[single].float(), want.float())


def test_fp8_results_beyond_the_format_saturate_in_e4m3fn_and_are_reported_in_e5m2():
    """add difference A + (B − C)·α of float8 models, finite in float32 but beyond the format:
    torch's cast to e4m3fn saturates at 448 (as any torch-based merger's result), while e5m2's
    overflows to Inf, which the in-cache check of the rounded chunk reports."""
    key = PREFIX + "double_blocks.2.txt_mlp.2.weight"
    for dtype, (va, vb), want in ((E4M3, (400.0, 200.0), 448.0), (E5M2, (40000.0, 30000.0), None)):
        a8, b8, c8 = flux(1, dtype), flux(2, dtype), flux(3, dtype)
        for ck, v in ((a8, va), (b8, vb), (c8, 0.0)):
            ck.tensors[key] = torch.full_like(ck.tensors[key], v, dtype=torch.float32).to(dtype)
        recipe = Recipe("a", "b", "c", mode="add_difference", alpha=1.0)
        if want is None:
            with pytest.raises(MergeError, match=r"double_blocks\.2\.txt_mlp\.2\.weight"):
                merge(recipe, a8, b8, c8)
        else:
            assert (merge(recipe, a8, b8, c8).tensors[key].float() == want).all()


def test_nan_in_a_fp8_input_is_reported_before_merging():
    a8 = flux(1, E4M3)
    key = PREFIX + "double_blocks.2.txt_mlp.2.weight"
    a8.tensors[key] = a8.tensors[key].clone()
    a8.tensors[key].view(torch.uint8)[0, 0] = 0x7F              # e4m3fn NaN
    with pytest.raises(MergeError, match=r"model A .*NaN/Inf values in .*double_blocks\.2\.txt_mlp\.2\.weight"):
        merge(Recipe("a", "b", alpha=0.5), a8, flux(2, E4M3))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_float8_scan_agrees_with_float32_for_every_bit_pattern(dtype):
    """``finite_top`` reads float8 as bytes: for each of the 256 patterns alone, and for a tensor
    of all of them with the non-finite ones left out, the answer of widening to float32."""
    from merger.engine.tensor_ops import finite_top
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    wide = every.float()
    for i in range(256):
        w = wide[i].item()
        want = (True, abs(w)) if math.isfinite(w) else (False, None)
        got = finite_top(every[i:i + 1].repeat(5))
        assert got[0] == want[0] and (not got[0] or got[1] == want[1]), (i, got, want)
    ok = torch.isfinite(wide)
    for k in (1, 7, 1 << 22):                        # within one chunk, over several
        sample = every[ok].repeat(k // ok.sum().item() + 1)[: max(k, int(ok.sum()))]
        assert finite_top(sample) == (True, sample.float().abs().max().item())
    with_bad = torch.cat([every[ok].repeat(20000), every[~ok][:1]])    # the bad one in the second chunk
    assert finite_top(with_bad)[0] is False
    assert finite_top(every[:0]) == (True, 0.0)


@pytest.mark.parametrize("src", [E4M3, E5M2])
def test_float8_widens_by_table_exactly_as_torch(src, monkeypatch):
    """:mod:`merger.engine.kernels.fp8`: every bit pattern (NaN included) in float32, float16 and
    bfloat16 has torch's bits, on the calling thread and split over the workers, into a new
    tensor or a given buffer; strided views and other dtypes are left to torch."""
    from merger.engine.kernels.fp8 import copy_into, to_dtype, widen
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(src)
    big = every.repeat(1000)                         # over MIN_NUMEL: split between the workers

    def bits(t):
        return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)
    for dst in (torch.float32, torch.float16, torch.bfloat16):
        for x in (every, big):
            got = widen(x, dst)
            assert got is not None and got.dtype == dst and torch.equal(bits(got), bits(x.to(dst)))
        buf = torch.empty(big.numel(), dtype=dst)
        assert copy_into(buf, big) is buf and torch.equal(bits(buf), bits(big.to(dst)))
    assert widen(big[::2], torch.float32) is None            # strided: torch converts it
    assert torch.equal(bits(to_dtype(big[::2], torch.float32)), bits(big[::2].float()))
    assert widen(big.float(), torch.float16) is None
    monkeypatch.setenv("SDMW_COMPILE", "0")                  # every fused kernel off
    assert widen(big, torch.float32) is None


# ----------------------------------------------------------------------------- saving
def test_bare_a_saves_bare_in_the_chosen_dtype_and_all_in_one_keeps_its_parts(tmp_path):
    a = load_checkpoint(write_flux(tmp_path, "a.safetensors", 1, E4M3, bare=True))
    b = load_checkpoint(write_flux(tmp_path, "b.safetensors", 2))
    plan = plan_merge(Recipe("a", "b", alpha=0.4), a, b)
    assert any("has no CLIP-L: the result has none either" in n for n in plan.notes)
    out = st.load_file(str(save_merge(plan, tmp_path / "m.safetensors", SaveOptions())))
    assert set(out) == {strip_prefix(k) for k in a.tensors} and {v.dtype for v in out.values()} == {E4M3}
    out16 = st.load_file(str(save_merge(plan, tmp_path / "m16.safetensors", SaveOptions(dtype="bf16"))))
    key = "double_blocks.0.img_attn.qkv.weight"
    assert out16[key].dtype == torch.bfloat16 and torch.equal(out16[key].to(E4M3).view(torch.uint8),
                                                                out[key].view(torch.uint8))
    # an all-in-one A: its text encoders and VAE stay, pruning keeps them, the transformer is fp8
    aio = load_checkpoint(write_flux(tmp_path, "aio.safetensors", 3))
    plan = plan_merge(Recipe("a", "b", alpha=0.4), aio, b)
    saved = st.load_file(str(save_merge(plan, tmp_path / "aio8.safetensors", SaveOptions(dtype="fp8_e4m3fn",
                                                                                            prune=True))))
    assert set(saved) == set(aio.tensors)
    assert saved[PREFIX + key].dtype == E4M3 and saved["vae.decoder.conv_out.weight"].dtype == torch.bfloat16
    assert torch.equal(saved["vae.decoder.conv_out.weight"], aio.tensors["vae.decoder.conv_out.weight"])


def test_cli_merges_flux_files_with_a_preset_and_dtype(tmp_path, capsys):
    from merger.cli import main
    a = write_flux(tmp_path, "a.safetensors", 1, E4M3, bare=True)
    b = write_flux(tmp_path, "b.safetensors", 2, torch.bfloat16, bare=True)
    rc = main(["merge", "--model-a", str(a), "--model-b", str(b), "--mode", "weight_sum", "--alpha", "0.5",
               "--mbw-alpha", "DOUBLE_ONLY", "--dtype", "bf16", "--output", str(tmp_path / "out.safetensors"),
               "--no-history", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    out = st.load_file(str(tmp_path / "out.safetensors"))
    assert out["single_blocks.3.linear2.weight"].dtype == torch.bfloat16
    assert torch.equal(out["single_blocks.3.linear2.weight"],
                       load_checkpoint(a).tensors[PREFIX + "single_blocks.3.linear2.weight"].to(torch.bfloat16))
    meta = json.loads(st.safe_open(str(tmp_path / "out.safetensors"), "pt").metadata()["sdmw_recipe"])
    assert meta["mbw_alpha"][3] == 1 and meta["mbw_alpha"][22] == 0


def test_a_streamed_fp8_save_loads_in_diffusers_with_equal_weights(tmp_path):
    """diffusers' ``FluxTransformer2DModel.from_single_file`` reads the saved merge; its weights
    equal our merge converted by diffusers' own key map. (Its converter assumes Flux's real
    width, 3072, so this model has real widths and one block of each kind: 0.55 B params.)"""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from merger.files.saving import write_safetensors_stream
    layout = flux_layout("full", all_in_one=False, bare=True, depth=1, depth_single=1)
    pool = torch.empty(1 << 24).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    for name, seed, dtype in (("a.safetensors", 1, torch.bfloat16), ("b.safetensors", 2, E4M3)):
        wide = pool.to(dtype).repeat(5)            # slices of a random pool (fast to make), streamed
        offsets = [(seed * 7919 + i * 104729) % (1 << 23) for i in range(len(layout))]
        assert max(math.prod(s) for s in layout.values()) + (1 << 23) <= wide.numel()
        with open(tmp_path / name, "wb") as f:
            write_safetensors_stream(f, {k: (shape, dtype) for k, shape in layout.items()},
                                     ((k, wide[o:o + math.prod(shape)].reshape(shape))
                                      for o, (k, shape) in zip(offsets, layout.items())))
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "b.safetensors")
    plan = plan_merge(Recipe("a", "b", alpha=0.35, mbw_alpha=[0.35] * 61), a, b)
    out = save_merge(plan, tmp_path / "m.safetensors", SaveOptions(dtype="fp8_e4m3fn"))
    saved = st.load_file(str(out))
    assert set(saved) == set(layout) and {v.dtype for v in saved.values()} == {E4M3}
    for k in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.bias", "final_layer.linear.weight"):
        want = torch.lerp(a.tensors[PREFIX + k].float(), b.tensors[PREFIX + k].float(), 0.35)
        assert torch.equal(saved[k].view(torch.uint8), want.bfloat16().to(E4M3).view(torch.uint8)), k
    config = tmp_path / "cfg"
    with torch.device("meta"):
        meta = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    meta.save_config(config / "transformer")
    model = FluxTransformer2DModel.from_single_file(str(out), config=str(config), subfolder="transformer",
                                                    local_files_only=True, torch_dtype=torch.bfloat16)
    upcast = {k: v.to(torch.bfloat16) for k, v in saved.items()}
    from merger.pipeline.flux_keymap import to_diffusers
    mine = to_diffusers(upcast)                  # before diffusers' converter empties the dict it is given
    want = convert_flux_transformer_checkpoint_to_diffusers(upcast)
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # our own key map (any width) gives diffusers' conversion exactly
    assert set(mine) == set(want) and all(torch.equal(mine[k], want[k]) for k in want)


def test_the_key_map_fills_a_tiny_diffusers_transformer_exactly():
    from diffusers import FluxTransformer2DModel

    from merger.pipeline.flux_keymap import to_diffusers
    t = flux_layout("tiny")
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    sd = {k: v for k, v in random_checkpoint("flux", seed=4).items() if k.startswith(PREFIX)}
    assert len(sd) == len([k for k in t if k.startswith(PREFIX)])
    converted = to_diffusers(sd)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    hd = model.state_dict()
    qkv = sd[PREFIX + "single_blocks.5.linear1.weight"]
    assert torch.equal(hd["single_transformer_blocks.5.attn.to_k.weight"], qkv[32:64])
    assert torch.equal(hd["single_transformer_blocks.5.proj_mlp.weight"], qkv[96:])
    ada = sd[PREFIX + "final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(hd["norm_out.linear.weight"], torch.cat([ada[32:], ada[:32]]))


def test_a_nan_found_while_streaming_a_save_leaves_no_file(tmp_path, monkeypatch):
    """Streamed saves check each key's inputs as they are read (inputs larger than half the RAM
    are read once): a NaN in a late tensor of B is the usual error, and the temp file is removed."""
    from merger.files import saving
    monkeypatch.setattr(saving, "physical_ram", lambda: 1 << 20)       # these inputs exceed half of it
    a = flux(1, E4M3)
    b = flux(2, E4M3)
    key = PREFIX + "single_blocks.30.linear2.weight"
    b.tensors[key] = b.tensors[key].clone()
    b.tensors[key].view(torch.uint8)[3, 3] = 0xFF            # e4m3fn NaN
    plan = plan_merge(Recipe("a", "b", alpha=0.5), a, b)
    with pytest.raises(MergeError, match=r"model B .*NaN/Inf values in .*single_blocks\.30\.linear2\.weight"):
        save_merge(plan, tmp_path / "out.safetensors", SaveOptions())
    assert list(tmp_path.iterdir()) == []


def test_the_app_saves_flux_merges_and_says_clearly_that_it_cannot_generate_them(tmp_path):
    from merger.files.model_dirs import ModelDirs
    from merger.workstation import Workstation
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    dirs.create()
    write_flux(dirs.ckpt, "fa.safetensors", 1, E4M3, bare=True)
    write_flux(dirs.ckpt, "fb.safetensors", 2, E4M3, bare=True)
    ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")
    recipe = ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.5, mbw_alpha=parse_vector("SINGLE_ONLY", "flux"))
    assert "T5 tokenizer" in ws.flux_generation_problem(recipe)
    ws.pipeline.t5_tokenizer = tmp_path          # given: the transformer-only model A is then the reason
    assert "transformer-only Flux file" in ws.flux_generation_problem(recipe)
    with pytest.raises(MergeError, match="transformer-only Flux.1 file"):
        ws.merge(recipe)
    out = ws.save_recipe(recipe, "merged", record=True)      # the Merge tab's Flux path ('save model')
    saved = st.load_file(str(out.path))
    assert out.path.parent == dirs.ckpt and "single_blocks.0.linear1.weight" in saved
    row = ws.history.rows()[-1]
    assert out.history_id == int(row["id"]) and row["model_a"] == "fa.safetensors" and row["source"] == "ui"
    assert f"merged #{out.history_id} into a file" in out.message
    again = ws.save_recipe(ws.history.recipe(out.history_id), "again")      # recall and re-save: same bytes
    resaved = st.load_file(str(again.path))      # read once: per key it read the whole file 781 times (25 s)
    assert resaved.keys() == saved.keys()
    assert all(torch.equal(v.view(torch.uint8), resaved[k].view(torch.uint8)) for k, v in saved.items())
    with pytest.raises(MergeError, match="Flux.1 merge is saved as one .safetensors"):
        from merger.files.diffusers_format import save_diffusers
        save_diffusers(tmp_path / "folder", load_checkpoint(out.path).tensors)
