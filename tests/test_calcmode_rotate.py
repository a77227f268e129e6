"""rotate (sd-mecha's orthogonal alignment) against sd-mecha, the properties that define it, and
as a weight sum calcmode with MBW."""
import logging
from pathlib import Path

import pytest
import torch

import merger.engine.orthogonal as orth
from merger.engine import merge
from merger.engine.calcmodes.rotate import rotate_tensors
from merger.files.checkpoint_io import Checkpoint
from merger.errors import MergeError
from merger.recipe import Recipe
from tests.conftest import tiny

mecha_svd = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.svd")


def mecha_rotate(a, b, alignment, alpha, centralization=1.0):
    logging.disable(logging.WARNING)       # its log_stiefel warns that float32 never reaches 1e-8
    try:
        return mecha_svd.rotate.__wrapped__({"k": a}, {"k": b}, alignment=alignment, centralization=centralization,
                                            alpha=torch.tensor(alpha, dtype=a.dtype), key="k")
    finally:
        logging.disable(logging.NOTSET)


def mecha_limit(a, b, alignment, alpha):
    """sd-mecha's rotate as centralization → 1, where it is defined by its inputs: in float64 at
    c = 1 − 1e-6, within 1e-6 of the limit (for wide matrices, sd-mecha at c = 1 itself returns
    what rounding picks for the direction centring removed)."""
    return mecha_rotate(a.double(), b.double(), alignment, alpha, 1 - 1e-6).to(a.dtype)


def pair(shape, seed, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return a, a + spread * torch.randn(shape, generator=g)


SHAPES = [(12, 5), (5, 12), (8, 8), (4, 3, 3, 3), (6, 4, 1, 1), (7,)]


@pytest.mark.parametrize("alignment,alpha", [(1.0, 0.0), (0.5, 0.0), (0.5, 0.3), (1.0, 1.0), (0.0, 0.4),
                                             (-1.0, 0.0), (2.0, 0.2), (0.25, 1.0), (0.0, 0.0)])
def test_equals_sd_mecha(alignment, alpha):
    for i, shape in enumerate(SHAPES):
        a, b = pair(shape, i)
        limit = mecha_limit(a.double(), b.double(), alignment, alpha)
        torch.testing.assert_close(rotate_tensors(a.double(), b.double(), alignment, alpha, compute=torch.float64),
                                   limit, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rotate_tensors(a, b, alignment, alpha), limit.float(), rtol=1e-3, atol=1e-3)
        if a.dim() < 2 or a.shape[0] > a.shape[1:].numel():      # tall: its c = 1 result is defined
            torch.testing.assert_close(rotate_tensors(a, b, alignment, alpha), mecha_rotate(a, b, alignment, alpha),
                                       rtol=1e-5, atol=2e-5)


def test_a_wide_matrix_like_cross_attention_equals_sd_mecha_with_far_fewer_iterations(monkeypatch):
    a, b = pair((24, 64), 9, spread=0.3)
    logs = []
    real = orth.real_logm
    monkeypatch.setattr(orth, "real_logm", lambda v: logs.append(1) or real(v))
    ours = rotate_tensors(a, b, 0.5, 0.2)
    assert 2 <= len(logs) <= 10                  # stopped at float32's floor, not after 100
    torch.testing.assert_close(ours, mecha_limit(a, b, 0.5, 0.2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 64), (16, 32), (8, 8)])
def test_a_centred_wide_key_turns_the_same_in_float32_and_float64(shape):
    """Centring leaves a wide (or square) matrix one rank short, so one pair of the Procrustes
    frames is not determined by the SVD. sd-mecha keeps what rounding gives there: its float32 and
    float64 results moved by 7–17 % of |B − A|. Completed from the removed means, both
    precisions (as a CPU and a GPU) give the same merge."""
    a, b = pair(shape, 11, spread=0.3)
    res = {}
    for dt in (torch.float32, torch.float64):
        x, y = a.to(dt), b.to(dt)
        ma, mb = x.mean(0), y.mean(0)
        turn = orth.procrustes(x - ma, y - mb, cancel_reflection=True, means=(ma, mb))
        res[dt] = [turn(x - ma, t).double() for t in (1.0, 0.5)]
    scale = float((b - a).abs().max())
    for r32, r64 in zip(res[torch.float32], res[torch.float64]):
        assert float((r32 - r64).abs().max()) < 1e-3 * scale
    shift = rotate_tensors(a, b, 0.5, 0.2).double() - rotate_tensors(a, b, 0.5, 0.2, compute=torch.float64)
    assert float(shift.abs().max()) < 1e-3 * scale


