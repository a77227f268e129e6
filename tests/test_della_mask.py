"""DELLA's masks without sorting (merger/engine/kernels/della_mask.py) give the ranking path's
masked τ bit for bit and leave the generator where torch's own draws leave it; where they do not
apply they say so before drawing anything; DELLA merges (fused and stacked) equal the pure torch
path (stable argsort ranks, ``torch.bernoulli``), which is sd-mecha's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from merger.engine import kernels, merge
from merger.engine.kernels import as_numpy, bernoulli, della_mask
from merger.engine.kernels.della_mask import della_keep
from merger.files.checkpoint_io import Checkpoint
from merger.recipe import Recipe


def reference(t: torch.Tensor, p: float, eps: float, seed: int):
    """sd-mecha's way: ranks by a stable argsort of |τ|, then ``torch.bernoulli``."""
    n = t.numel()
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.argsort(t.abs().reshape(-1), stable=True)] = torch.arange(1, n + 1)
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(della_keep(rank, n, p, eps), generator=g), g


def data(kind: str):
    """(τ as stack_taus makes it, the kernel source): float32 τ, or fp16 BASE and M."""
    g = torch.Generator().manual_seed(len(kind))
    if kind == "randn":
        t = torch.randn(1_000_003, generator=g)
    elif kind == "ties":              # few distinct magnitudes, zeros among them
        t = torch.randint(-20, 20, (300_000,), generator=g).float() * 0.01
    elif kind == "mostly zero":
        t = torch.zeros(300_000)
        t[::7] = torch.randn(t[::7].numel(), generator=g)
    else:                             # a fine-tune of an fp16 base: τ on fp16's grid, heavy ties
        b = (torch.randn(2_000_000, generator=g) * 0.05).half()
        m = (b.float() + torch.randn(2_000_000, generator=g) * 1e-4).half()
        return m.float() - b.float(), (as_numpy(b), as_numpy(m))
    return t, (t.numpy(),)


@pytest.mark.parametrize("kind", ["randn", "ties", "mostly zero", "fp16 pair"])
@pytest.mark.parametrize("p,eps", [(0.9, 0.1), (0.3, 0.7), (0.5, 2.0)])
def test_masks_give_the_ranking_paths_masked_tau(kind, p, eps):
    t, src = data(kind)
    want, g_ref = reference(t, p, eps, 7)
    g = torch.Generator().manual_seed(7)
    before = g.get_state()
    out = np.full(t.numel(), 9, np.uint8)
    ok = della_mask.masks(src, t.numel(), p, eps, g, out, *kernels.split_for(t.numel()))
    if not ok:        # too many undecided (fp16's heavy ties with a large ε): nothing drawn
        assert kind == "fp16 pair" and eps > 1 and torch.equal(g.get_state(), before)
        return
    mask = torch.from_numpy(out).float()
    assert torch.equal(t * mask, t * want)
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert bool(((mask == want) | (t == 0)).all())            # masks differ only where τ = ±0
    if kind != "mostly zero":
        assert 0 < float(mask.mean()) < 1


@pytest.mark.parametrize("wide_at", [1 << 31, 0])
def test_bins_with_several_undecided_keys_and_wide_counts(monkeypatch, wide_at):
    """Coarse bins put several undecided keys in one bin (the counting pass's loop over them,
    next to its branch-free count for bins with one key); ``wide_at`` 0 counts in int64, as
    parts of 2^31 elements or more do."""
    monkeypatch.setattr(della_mask, "BIN_TARGET", 512)
    monkeypatch.setattr(della_mask, "WIDE_AT", wide_at)
    real, seen = della_mask._resolve, []
    monkeypatch.setattr(della_mask, "_resolve",
                        lambda *a: (a[0][0].size and seen.append((a[3].min(), a[8].dtype))) or real(*a))
    t, src = data("randn")
    want, g_ref = reference(t, 0.3, 0.7, 7)
    g = torch.Generator().manual_seed(7)
    out = np.full(t.numel(), 9, np.uint8)
    assert della_mask.masks(src, t.numel(), 0.3, 0.7, g, out, *kernels.split_for(t.numel()))
    assert seen and all(low < 0 for low, _ in seen)               # bins with several keys, in every part
    assert {dt for _, dt in seen} == {np.dtype(np.int64) if wide_at == 0 else np.dtype(np.int32)}
    mask = torch.from_numpy(out).float()
    assert torch.equal(t * mask, t * want) and torch.equal(g.get_state(), g_ref.get_state())


