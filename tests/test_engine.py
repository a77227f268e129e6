"""MBW, elemental, include/exclude, adjust, key handling and recipes on tiny real-layout models."""
import re

import pytest
import torch

from merger.engine.adjust import ADJUST_KEYS
from merger.blocks import block_ids, block_of
from merger.engine import iter_merge, merge, plan_merge
from merger.errors import MergeError, MergeStopped
from merger.presets import parse_vector
from merger.recipe import Recipe
from tests.conftest import tiny


def lerp_ok(out, a, b, alpha):
    torch.testing.assert_close(out, torch.lerp(a, b, alpha), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_mbw_uses_each_blocks_ratio(arch):
    A, B = tiny(arch, 1), tiny(arch, 2)
    ids = block_ids(arch)
    vec = [round(0.01 + i / 40, 4) for i in range(len(ids))]
    out = merge(Recipe("a", "b", mbw_alpha=vec, alpha=0.9), A, B).tensors
    seen = set()
    for k, a in A.tensors.items():
        if not a.is_floating_point() or "model" not in k or not ("weight" in k or "bias" in k):
            assert torch.equal(out[k], a)
            continue
        blk = block_of(k, arch)
        seen.add(blk)
        lerp_ok(out[k], a, B.tensors[k], vec[ids.index(blk)])
    assert seen == set(ids)  # tiny models have every block


def test_sd_vector_on_sdxl_is_reduced_like_supermerger():
    A, B = tiny("sdxl", 1), tiny("sdxl", 2)
    vec26 = [i / 100 for i in range(26)]
    r = Recipe("a", "b", mbw_alpha=vec26)
    out = merge(r, A, B).tensors
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    lerp_ok(out[k], A.tensors[k], B.tensors[k], 0.13)  # M00 is index 13 of the 26
    k = "model.diffusion_model.output_blocks.8.0.in_layers.2.weight"
    lerp_ok(out[k], A.tensors[k], B.tensors[k], 0.22)  # OUT08


def test_mbw_wrong_length_is_clear():
    with pytest.raises(MergeError, match="20 needed"):
        merge(Recipe("a", "b", mbw_alpha=[0.5] * 25), tiny("sdxl", 1), tiny("sdxl", 2))
    with pytest.raises(MergeError, match="26 needed"):
        merge(Recipe("a", "b", mbw_alpha=[0.5] * 20), tiny("sd1", 1), tiny("sd1", 2))


def test_mbw_beta_in_triple_sum():
    A, B, C = tiny("sd1", 1), tiny("sd1", 2), tiny("sd1", 3)
    va = parse_vector("GRAD_V", "sd1")
    vb = parse_vector("FLAT_25", "sd1")
    out = merge(Recipe("a", "b", "c", mode="triple_sum", mbw_alpha=va, mbw_beta=vb), A, B, C).tensors
    k = "model.diffusion_model.output_blocks.5.1.proj_out.weight"
    x, y = va[block_ids("sd1").index("OUT05")], 0.25
    want = (1 - x - y) * A.tensors[k] + x * B.tensors[k] + y * C.tensors[k]
    torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


def _ratio_of(out, A, B, k):
    """Recover α from a weight-sum result."""
    d = (B.tensors[k] - A.tensors[k]).flatten()
    i = d.abs().argmax()
    return round(((out[k].flatten()[i] - A.tensors[k].flatten()[i]) / d[i]).item(), 3)


def test_elemental_rules_from_the_spec():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    text = "OUT06:attn:0.5,OUT06:attn2.to_k:0.2\nNOT OUT04 OUT06:attn1:1, OUT05:NOT attn proj:0.3"
    out = merge(Recipe("a", "b", alpha=0.0, elemental=text), A, B).tensors
    p = "model.diffusion_model.output_blocks."
    assert _ratio_of(out, A, B, p + "6.1.transformer_blocks.0.attn2.to_q.weight") == 0.5
    assert _ratio_of(out, A, B, p + "6.1.transformer_blocks.0.attn2.to_k.weight") == 0.2
    assert _ratio_of(out, A, B, p + "6.1.transformer_blocks.0.attn1.to_q.weight") == 0.5
    assert _ratio_of(out, A, B, p + "3.1.transformer_blocks.0.attn1.to_q.weight") == 1.0   # NOT OUT04 OUT06
    assert torch.equal(out[p + "4.1.transformer_blocks.0.attn1.to_q.weight"],
                       A.tensors[p + "4.1.transformer_blocks.0.attn1.to_q.weight"])
    assert _ratio_of(out, A, B, p + "5.0.in_layers.2.weight") == 0.3                       # not attn/proj
    assert torch.equal(out[p + "5.1.proj_in.weight"], A.tensors[p + "5.1.proj_in.weight"])


def test_elemental_errors():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    with pytest.raises(MergeError, match="blocks:elements:ratio"):
        merge(Recipe("a", "b", elemental="OUT06:0.5"), A, B)
    with pytest.raises(MergeError, match="unknown block"):
        merge(Recipe("a", "b", elemental="OUT66::0.5"), A, B)


def test_include_and_exclude():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    o5 = "model.diffusion_model.output_blocks.5.1.proj_in.weight"
    o3 = "model.diffusion_model.output_blocks.3.0.in_layers.2.weight"
    vae = "first_stage_model.decoder.conv_in.weight"
    out = merge(Recipe("a", "b", alpha=1.0, inex="exclude", inex_blocks=["BASE"], inex_elements=["proj_in"]), A, B).tensors
    assert torch.equal(out[te], A.tensors[te]) and torch.equal(out[o5], A.tensors[o5])
    assert torch.equal(out[o3], B.tensors[o3])
    out = merge(Recipe("a", "b", alpha=1.0, inex="include", inex_blocks=["OUT03", "VAE"]), A, B).tensors
    assert torch.equal(out[o3], B.tensors[o3]) and torch.equal(out[vae], B.tensors[vae])
    assert torch.equal(out[o5], A.tensors[o5])


def test_adjust_vector():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    adj = [1, 2, 3, 4, 5, 6, 7, 8]
    out = merge(Recipe("a", "b", alpha=0.5, adjust=adj), A, B).tensors
    base = merge(Recipe("a", "b", alpha=0.5), A, B).tensors
    w_in, b_in, w_o0, b_o0, w_o2, b_o2 = ADJUST_KEYS
    torch.testing.assert_close(out[w_in], base[w_in] * (1 - 0.01))
    torch.testing.assert_close(out[b_in], base[b_in] * (1 + 0.02))
    torch.testing.assert_close(out[w_o0], base[w_o0] * (1 - 0.02))
    torch.testing.assert_close(out[b_o0], base[b_o0] * (1 + 0.04))
    torch.testing.assert_close(out[w_o2], base[w_o2] * (1 - 0.03))
    # COLS: [-1,1/3,2/3],[1,1,0],[0,-1,-1],[1,0,1] weighted by 0.02·(5,6,7,8)
    col = [0.02 * (-5 + 6 + 8), 0.02 * (5 / 3 + 6 - 7), 0.02 * (10 / 3 - 7 + 8)]
    torch.testing.assert_close(out[b_o2], base[b_o2] + torch.tensor([0.08] + col))


def test_inpainting_a_merges_common_channels():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    A.tensors[k] = torch.randn(A.tensors[k].shape[0], 9, 3, 3)
    out = merge(Recipe("a", "b", alpha=0.5), A, B).tensors
    lerp_ok(out[k][:, :4], A.tensors[k][:, :4].contiguous(), B.tensors[k], 0.5)
    assert torch.equal(out[k][:, 4:], A.tensors[k][:, 4:])
    with pytest.raises(MergeError, match="must be model A"):
        merge(Recipe("a", "b"), B, A)


def test_shape_mismatch_is_clear():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    k = "model.diffusion_model.out.2.weight"
    B.tensors[k] = torch.randn(5, 8, 3, 3)
    with pytest.raises(MergeError, match="shape mismatch for model.diffusion_model.out.2.weight"):
        plan_merge(Recipe("a", "b"), A, B)


def test_mixed_architectures_name_both_files():
    with pytest.raises(MergeError, match=r"sd1_1.safetensors is SD 1.x, sdxl_2.safetensors is SDXL"):
        merge(Recipe("a", "b"), tiny("sd1", 1), tiny("sdxl", 2))


def test_key_handling_like_supermerger():
    """Keys outside the model components follow SuperMerger: A's are kept, B's extra ones with
    "model" in the name are added, position_ids are never merged."""
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    only_b = "model_ema.only_in_b"
    B.tensors[only_b] = torch.ones(2)
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    B.tensors[pid] = torch.arange(77)[None] * 0
    del A.tensors["model_ema.decay"]
    plan = merge(Recipe("a", "b", alpha=0.5), A, B)
    out = plan.tensors
    assert torch.equal(out[only_b], B.tensors[only_b])          # added from B
    assert torch.equal(out[pid], A.tensors[pid])                # never merged
    assert torch.equal(out["alphas_cumprod"], A.tensors["alphas_cumprod"])  # no "model" in name
    assert list(out)[: len(A.tensors)] == list(A.tensors)
    assert plan.plan.notes == []


def test_a_partial_component_is_refused_naming_the_keys():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    gone = "model.diffusion_model.output_blocks.2.0.out_layers.3.weight"
    del B.tensors[gone]
    with pytest.raises(MergeError, match=r"model B \(sd1_2.safetensors\) lacks 1 U-Net tensor\(s\) that model A "
                                         r"has \(" + re.escape(gone)):
        merge(Recipe("a", "b", alpha=0.5), A, B)
    A.tensors["model.diffusion_model.only_in_a.weight"] = torch.ones(3)
    del A.tensors["model.diffusion_model.out.0.bias"]
    with pytest.raises(MergeError, match="model A .* lacks 1 U-Net tensor"):
        merge(Recipe("a", "b", alpha=0.5), A, tiny("sd1", 3))


def test_what_a_plan_keeps_with_the_models_follows_their_tensors(monkeypatch):
    """The architecture and key coverage are kept with the checkpoints between plans (an XYZ
    cell or search trial re-plans the same models), and made again once a tensor is added,
    removed or replaced: a key deleted after a good plan is still refused."""
    import merger.engine.plan as plan_mod
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    calls = []
    real = plan_mod.check_coverage
    monkeypatch.setattr(plan_mod, "check_coverage", lambda *a: calls.append(1) or real(*a))
    for alpha in (0.2, 0.4, 0.6):
        plan_merge(Recipe("a", "b", alpha=alpha), A, B)
    assert len(calls) == 1
    gone = "model.diffusion_model.output_blocks.2.0.out_layers.3.weight"
    kept = B.tensors.pop(gone)
    with pytest.raises(MergeError, match="model B .* lacks 1 U-Net tensor"):
        plan_merge(Recipe("a", "b", alpha=0.5), A, B)
    B.tensors[gone] = kept.to(torch.int32)                  # replaced: a float/integer clash now
    with pytest.raises(MergeError, match="as torch.int32"):
        plan_merge(Recipe("a", "b", alpha=0.5), A, B)
    B.tensors[gone] = kept
    plan_merge(Recipe("a", "b", alpha=0.5), A, B)
    A.tensors["model.diffusion_model.double_blocks.0.x.weight"] = torch.ones(2)   # A now reads as Flux
    with pytest.raises(MergeError, match="cannot merge different architectures: .* is Flux.1"):
        plan_merge(Recipe("a", "b", alpha=0.5), A, B)


@pytest.mark.parametrize("lacking", ["A", "B", "C"])
def test_a_missing_vae_is_merged_around_and_reported(lacking):
    models = {s: tiny("sd1", i + 1) for i, s in enumerate("ABC")}
    vae = [k for k in models["A"].tensors if k.startswith("first_stage_model.")]
    for k in vae:
        del models[lacking].tensors[k]
    res = merge(Recipe("a", "b", "c", mode="add_difference", alpha=0.5), models["A"], models["B"], models["C"])
    source = "B" if lacking == "A" else "A"
    assert res.plan.notes == [f"model {lacking} ({models[lacking].name}) has no VAE: model {source}'s VAE is "
                              f"used as it is (not merged)"]
    for k in vae:
        assert torch.equal(res.tensors[k], models[source].tensors[k])
    unet = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    a, b, c = (models[s].tensors[unet] for s in "ABC")
    assert torch.allclose(res.tensors[unet], a + 0.5 * (b - c))


def test_float_and_integer_versions_of_one_tensor_are_refused():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    k = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    B.tensors[k] = torch.zeros(B.tensors[k].shape, dtype=torch.int16)
    with pytest.raises(MergeError, match=r"model B \(sd1_2.safetensors\) has " + re.escape(k) + " as torch.int16"):
        merge(Recipe("a", "b", alpha=0.5), A, B)


def test_dtypes_follow_a():
    A, B = tiny("sd1", 1, dtype=torch.float16), tiny("sd1", 2, dtype=torch.float32)
    out = merge(Recipe("a", "b", alpha=0.3), A, B).tensors
    k = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    assert out[k].dtype == torch.float16
    assert torch.equal(out[k], torch.lerp(A.tensors[k], B.tensors[k].half(), 0.3))


def test_nan_in_input_is_reported():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    k = "model.diffusion_model.output_blocks.2.0.out_layers.3.weight"
    B.tensors[k] = B.tensors[k].clone()
    B.tensors[k][0, 0, 0, 0] = float("nan")
    with pytest.raises(MergeError, match=r"model B \(sd1_2.safetensors\) contains NaN/Inf values in " + k):
        merge(Recipe("a", "b", alpha=0.5), A, B)


def test_stop_raises_and_kept_tensors_are_shared_not_copied():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    calls = []
    with pytest.raises(MergeStopped):
        for _ in iter_merge(plan_merge(Recipe("a", "b"), A, B), should_stop=lambda: len(calls) > 5 or calls.append(1)):
            pass
    out = merge(Recipe("a", "b", alpha=0.0), A, B).tensors
    assert all(out[k] is A.tensors[k] for k in A.tensors)


def test_out_buffers_receive_every_value():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    bufs = {k: torch.full_like(v, 7) for k, v in A.tensors.items()}
    ref = merge(Recipe("a", "b", alpha=0.4), A, B).tensors
    for k, v in iter_merge(plan_merge(Recipe("a", "b", alpha=0.4), A, B), out_for=lambda k, like: bufs.get(k)):
        assert v is bufs[k]
    assert all(torch.equal(bufs[k], ref[k]) for k in bufs)


def test_recipe_line_round_trip_and_bit_identical_reruns():
    A, B, C = tiny("sd1", 1), tiny("sd1", 2), tiny("sd1", 3)
    r = Recipe("a.safetensors", "b.safetensors", "c.safetensors", hash_a="0123456789", mode="sum_twice",
               alpha=0.3, beta=0.6, mbw_alpha=parse_vector("GRAD_A", "sd1"), elemental="OUT05::0.1",
               inex="exclude", inex_blocks=["IN00"], inex_elements=["norm"], adjust=[0, 1, 0, 0, 0, 0, 0, 2],
               seed=1234)
    line = r.to_line()
    assert "\n" not in line and Recipe.from_line(line) == r
    o1 = merge(Recipe.from_line(line), A, B, C).tensors
    o2 = merge(Recipe.from_line(line), A, B, C).tensors
    assert all(torch.equal(o1[k], o2[k]) for k in o1)


@pytest.mark.parametrize("line,msg", [
    ("{", "not a recipe"), ('{"model_a":"a","bogus":1}', "unknown fields"),
    ('{"model_a":"a","mode":"blend"}', "unknown merge mode"),
    ('{"model_a":"a","model_b":"b","calcmode":"cosineA","mode":"add_difference","model_c":"c"}', "works only with"),
    ('{"model_a":"a","model_b":"b","mode":"add_difference"}', "needs model C"),
    ('{"model_a":"a","model_b":"b","adjust":[1,2]}', "8 values"),
])
def test_bad_recipe_lines(line, msg):
    with pytest.raises(MergeError, match=msg):
        Recipe.from_line(line)
