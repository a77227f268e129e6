"""Every merge mode × calcmode pair against values computed by hand (float64 numpy) on small
tensors, plus bit-exactness with SuperMerger's fp16 arithmetic."""
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from merger.engine.calcmodes import REGISTRY, calcmode_names, get_calcmode
from merger.files.checkpoint_io import Checkpoint
from merger.engine import merge
from merger.errors import MergeError
from merger.engine.modes import add_difference, sum_twice, triple_sum, weight_sum
from merger.recipe import MODES, Recipe

KEYS = {  # real LDM names from different blocks; shapes small
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (6, 5),
    "model.diffusion_model.output_blocks.3.0.in_layers.2.weight": (4, 3, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight": (5, 5),
    "model.diffusion_model.out.2.bias": (4,),
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (7, 3),
    "first_stage_model.decoder.conv_in.weight": (3, 4, 3, 3),
}


def sd(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in KEYS.items()}


def ck(seed, dtype=torch.float32):
    return Checkpoint(Path(f"m{seed}.safetensors"), sd(seed, dtype))


def run(mode, calcmode, alpha=0.3, beta=0.2, **kw):
    A, B, C = ck(1), ck(2), ck(3)
    r = Recipe("m1", "m2", "m3", mode=mode, calcmode=calcmode, alpha=alpha, beta=beta, **kw)
    return A, B, C, merge(r, A, B, C).tensors


def np64(t):
    return t.double().numpy()


# ----------------------------------------------------------------- normal, all four modes
@pytest.mark.parametrize("mode,formula", [
    ("weight_sum", lambda a, b, c, x, y: (1 - x) * a + x * b),
    ("add_difference", lambda a, b, c, x, y: a + x * (b - c)),
    ("triple_sum", lambda a, b, c, x, y: (1 - x - y) * a + x * b + y * c),
    ("sum_twice", lambda a, b, c, x, y: (1 - y) * ((1 - x) * a + x * b) + y * c),
])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.2), (0.75, -0.4), (1.3, 0.5), (0.5, -0.5)])
def test_normal_modes_match_formula(mode, formula, alpha, beta):
    A, B, C, out = run(mode, "normal", alpha, beta)
    for k in KEYS:
        want = formula(np64(A.tensors[k]), np64(B.tensors[k]), np64(C.tensors[k]), alpha, beta)
        np.testing.assert_allclose(np64(out[k]), want, rtol=1e-5, atol=1e-5, err_msg=k)


def test_weight_sum_endpoints_return_inputs():
    a, b = torch.randn(10), torch.randn(10)
    assert weight_sum(a, b, 0.0) is a
    assert weight_sum(a, b, 1.0) is b