def test_full_alignment_is_the_best_rotation():
    """alignment 1, α 0 on a tall matrix: the centred result is A·Q with Q orthogonal, and no other
    orthogonal Q comes closer to B (Procrustes)."""
    a, b = pair((30, 6), 1, spread=1.0)
    res = rotate_tensors(a, b, 1.0, 0.0)
    ac, bc, rc = a - a.mean(0), b - b.mean(0), res - b.mean(0)
    q = torch.linalg.lstsq(ac, rc).solution
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-4, rtol=0)
    best = float((ac @ q - bc).norm())
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        other, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
        assert best <= float((ac @ other - bc).norm()) + 1e-5
    assert best < float((ac - bc).norm())        # and it does turn A


def test_fractional_powers_compose():
    a, b = pair((20, 5), 3, spread=1.0)
    t = orth.procrustes(a - a.mean(0), b - b.mean(0), cancel_reflection=True)
    half = orth.orthogonal_power(t.q, 0.5)
    torch.testing.assert_close(half @ half, t.q, atol=1e-5, rtol=0)
    torch.testing.assert_close(half.T @ half, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.linalg.det(t.q) > 0              # reflections cancelled for fractional powers
    torch.testing.assert_close(orth.orthogonal_power(t.q, 2.0), t.q @ t.q)
    torch.testing.assert_close(orth.orthogonal_power(t.q, -1.0), t.q.T)


def test_stiefel_log_and_exp_are_inverse():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(u + 0.3 * torch.randn(40, 6, generator=g, dtype=torch.float64))
    delta = orth.log_stiefel(u, v)
    torch.testing.assert_close(orth.exp_stiefel(u, delta), v, atol=1e-7, rtol=0)
    mid = orth.exp_stiefel(u, delta / 2)
    torch.testing.assert_close(mid.T @ mid, torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)   # on the manifold
    # the tangent is skew in the frame: uᵀΔ + Δᵀu = 0
    torch.testing.assert_close(u.T @ delta + delta.T @ u, torch.zeros(6, 6, dtype=torch.float64), atol=1e-7, rtol=0)


def test_ends_and_degenerate_keys():
    a, b = pair((9, 4), 5)
    assert rotate_tensors(a, b, 0.0, 0.0) is a
    full = rotate_tensors(a, b, 1.0, 1.0)
    assert torch.equal(full, b) and full.data_ptr() != b.data_ptr()
    v, w = pair((11,), 6)
    torch.testing.assert_close(rotate_tensors(v, w, 0.7, 0.4), torch.lerp(v, w, 0.4))    # 1-D: lerp by α
    torch.testing.assert_close(rotate_tensors(a, a.clone(), 0.5, 0.5), a)                 # A = B
    half = rotate_tensors(a.half(), b.half(), 0.5, 0.2)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, rotate_tensors(a.half().float(), b.half().float(), 0.5, 0.2).half())


def test_is_a_weight_sum_calcmode_with_mbw():
    A, noise = tiny("sd1", 1), tiny("sd1", 2)
    # B a fine-tune of A, as rotate is used (unrelated random models put every wide key's frames
    # nearly orthogonal, where the Stiefel logarithm converges slowly: 11 s instead of about 1 s)
    B = Checkpoint(Path("b.safetensors"), {k: v + 0.1 * noise.tensors[k] if v.is_floating_point() else v
                                          for k, v in A.tensors.items()})
    vec = [0.5] * 26
    vec[3] = 1.0
    out = merge(Recipe("a", "b", calcmode="rotate", mbw_alpha=vec, beta=0.25), A, B).tensors
    k = "model.diffusion_model.input_blocks.2.1.proj_in.weight"          # IN02: alignment 1
    torch.testing.assert_close(out[k], rotate_tensors(A.tensors[k], B.tensors[k], 1.0, 0.25))
    k2 = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    torch.testing.assert_close(out[k2], rotate_tensors(A.tensors[k2], B.tensors[k2], 0.5, 0.25))
    assert Recipe("a", "b", calcmode="rotate").uses_beta()
    with pytest.raises(MergeError, match="calcmode 'rotate' works only with"):
        merge(Recipe("a", "b", "c", mode="add_difference", calcmode="rotate"), A, B, tiny("sd1", 3))


def test_a_failing_decomposition_is_a_clear_error_naming_the_key(monkeypatch):
    from merger.engine.calcmodes import CalcContext
    from merger.engine.calcmodes.rotate import rotate

    def fail(*a, **k):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned")
    monkeypatch.setattr(torch.linalg, "svd", fail)
    a, b = pair((9, 4), 5)
    with pytest.raises(MergeError, match=r"calcmode rotate failed in some\.key: linalg\.svd: The algorithm failed"):
        rotate(a, b, None, 0.5, 0.0, mode="weight_sum", out=None, ctx=CalcContext(key="some.key"))
