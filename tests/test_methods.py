"""N-model methods: each against sd-mecha (same parameters, fp tolerance) and against a
reference written from its paper, plus the edge cases (all τ zero, ties at the top-k threshold,
p = 0, p → 1, one model) and the engine around them (per-block λ and β, checks, seeds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sd_mecha.extensions.builtin.merge_methods import ties as mecha

from merger.engine import merge
from merger.engine.methods import REGISTRY, MethodArgs, get_method
from merger.engine.methods.ties import kth_smallest, thresholds
from merger.engine.methods.geometric_median import weiszfeld
from merger.engine.methods.model_stock import stock_t
from merger.errors import MergeError
from merger.files.checkpoint_io import Checkpoint
from merger.recipe import Recipe
from merger.synthetic import random_checkpoint


def taus_of(n: int, shape, seed: int = 0, zeros: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn((n, *shape), generator=g)
    if zeros:
        t[torch.rand(t.shape, generator=g) < zeros] = 0
    return t


def run(name: str, taus: torch.Tensor, seed: int | None = None, **kw) -> torch.Tensor:
    m = get_method(name)
    args = MethodArgs(weights=kw.pop("weights", ()), **kw)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return m.fn(taus.clone(), args, gen)


# ---------------------------------------------------------------- references from the papers
def ties_paper(taus: np.ndarray, k: float, weights=None, sign="sum") -> np.ndarray:
    """TIES-Merging Algorithm 1, element by element: trim to top-k by magnitude (sd-mecha's
    threshold rule), elect γ = sgn(Σ τ̂), disjoint mean over agreeing entries."""
    n = taus.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    flat = taus.reshape(n, -1).astype(np.float64)
    trimmed = np.zeros_like(flat)
    for i in range(n):
        kth = max(int((1 - k) * flat.shape[1]), 1)
        thr = np.sort(np.abs(flat[i]))[kth - 1]
        trimmed[i] = np.where(np.abs(flat[i]) >= thr, flat[i], 0)
    out = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        col = trimmed[:, j]
        s = np.sign((w * col).sum()) if sign == "sum" else np.sign(np.sign(col).sum())
        agree = col * s > 0
        out[j] = (w[agree] * col[agree]).sum() / w[agree].sum() if agree.any() else 0.0
    return out.reshape(taus.shape[1:])


def test_kth_smallest_is_kthvalue_exactly():
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(3_000_000, generator=g).abs(),
             torch.randint(0, 5, (2_500_000,), generator=g).float(),           # heavy ties
             torch.where(torch.rand(2_000_000, generator=g) < 0.9, 0.0, 1.0)]  # mostly zeros (after DARE)
    for x in cases:
        for q in (1e-6, 0.1, 0.5, 0.8, 0.999999):
            kth = max(int(q * x.numel()), 1)
            assert kth_smallest(x, kth) == x.kthvalue(kth).values


@pytest.mark.parametrize("sign,vote_sgn", [("count", False), ("sum", True)])
@pytest.mark.parametrize("k", [0.0, 0.2, 0.5, 1.0])
def test_ties_equals_sd_mecha(sign, vote_sgn, k):
    for shape in [(64, 32, 3, 3), (1_100_000,), (5,)]:
        taus = taus_of(4, shape, seed=len(shape))
        ours = run("ties", taus, density=k, sign=sign)
        ref = mecha.ties_sum.__wrapped__(*taus.clone(), k=k, vote_sgn=vote_sgn)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sign", ["sum", "count"])
def test_ties_equals_paper_weighted(sign):
    taus = taus_of(3, (40, 30), seed=3)
    w = (1.0, 0.5, 2.0)
    ours = run("ties", taus, density=0.3, sign=sign, weights=w)
    np.testing.assert_allclose(ours.numpy(), ties_paper(taus.numpy(), 0.3, w, sign), rtol=1e-5, atol=1e-6)


def test_ties_keeps_every_tie_at_the_threshold():
    t = torch.tensor([[0.125, 0.5, 0.5, 0.5, -0.25, 0.0, 0.75, 0.5]])
    assert thresholds(t, 0.5).item() == 0.5          # 4th smallest |x| is 0.5: all four 0.5s stay
    assert run("ties", t, density=0.5).tolist() == [0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.75, 0.5]
    np.testing.assert_allclose(run("ties", t, density=0.5).numpy(), ties_paper(t.numpy(), 0.5), atol=1e-7)


def test_sign_election_sum_and_count_differ_where_they_should():
    # two small positives outvote one large negative by count, not by sum
    taus = torch.tensor([[0.1], [0.1], [-1.0]])
    assert run("ties", taus, density=1.0, sign="count").item() == pytest.approx(0.1)
    assert run("ties", taus, density=1.0, sign="sum").item() == pytest.approx(-1.0)


@pytest.mark.parametrize("name,della_eps", [("dare_ties", 0.0), ("della", 0.15)])
@pytest.mark.parametrize("p,k", [(0.0, 1.0), (0.5, 1.0), (0.9, 0.7)])
def test_dropout_ties_equals_sd_mecha(name, della_eps, p, k):
    taus = taus_of(3, (48, 20), seed=7)
    ours = run(name, taus, seed=1234, drop=p, density=k, sign="count", della_eps=della_eps)
    # sd-mecha 1.1.8 applies Model Stock's t when apply_stock=False (the flag is inverted);
    # apply_stock=True is the plain TIES combination the method describes
    ref = mecha.ties_sum_with_dropout.__wrapped__(*taus.clone(), probability=p, della_eps=della_eps, k=k,
                                                  vote_sgn=False, apply_stock=True, seed=1234)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_dare_linear_equals_paper_and_is_seeded():
    taus = taus_of(3, (30, 20), seed=2)
    p, w = 0.7, (1.0, 0.5, 0.25)
    g = torch.Generator().manual_seed(99)
    masks = [torch.bernoulli(torch.ones(30, 20) - p, generator=g) for _ in range(3)]
    ref = sum(wi * m * t / (1 - p) for wi, m, t in zip(w, masks, taus))
    ours = run("dare_linear", taus, seed=99, drop=p, weights=w)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours, run("dare_linear", taus, seed=99, drop=p, weights=w))
    assert not torch.equal(ours, run("dare_linear", taus, seed=100, drop=p, weights=w))
    kept = (masks[0] != 0).float().mean().item()
    assert 0.2 < kept < 0.4                                  # ≈ 1 − p kept


def test_drop_edge_cases():
    taus = taus_of(2, (20, 10), seed=4)
    torch.testing.assert_close(run("dare_linear", taus, seed=1, drop=0.0), taus.sum(0))
    torch.testing.assert_close(run("dare_ties", taus, seed=1, drop=0.0, density=1.0),
                               run("ties", taus, density=1.0))
    for name in ("dare_linear", "dare_ties", "della"):
        assert not run(name, taus, seed=1, drop=1.0).any()                 # p → 1: the base
        assert torch.isfinite(run(name, taus, seed=1, drop=0.999)).all()


def test_della_keeps_large_magnitudes_more_often():
    taus = torch.linspace(-1, 1, 20001).reshape(1, -1)
    kept = run("della", taus, seed=3, drop=0.5, della_eps=0.9) != 0
    mag = taus[0].abs()
    assert kept[mag > 0.8].float().mean() > kept[mag < 0.2].float().mean() + 0.5


@pytest.mark.parametrize("shape", [(12, 40), (16,), (8, 4, 3, 3)])
def test_model_stock_row_equals_sd_mecha(shape):
    taus = taus_of(3, shape, seed=5) + 0.5        # correlated task vectors: t well away from 0
    ours = run("model_stock", taus, stock="row")
    ref = mecha.model_stock.__wrapped__(*taus.clone())
    torch.testing.assert_close(ours, ref.reshape(ours.shape), rtol=1e-5, atol=1e-6)


def test_model_stock_tensor_equals_paper():
    taus = taus_of(4, (10, 10), seed=6) + 0.3
    flat = taus.reshape(4, -1).double().numpy()
    cos = [flat[i] @ flat[j] / np.linalg.norm(flat[i]) / np.linalg.norm(flat[j])
           for i in range(4) for j in range(i + 1, 4)]
    c = np.mean(cos)
    t = 4 * c / (1 + 3 * c)
    np.testing.assert_allclose(run("model_stock", taus).numpy(), t * flat.mean(0).reshape(10, 10), rtol=1e-5)
    assert stock_t(taus[:1], "tensor").item() == 1.0               # one model: t = 1, result τ₁
    torch.testing.assert_close(run("model_stock", taus[:1]), taus[0])


def test_geometric_median_equals_sd_mecha_and_resists_an_outlier():
    base = taus_of(1, (30, 20), seed=8)[0]
    models = [base + 0.1 * taus_of(1, (30, 20), seed=9 + i)[0] for i in range(4)]
    models.append(base + 50.0)                                          # one wild model
    taus = torch.stack([m - base for m in models])
    ours = base + run("geometric_median", taus)
    ref = mecha.geometric_median.__wrapped__(*[m.clone() for m in models])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - base).abs().mean() < 1.0 < (taus.mean(0)).abs().mean()   # the mean is dragged, the median not


def test_weiszfeld_weights_pull_the_median():
    pts = torch.tensor([[0.0], [1.0], [10.0]])
    assert weiszfeld(pts, torch.tensor([1.0, 1.0, 1.0])).item() == pytest.approx(1.0, abs=1e-3)
    assert weiszfeld(pts, torch.tensor([1.0, 1.0, 5.0])).item() == pytest.approx(10.0, abs=1e-3)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_all_zero_task_vectors_give_zero(name):
    taus = torch.zeros(3, 6, 5)
    assert not run(name, taus, seed=0, drop=0.5, density=0.3).any()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_one_model(name):
    taus = taus_of(1, (9, 7), seed=10)
    out = run(name, taus, seed=0, drop=0.0, density=1.0, della_eps=0.0)
    torch.testing.assert_close(out, taus[0])           # with nothing dropped or trimmed: τ₁ itself


# ---------------------------------------------------------------- the engine around the methods
@pytest.fixture(scope="module")
def four():
    return [Checkpoint(Path(f"m{i}.safetensors"), random_checkpoint("sd1", size="tiny", seed=20 + i,
                                                                  dtype=torch.float16)) for i in range(4)]


def method_recipe(name="ties", **kw) -> Recipe:
    kw.setdefault("models", ["m1.safetensors", "m2.safetensors", "m3.safetensors"])
    return Recipe(model_a="m0.safetensors", method=name, **kw)


IN01 = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
OUT05 = "model.diffusion_model.output_blocks.5.0.in_layers.2.weight"


def expected(name, cks, key, lam, seed=None, **kw):
    base = cks[0].tensors[key]
    taus = torch.stack([c.tensors[key].float() - base.float() for c in cks[1:]])
    return (base.float() + lam * run(name, taus, seed=seed, **kw)).to(base.dtype)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_engine_method_per_block_lambda(four, name):
    mbw = [0.0] * 26
    mbw[2], mbw[19] = 0.7, 1.3                       # IN01 and OUT05 (BASE, IN00-IN11, M00, OUT00…)
    r = method_recipe(name, mbw_alpha=mbw, seed=5)
    res = merge(r, four[0], models=four[1:])
    kw = dict(density=r.density or 1.0, drop=r.drop or 0.0)
    for key, lam in ((IN01, 0.7), (OUT05, 1.3)):
        want = expected(name, four, key, lam, seed=5, **kw)
        if name == "geometric_median":       # the fused path's float64 distances: within an fp16 ulp
            torch.testing.assert_close(res.tensors[key], want, rtol=1e-3, atol=1e-5)
        else:
            assert torch.equal(res.tensors[key], want)
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert torch.equal(res.tensors[key], four[0].tensors[key])      # λ = 0: the base


def test_engine_beta_vector_sets_density_per_block(four):
    beta = [0.2] * 26
    beta[2] = 0.9
    r = method_recipe("ties", mbw_beta=beta)
    res = merge(r, four[0], models=four[1:])
    assert torch.equal(res.tensors[IN01], expected("ties", four, IN01, 0.5, density=0.9))
    assert torch.equal(res.tensors[OUT05], expected("ties", four, OUT05, 0.5, density=0.2))
    bad = method_recipe("ties", mbw_beta=[1.5] * 26)
    with pytest.raises(MergeError, match="density must be between 0 and 1"):
        merge(bad, four[0], models=four[1:])


def test_seed_recorded_and_repeats(four):
    r = method_recipe("dare_ties")
    assert r.seed >= 0 and r.drop == 0.9 and r.density == 1.0        # defaults made concrete
    again = Recipe.from_line(r.to_line())
    a = merge(r, four[0], models=four[1:]).tensors[IN01]
    assert torch.equal(a, merge(again, four[0], models=four[1:]).tensors[IN01])
    other = method_recipe("dare_ties", seed=r.seed + 1)
    assert not torch.equal(a, merge(other, four[0], models=four[1:]).tensors[IN01])


@pytest.mark.parametrize("kw,msg", [
    (dict(models=["m1.safetensors"] * 9), "1 to 8 models"),
    (dict(weights=[1.0]), "3 finite numbers"),
    (dict(density=1.5), "density must be between 0 and 1"),
    (dict(calcmode="cosineA"), "cannot be combined"),
    (dict(sign="vote"), "sign must be one of"),
])
def test_recipe_checks(kw, msg):
    with pytest.raises(MergeError, match=msg):
        method_recipe("ties", **kw).check()
    with pytest.raises(MergeError, match="takes no per-model weights"):
        method_recipe("model_stock", weights=[1, 1, 1]).check()
    with pytest.raises(MergeError, match="unknown method"):
        Recipe(model_a="a", method="nope", models=["b"]).check()


def test_mixed_architectures_refused_before_arithmetic(four):
    xl = Checkpoint(Path("xl.safetensors"), random_checkpoint("sdxl", size="tiny", seed=1, dtype=torch.float16))
    r = Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "xl.safetensors"])
    with pytest.raises(MergeError, match="SD"):
        merge(r, four[0], models=[four[1], xl])


def test_nan_model_refused(four):
    bad = {k: v.clone() for k, v in four[2].tensors.items()}
    bad[IN01][0] = float("nan")
    r = method_recipe("ties")
    with pytest.raises(MergeError, match="model M2 .* NaN"):
        merge(r, four[0], models=[four[1], Checkpoint(Path("bad.safetensors"), bad), four[3]])