def test_fp16_bit_identical_to_supermerger_expressions():
    """SuperMerger: weight sum lerp(A32,B32,α).half(); add difference A + α·(B-C)_fp16 in fp16;
    triple sum lerp(A, lerp(B, C, β/(α+β)), α+β) in fp16; sum twice nested fp32 lerps."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(300_000, generator=g).half() for _ in range(3))
    al, be = 0.37, 0.21
    assert torch.equal(weight_sum(a, b, al), torch.lerp(a.float(), b.float(), al).half())
    diff = (b.float() - c.float()).half()
    assert torch.equal(add_difference(a, b, c, al), a + al * diff)
    inner = torch.lerp(b, c, be / (al + be))
    assert torch.equal(triple_sum(a, b, c, al, be), torch.lerp(a, inner, al + be))
    ref = torch.lerp(torch.lerp(a.float(), b.float(), al), c.float(), be).half()
    assert torch.equal(sum_twice(a, b, c, al, be), ref)
    # and the chunked path really is chunked for these sizes
    assert a.numel() > 1 << 18


# ----------------------------------------------------------------- cosineA / cosineB
def _expected_cosine(A, B, alpha, normalize_first):
    def norm0(x):
        n = np.sqrt((x ** 2).sum(axis=0, keepdims=True))
        return x / np.maximum(n, 1e-12)

    def cos0(x, y):
        return (x * y).sum(0) / np.maximum(np.sqrt((x ** 2).sum(0) * (y ** 2).sum(0)), 1e-8)

    def combined(x, y):
        if normalize_first:
            x, y = norm0(x), norm0(y)
        return (cos0(x, y) + (x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y))) / 2

    sims = []
    for k in KEYS:
        if "first_stage_model" in k:
            continue
        a, b = np64(A[k]), np64(B[k])
        s = cos0(norm0(a), norm0(b)) if normalize_first else combined(a, b)
        sims.append(np.ravel(s))
    s = np.concatenate(sims)
    s = s[s >= np.percentile(s, 1, method="midpoint")]
    s = s[s <= np.percentile(s, 99, method="midpoint")]
    lo, hi = s.min(), s.max()
    out = {}
    for k in KEYS:
        a, b = np64(A[k]), np64(B[k])
        if "first_stage_model" in k:
            out[k] = a
            continue
        kk = np.clip((combined(a, b) - lo) / (hi - lo) - (abs(alpha) if normalize_first else alpha), 0, 1)
        out[k] = b + kk * (a - b)
    return out


@pytest.mark.parametrize("calc,normalize", [("cosineA", True), ("cosineB", False)])
def test_cosine_modes(calc, normalize):
    A, B, C, out = run("weight_sum", calc, alpha=0.2)
    want = _expected_cosine(A.tensors, B.tensors, 0.2, normalize)
    for k in KEYS:
        np.testing.assert_allclose(np64(out[k]), want[k], rtol=1e-4, atol=1e-4, err_msg=k)
    assert torch.equal(out["first_stage_model.decoder.conv_in.weight"],
                       A.tensors["first_stage_model.decoder.conv_in.weight"])


# ----------------------------------------------------------------- add-difference family
def test_train_difference():
    A, B, C, out = run("add_difference", "trainDifference", alpha=0.6)
    for k in KEYS:
        a, b, c = np64(A.tensors[k]), np64(B.tensors[k]), np64(C.tensors[k])
        dbc, dba = np.abs(b - c), np.abs(b - a)
        scale = np.where(dbc + dba != 0, dba / np.where(dbc + dba == 0, 1, dbc + dba), 0)
        want = a + np.sign(b - c) * scale * dbc * 0.6 * 1.8
        np.testing.assert_allclose(np64(out[k]), want, rtol=1e-5, atol=1e-5)


def test_train_difference_keeps_a_where_b_equals_c():
    A, B = ck(1), ck(2)
    r = Recipe("a", "b", "c", mode="add_difference", calcmode="trainDifference", alpha=1)
    out = merge(r, A, B, B).tensors
    assert all(torch.equal(out[k], A.tensors[k]) for k in KEYS)


@pytest.mark.parametrize("calc", ["smoothAdd", "smoothAddMT"])
def test_smooth_add_filters_the_difference(calc):
    shape = (5, 6)
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    a = torch.zeros(shape)
    const = torch.full(shape, 0.5)
    spike = torch.zeros(shape)
    spike[2, 3] = 10.0
    rand = torch.randn(shape)
    r = Recipe("a", "b", "c", mode="add_difference", calcmode=calc, alpha=0.8)
    mk = lambda t: Checkpoint(Path("x.safetensors"), {k: t})  # noqa: E731
    # a constant difference survives both filters: A + α·d
    out = merge(r, mk(a), mk(const), mk(torch.zeros(shape))).tensors[k]
    torch.testing.assert_close(out, torch.full(shape, 0.4))
    # a lone spike is removed by the median filter: A unchanged
    out = merge(r, mk(a), mk(spike), mk(torch.zeros(shape))).tensors[k]
    assert out.abs().max() < 1e-6
    # general case equals median(3) then gaussian(σ=1) of B-C
    out = merge(r, mk(a), mk(rand), mk(torch.zeros(shape))).tensors[k]
    want = 0.8 * scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(rand.numpy(), size=3), sigma=1)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha,beta,gamma", [(0.0, 0.0, 1.0), (0.3, 0.7, 2.0), (1.0, 0.5, 0.5)])
def test_extract(alpha, beta, gamma):
    A, B, C, out = run("add_difference", "extract", alpha=alpha, beta=beta, gamma=gamma)
    for k in KEYS:
        base, x, y = np64(A.tensors[k]), np64(B.tensors[k]) - np64(A.tensors[k]), np64(C.tensors[k]) - np64(A.tensors[k])
        c = (x * y).sum(-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-8)
        d = ((np.clip(c, -1, 1)[..., None] + 1) / 2) ** gamma
        want = base + (x + alpha * (y - x)) * (d + beta * (1 - 2 * d))
        np.testing.assert_allclose(np64(out[k]), want, rtol=1e-4, atol=1e-5, err_msg=k)


def test_extract_rejects_out_of_range_ratios():
    with pytest.raises(MergeError, match="extract"):
        run("add_difference", "extract", alpha=1.5, beta=0.2)


# ----------------------------------------------------------------- tensor / tensor2 / self
def _tensor_case(calc, shape, alpha, beta):
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    a, b = torch.zeros(shape), torch.ones(shape)
    r = Recipe("a", "b", mode="weight_sum", calcmode=calc, alpha=alpha, beta=beta)
    return merge(r, Checkpoint(Path("a"), {k: a}), Checkpoint(Path("b"), {k: b})).tensors[k]


def test_tensor_rows():
    out = _tensor_case("tensor", (10, 4), 0.3, 0.2)   # rows [2, 5) from B
    assert out[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    out = _tensor_case("tensor", (10, 4), 0.75, 0.5)  # α+β>1: B with rows [⌊2.5⌋, 5) from A
    assert out[:, 0].tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 1, 1]


def test_tensor2_columns():
    out = _tensor_case("tensor2", (3, 200), 0.25, 0.5)  # axis 1 > 100: columns [100, 150)
    assert out[0].nonzero().flatten().tolist() == list(range(100, 150))
    out = _tensor_case("tensor2", (10, 8), 0.3, 0.2)    # axis 1 ≤ 100: bounds from axis 0 (2, 5)
    assert out[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    out = _tensor_case("tensor2", (10,), 0.3, 0.2)      # 1-D: like tensor
    assert out.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]


def test_self_scales_a_except_norm_and_out_layers():
    A = ck(1)
    r = Recipe("a", mode="weight_sum", calcmode="self", alpha=0.5)
    out = merge(r, A).tensors
    for k in KEYS:
        if any(s in k for s in ("to_out", "proj_out", "norm")):
            assert torch.equal(out[k], A.tensors[k])
        else:
            torch.testing.assert_close(out[k], A.tensors[k] * 0.5)
    out0 = merge(Recipe("a", calcmode="self", alpha=0.0), A).tensors
    assert all(torch.equal(out0[k], A.tensors[k]) for k in KEYS)


# ----------------------------------------------------------------- the compatibility table
VALID = {
    "normal": set(MODES), "cosineA": {"weight_sum"}, "cosineB": {"weight_sum"},
    "trainDifference": {"add_difference"}, "smoothAdd": {"add_difference"},
    "smoothAddMT": {"add_difference"}, "extract": {"add_difference"},
    "tensor": {"weight_sum"}, "tensor2": {"weight_sum"}, "self": {"weight_sum"},
    "slerp": {"weight_sum"}, "perpendicular": {"add_difference"}, "rotate": {"weight_sum"},
}


def test_registry_has_exactly_the_spec_calcmodes():
    assert set(calcmode_names()) == set(VALID)
    assert calcmode_names()[0] == "normal"
    assert get_calcmode("smoothAdd MT") is REGISTRY["smoothAddMT"]
    for name in VALID:
        assert get_calcmode(name).reference


@pytest.mark.parametrize("calc", sorted(VALID))
@pytest.mark.parametrize("mode", MODES)
def test_every_pair_valid_or_clear_error(calc, mode):
    if mode in VALID[calc]:
        A, B, C, out = run(mode, calc, alpha=0.4, beta=0.3)
        assert set(out) == set(KEYS)
        assert all(out[k].dtype == A.tensors[k].dtype and out[k].shape == A.tensors[k].shape for k in KEYS)
    else:
        with pytest.raises(MergeError, match=f"calcmode '{calc}' works only with"):
            run(mode, calc)
