"""The geometric median's fused CPU path (merger/engine/kernels/median.py): Weiszfeld's iterations
one pass over the inputs each. It agrees with a float64 Weiszfeld written from the paper and with
the eager (sd-mecha's) path to the tolerance their float32 distances allow, keeps its final
weights for a merge with another λ, and steps aside where it does not apply."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from merger.engine import kernels, merge
from merger.engine.kernels import median
from merger.engine.methods import MethodArgs, get_method
from merger.files.checkpoint_io import Checkpoint
from merger.recipe import Recipe


def inputs(n=300_003, models=4, dtype=torch.float16):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g) * 0.05
    ms = [base + torch.randn(n, generator=g) * 0.01 for _ in range(models - 1)]
    ms.append(base + 0.5)                                     # an outlier the median resists
    return base.to(dtype), [m.to(dtype) for m in ms]


def weiszfeld64(taus: np.ndarray, w: np.ndarray, eps=1e-6, iters=500) -> np.ndarray:
    """Weiszfeld (1937) in float64 until it stops moving: m ← Σ βᵢpᵢ/Σβᵢ, βᵢ = wᵢ/‖pᵢ − m‖."""
    m = (w[:, None] * taus).sum(0) / w.sum()
    for _ in range(iters):
        beta = w / np.maximum(np.linalg.norm(taus - m, axis=1), eps)
        new = (beta[:, None] * taus).sum(0) / beta.sum()
        if np.abs(new - m).max() < 1e-12:
            break
        m = new
    return m


@pytest.mark.parametrize("weights", [(), (1.0, 2.0, 0.5, 1.0)])
def test_fused_median_is_weiszfelds(weights):
    base, ms = inputs()
    args = MethodArgs(weights=weights)
    out = get_method("geometric_median").fused(base, ms, 1.0, args, torch.float32)
    assert out is not None
    taus = np.stack([(m.float() - base.float()).double().numpy() for m in ms])
    want = weiszfeld64(taus, args.weight_tensor(4).double().numpy()) + base.double().numpy()
    scale = np.abs(taus).mean()
    assert np.abs(out.double().numpy() - want).max() < 1e-3 * scale
    assert np.abs(out.double().numpy() - base.double().numpy()).mean() < 0.1      # not dragged to 0.5/4


def test_fused_median_equals_the_eager_path_and_keeps_its_weights(monkeypatch):
    base, ms = inputs()
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    cks = [Checkpoint(Path(f"m{i}.safetensors"), {key: t.reshape(-1, 3)}) for i, t in enumerate([base, *ms])]
    recipe = Recipe(model_a="m0.safetensors", method="geometric_median",
                    models=[f"m{i}.safetensors" for i in range(1, 5)], alpha=0.7)
    fused = merge(recipe, cks[0], models=cks[1:]).tensors[key]
    monkeypatch.setenv("SDMW_COMPILE", "0")
    eager = merge(recipe, cks[0], models=cks[1:]).tensors[key]
    monkeypatch.delenv("SDMW_COMPILE")
    # eager's float32 distances (as sd-mecha's) drift from the fused float64 sums: an fp16 ulp here
    torch.testing.assert_close(fused.float(), eager.float(), rtol=0, atol=3e-4)
    # the final weights depend on the models only: another λ reuses them (no distance pass)
    m = get_method("geometric_median")
    memo = {}
    first = m.fused(base, ms, 0.7, MethodArgs(weights=()), torch.float32, memo)
    calls = []
    real = median.distances
    monkeypatch.setattr(median, "distances", lambda *a: calls.append(1) or real(*a))
    again = m.fused(base, ms, 0.3, MethodArgs(weights=()), torch.float32, memo)
    assert not calls
    fresh = m.fused(base, ms, 0.3, MethodArgs(weights=()), torch.float32, None)
    assert len(calls) >= 2 and torch.equal(again, fresh) and not torch.equal(again, first)


def test_fused_median_steps_aside(monkeypatch):
    base, ms = inputs(n=1000)
    m = get_method("geometric_median")
    assert m.fused(base, ms, 1.0, MethodArgs(weights=(1.0, -1.0, 1.0, 1.0)), torch.float16) is None
    assert m.fused(base, [ms[0].float(), ms[1]], 1.0, MethodArgs(weights=()), torch.float16) is None
    monkeypatch.setenv("SDMW_COMPILE", "0")
    assert m.fused(base, ms, 1.0, MethodArgs(weights=()), torch.float16) is None
    monkeypatch.delenv("SDMW_COMPILE")
    from numba.core.errors import LoweringError
    monkeypatch.setattr(kernels, "_broken", [])

    def fail(*a):
        raise LoweringError("no")
    monkeypatch.setattr(median, "_distances", fail)
    assert m.fused(base, ms, 1.0, MethodArgs(weights=()), torch.float16) is None
    assert not kernels.available()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_model_stock_equals_the_eager_path(dtype, monkeypatch):
    """model_stock from the inputs (the Gram matrix in one pass, then one write) gives the eager
    path's bits: both sum the Gram matrix in float64 and the mean in model order."""
    base, ms = inputs(n=1_000_003, dtype=dtype)
    ms[-1] = (ms[0].float() * 0.5 + base.float() * 0.5).to(dtype)       # correlated τ: t well inside (0, 1)
    m = get_method("model_stock")
    memo = {}
    got = m.fused(base, ms, 0.8, MethodArgs(weights=()), dtype, memo)
    taus = torch.stack([x.float() - base.float() for x in ms])
    want = (m.fn(taus, MethodArgs(weights=()), None).mul_(0.8).add_(base.float())).to(dtype)
    assert torch.equal(got, want)
    assert 0.05 < memo["stock_t"] < 0.95
    memo["stock_t"] = 0.5                                   # a kept t is used, not recomputed
    half = m.fused(base, ms, 0.8, MethodArgs(weights=()), dtype, memo)
    torch.testing.assert_close(half.float(), (taus.mean(0) * 0.5 * 0.8 + base.float()).to(dtype).float())
    assert m.fused(base, ms, 0.8, MethodArgs(weights=(), stock="row"), dtype) is None


def test_model_stock_t_is_exact_on_a_large_tensor():
    """t from the Gram matrix summed in float64: a float32 product over 15 M elements was 0.3% off."""
    from merger.engine.methods.model_stock import stock_t
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 4_000_000, generator=g) * 0.01 + 0.003
    t64 = float(stock_t(taus.double(), "tensor"))
    assert abs(float(stock_t(taus, "tensor")) - t64) < 1e-6 * t64


@pytest.mark.parametrize("name", ["geometric_median", "model_stock"])
def test_fused_writes_into_a_preallocated_buffer(name):
    """The resident pipeline's path: the key written into its buffer, the same values."""
    base, ms = inputs(n=200_001)
    m = get_method(name)
    fresh = m.fused(base, ms, 0.6, MethodArgs(weights=()), torch.float16)
    out = torch.empty(base.shape, dtype=torch.float16)
    assert m.fused(base, ms, 0.6, MethodArgs(weights=()), torch.float16, None, out) is out
    assert torch.equal(out, fresh)