def test_the_undecided_are_resolved_by_exact_ranks():
    """Every tensor above has undecided elements (their ranks are counted, not looked up): with
    the bins' tables alone the masks would differ."""
    t, src = data("randn")
    n = t.numel()
    want, _ = reference(t, 0.5, 0.7, 3)
    calls = []
    real = della_mask._ranks_of

    def spy(*a):
        calls.append(a[1].size)
        return real(*a)
    della_mask._ranks_of = spy
    try:
        out = np.zeros(n, np.uint8)
        assert della_mask.masks(src, n, 0.5, 0.7, torch.Generator().manual_seed(3), out, *kernels.split_for(n))
    finally:
        della_mask._ranks_of = real
    assert calls and calls[0] > 0
    assert torch.equal(torch.from_numpy(out).float(), want)


def test_too_many_keys_in_a_bin_draws_nothing(monkeypatch):
    t, src = data("randn")
    monkeypatch.setattr(della_mask, "MAX_KEYS", 0)
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    out = np.zeros(t.numel(), np.uint8)
    assert not della_mask.masks(src, t.numel(), 0.5, 0.7, g, out, *kernels.split_for(t.numel()))
    assert torch.equal(g.get_state(), before)


@pytest.mark.parametrize("n", [70_000, 15_000_000, 2**24 + 3, 33_554_467])
def test_g_is_torchs_rounding(n):
    """The kernels' float32 g(rank) equals torch's evaluation of DELLA's keep probability, also
    where ranks and N no longer fit float32 exactly."""
    ranks = torch.randint(1, n + 1, (200_000,), generator=torch.Generator().manual_seed(n))
    ranks[:2] = torch.tensor([1, n])
    for p, eps in ((0.9, 0.1), (0.3, 0.77), (0.0, 5.0)):
        want = della_keep(ranks, n, p, eps).numpy()
        assert np.array_equal(della_mask.g_values(ranks.numpy(), n, p, eps).view(np.uint32), want.view(np.uint32))


def test_it_does_not_apply_to_small_tensors_or_a_huge_eps():
    assert not della_mask.applies(della_mask.MIN_N - 1, 0.1)
    assert not della_mask.applies(10**6, 1e31) and not della_mask.applies(10**6, 0.0)
    assert della_mask.applies(10**6, 0.1) == kernels.available()


KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
BIAS = "model.diffusion_model.out.2.bias"


@pytest.mark.parametrize("density,dtype", [(1.0, torch.float16), (0.6, torch.bfloat16)])
def test_della_merges_equal_the_torch_path(density, dtype, monkeypatch):
    """DELLA from the CPU kernels (fused at density 1, stacked when it trims) equals the merge
    whose ranks come from torch's stable argsort and whose masks from ``torch.bernoulli``."""
    cks = []
    for i in range(4):
        g = torch.Generator().manual_seed(60 + i)
        base = torch.randn(320, 320, 3, 3, generator=g) * 0.05
        cks.append(Checkpoint(Path(f"m{i}.safetensors"), {
            KEY: (base if i == 0 else base + torch.randn(base.shape, generator=g) * 0.01).to(dtype),
            BIAS: torch.randn(4, generator=g).to(dtype)}))
    recipe = Recipe(model_a="m0.safetensors", method="della", models=["m1.safetensors", "m2.safetensors",
                    "m3.safetensors"], alpha=0.9, drop=0.6, density=density, della_eps=0.3, seed=99)
    used = []
    real = della_mask.masks
    monkeypatch.setattr(della_mask, "masks", lambda *a: used.append(real(*a)) or used[-1])
    fast = merge(recipe, cks[0], models=cks[1:]).tensors
    assert used.count(True) == 3          # the large key, per model (the bias is ranked)
    monkeypatch.setattr(bernoulli, "usable", lambda g: False)
    monkeypatch.setenv("SDMW_COMPILE", "0")
    slow = merge(recipe, cks[0], models=cks[1:]).tensors
    assert all(torch.equal(fast[k], slow[k]) for k in slow)
    assert not torch.equal(fast[KEY], cks[0].tensors[KEY])


def test_a_kernel_numba_cannot_compile_fails_before_anything_is_drawn(monkeypatch, capsys):
    """Every kernel is compiled before the first draw: one failing sends DELLA's dropout to
    torch's argsort and bernoulli with the generator and τ untouched (the same result)."""
    from numba.core.errors import TypingError

    from merger.engine.methods.dropout import drop_
    taus = torch.randn(2, 70_001, generator=torch.Generator().manual_seed(2))
    want = drop_(taus.clone(), 0.6, torch.Generator().manual_seed(3), 0.2)
    monkeypatch.setattr(kernels, "_broken", [])
    monkeypatch.setattr(della_mask, "_warm", set())

    def fail(*a):
        raise TypingError("cannot type this here")
    monkeypatch.setattr(della_mask, "_decide", fail)
    assert torch.equal(drop_(taus.clone(), 0.6, torch.Generator().manual_seed(3), 0.2), want)
    assert not kernels.available()
    assert "numba's CPU kernels are off (TypingError" in capsys.readouterr().err
