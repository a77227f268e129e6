"""DARE's fused CPU path (masks drawn as torch draws them, one numba pass) gives the stacked
path's bits: dare_linear and dare_ties, weights, both sign rules, per-block λ and drop, a small
key, fp16/bf16/fp32 outputs; and the same seed gives the same merge."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from merger.engine import merge
from merger.engine.methods import REGISTRY, MethodArgs, get_method
from merger.files.checkpoint_io import Checkpoint
from merger.recipe import Recipe

KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
BIAS = "model.diffusion_model.out.2.bias"


def models(dtype=torch.float16, n=4):
    cks = []
    for i in range(n):
        g = torch.Generator().manual_seed(80 + i)
        cks.append(Checkpoint(Path(f"m{i}.safetensors"), {
            KEY: (torch.randn(640, 320, 3, 3, generator=g) * 0.05).to(dtype),
            BIAS: torch.randn(4, generator=g).to(dtype)}))
    return cks


@pytest.mark.parametrize("method,sign,weights,dtype", [
    ("dare_linear", "sum", (), torch.float16),
    ("dare_linear", "sum", (1.0, -0.5, 2.0), torch.bfloat16),
    ("dare_ties", "count", (), torch.float16),
    ("dare_ties", "sum", (0.5, 1.0, 1.5), torch.float32),
])
def test_fused_dare_equals_the_stacked_path(method, sign, weights, dtype, monkeypatch):
    cks = models(dtype)
    recipe = Recipe(model_a="m0.safetensors", method=method, models=["m1.safetensors", "m2.safetensors",
                    "m3.safetensors"], alpha=0.8, drop=0.7, sign=sign, weights=list(weights) or None, seed=4321)
    calls = []
    real = REGISTRY[method].fused

    def spy(*a):
        out = real(*a)
        calls.append(out is not None)
        return out
    monkeypatch.setitem(REGISTRY, method, dataclasses.replace(REGISTRY[method], fused=spy))
    fused = merge(recipe, cks[0], models=cks[1:]).tensors
    assert calls == [True, True]                      # the large key and the 4-element bias
    monkeypatch.setenv("SDMW_COMPILE", "0")          # the stacked reference path
    eager = merge(recipe, cks[0], models=cks[1:]).tensors
    assert calls == [True, True, False, False]
    assert all(torch.equal(fused[k], eager[k]) for k in eager)
    again = merge(recipe, cks[0], models=cks[1:]).tensors
    assert torch.equal(again[KEY], eager[KEY])
    monkeypatch.delenv("SDMW_COMPILE")
    other = merge(dataclasses.replace(recipe, seed=4322), cks[0], models=cks[1:]).tensors
    assert not torch.equal(other[KEY], fused[KEY])   # the seed is the masks'


def test_fused_dare_with_block_weights_and_into_a_buffer(monkeypatch):
    """Per-block λ (alpha vector) and drop (beta vector) reach the fused path per key; a result
    written into a preallocated fp32 buffer equals the stacked path's."""
    base, m1, m2 = (torch.randn(300_001, generator=torch.Generator().manual_seed(s)).half() for s in (1, 2, 3))
    for method in ("dare_linear", "dare_ties"):
        m = get_method(method)
        for drop in (0.0, 0.5, 0.95):
            args = MethodArgs(weights=(), drop=drop, sign="sum", seed=7)
            b = base.float()
            taus = torch.stack([x.float() - b for x in (m1, m2)])
            want = m.fn(taus, args, torch.Generator().manual_seed(7)).mul_(0.3).add_(b)
            out = torch.empty(base.shape, dtype=torch.float32)
            assert m.fused(base, [m1, m2], 0.3, args, torch.float32, None, out) is out
            assert torch.equal(out, want)


def test_dare_ties_that_trims_takes_the_stacked_path():
    base, m1 = (torch.randn(1000, generator=torch.Generator().manual_seed(s)).half() for s in (1, 2))
    args = MethodArgs(weights=(), drop=0.5, density=0.5, seed=1)
    assert get_method("dare_ties").fused(base, [m1], 1.0, args, torch.float16) is None
    assert get_method("dare_linear").fused(base, [m1], 1.0, dataclasses.replace(args, drop=1.0),
                                           torch.float16) is None      # p = 1: the base, stacked


def test_masks_fall_back_to_torch_where_numba_cannot_compile(monkeypatch, capsys):
    """The dropout of DELLA (and of DARE off the fused path) takes torch's bernoulli and argsort
    when numba's kernels fail to compile: the same masks, one note, no traceback."""
    from numba.core.errors import TypingError

    from merger.engine import kernels
    from merger.engine.kernels import bernoulli, ranks
    from merger.engine.methods.dropout import drop_
    taus = torch.randn(3, 5_000, generator=torch.Generator().manual_seed(2))
    want = drop_(taus.clone(), 0.6, torch.Generator().manual_seed(3), 0.1)
    monkeypatch.setattr(kernels, "_broken", [])

    def fail(*a):
        raise TypingError("cannot type this here")
    monkeypatch.setattr(ranks, "_ranks", fail)
    monkeypatch.setattr(bernoulli, "_draw", fail)
    assert torch.equal(drop_(taus.clone(), 0.6, torch.Generator().manual_seed(3), 0.1), want)
    assert not kernels.available()
    assert capsys.readouterr().err.count("numba's CPU kernels are off (TypingError") == 1
