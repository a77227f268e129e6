"""The NaN/Inf check of the inputs from their bits (``kernels.magnitude``): the scan finds what
torch's ``aminmax`` finds, and a TIES merge on the CPU makes the check in its threshold pass, which
reads every input of the large keys anyway: those keys are not scanned a second time and the check
still comes before any result."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import merger.engine.methods.ties as ties_mod
import merger.engine.run as run_mod
import merger.engine.tensor_ops as tensor_ops
from merger.engine import check_inputs, iter_merge, merge, plan_merge
from merger.errors import MergeError, MergeStopped
from merger.files.checkpoint_io import Checkpoint
from merger.recipe import Recipe

BIG_KEY = "model.diffusion_model.middle_block.1.proj_in.weight"      # 1280 x 320: above ties.SMALL
SMALL_KEY = "model.diffusion_model.out.2.weight"


def _inputs(numel, n, dtype, base_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.05).to(base_dtype or dtype)
    models = [(base.float() + torch.randn(numel, generator=g) * 0.01 * (i + 1)).to(dtype) for i in range(n)]
    return base, models


def truth(x: torch.Tensor) -> tuple[bool, float]:
    """(no NaN/Inf, largest |value|) by torch's own operations, to check the kernels against."""
    lo, hi = (float(v) for v in torch.aminmax(x.float()))
    return (True, max(-lo, hi)) if math.isfinite(lo) and math.isfinite(hi) else (False, math.nan)


def _same(got, want):
    return all(g[0] == w[0] and (g[1] == w[1] or math.isnan(g[1]) and math.isnan(w[1])) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("numel", [5, 4099, (1 << 20) + 77])
def test_the_bits_scan_finds_what_aminmax_finds(dtype, numel, monkeypatch):
    from merger.engine.kernels import magnitude
    g = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=g) * 0.02).to(dtype)
    x[numel - 2] = -3.25                                    # the largest magnitude is negative
    x[1] = -0.0
    x[2] = torch.finfo(dtype).tiny / 4                      # a subnormal
    assert magnitude.finite_top(x) == truth(x) == (True, 3.25)
    assert tensor_ops.finite_top(x.reshape(1, -1)) == truth(x)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[numel - 1] = bad                                  # the last element, past every full part
        assert _same([magnitude.finite_top(y)], [(False, math.nan)])
    y = x.clone()
    y[3] = torch.finfo(dtype).max                           # the largest finite value is finite
    assert magnitude.finite_top(y) == (True, float(torch.finfo(dtype).max))
    monkeypatch.setattr(magnitude, "PARALLEL_FROM", 1)      # split between the workers, or not
    one = magnitude.finite_top(x)
    torch.set_num_threads(1)
    try:
        assert magnitude.finite_top(x) == one == truth(x)
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("dtype,base_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                              (torch.float32, None), (torch.float16, torch.float32)])
def test_the_threshold_pass_finds_what_the_scan_finds(dtype, base_dtype):
    base, models = _inputs(300_001, 3, dtype, base_dtype)
    models[2][1234] = 7.5                                   # the largest magnitude of one input
    stats: list = []
    thr = ties_mod.input_thresholds(base, models, 0.3, stats=stats)
    assert stats == [truth(x) for x in (base, *models)]
    assert torch.equal(thr, ties_mod.thresholds(torch.stack([m.float() - base.float() for m in models]), 0.3))
    for x, bad in ((models[1], math.nan), (base, -math.inf), (models[0], math.inf)):
        x[299_999] = bad                                    # in the tail past the last full block
        stats = []
        thr = ties_mod.input_thresholds(base, models, 0.3, stats=stats)
        assert _same(stats, [truth(y) for y in (base, *models)])
        assert [s[0] for s in stats].count(False) >= 1 and torch.isnan(thr).all()


def _models(scale=0.05, n=3):
    cks = []
    for i in range(n):
        g = torch.Generator().manual_seed(30 + i)
        cks.append(Checkpoint(Path(f"m{i}.safetensors"), {
            BIG_KEY: (torch.randn(1280, 320, generator=g) * scale).half(),
            SMALL_KEY: (torch.randn(4, 320, 3, 3, generator=g) * scale).half()}))
    return cks


RECIPE = Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"],
                alpha=0.8, density=0.3)


def _spy_scans(monkeypatch):
    scanned = []
    real = tensor_ops.finite_top
    monkeypatch.setattr(tensor_ops, "finite_top", lambda t: scanned.append(t.numel()) or real(t))
    return scanned


def test_a_first_merge_scans_only_the_keys_its_threshold_pass_did_not_read(monkeypatch):
    scanned = _spy_scans(monkeypatch)
    cks = _models()
    got = merge(RECIPE, cks[0], models=cks[1:]).tensors
    assert scanned == []                                    # both keys' inputs were read by the pass
    for ck in cks:                                          # what a whole scan would have found
        assert ck.value_stats() == (frozenset(), max(truth(t)[1] for t in ck.tensors.values()))
    monkeypatch.setenv("SDMW_COMPILE", "0")                 # the stacked path, inputs scanned whole
    fresh = _models()
    want = merge(RECIPE, fresh[0], models=fresh[1:]).tensors
    assert all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.delenv("SDMW_COMPILE")
    scanned.clear()
    fresh = _models()                                       # density 1 trims nothing: no pass, a scan
    merge(Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"],
                 alpha=0.8, density=1.0), fresh[0], models=fresh[1:])
    assert sorted(scanned) == sorted([4 * 320 * 9, 1280 * 320] * 3)


@pytest.mark.parametrize("which,label,key", [(0, "A (m0.safetensors)", BIG_KEY), (2, "M2 (m2.safetensors)", BIG_KEY),
                                             (1, "M1 (m1.safetensors)", SMALL_KEY)])
def test_nan_in_an_input_is_refused_before_any_result(which, label, key, monkeypatch):
    cks = _models()
    cks[which].tensors[key].view(-1)[17] = float("nan")
    written = []
    items = iter_merge(plan_merge(RECIPE, cks[0], models=cks[1:]),
                       out_for=lambda k, like: written.append(k) or torch.empty_like(like))
    with pytest.raises(MergeError, match=rf"model {label.replace('(', '.').replace(')', '.')} contains NaN/Inf values in {key}"):
        next(items)
    assert written == []
    with pytest.raises(MergeError, match="contains NaN/Inf"):          # again: the memo holds no thresholds
        check_inputs(plan_merge(RECIPE, cks[0], models=cks[1:]))


def test_a_stop_during_the_threshold_pass_skips_the_check(monkeypatch):
    scanned = _spy_scans(monkeypatch)
    stop = []
    real = ties_mod.input_thresholds
    monkeypatch.setattr(ties_mod, "input_thresholds", lambda *a, **k: stop.append(1) or real(*a, **k))
    cks = _models()
    with pytest.raises(MergeStopped):
        check_inputs(plan_merge(RECIPE, cks[0], models=cks[1:]), should_stop=lambda: bool(stop))
    assert stop == [1] and scanned == []                    # one key, then stopped; nothing scanned
    out = merge(RECIPE, cks[0], models=cks[1:])             # the next merge does the rest and checks
    assert scanned == [] and len(out.tensors) == 2


def test_the_overflow_proof_uses_the_largest_values_the_pass_found(monkeypatch):
    """Results are not scanned where the inputs' largest values (found by the threshold pass)
    prove them finite; where they do not, results are scanned and an overflow is the clear error."""
    scans = []
    real = run_mod._nonfinite
    monkeypatch.setattr(run_mod, "_nonfinite", lambda t: scans.append(1) or real(t))
    cks = _models()
    merge(RECIPE, cks[0], models=cks[1:])
    assert scans == []
    big = _models()
    for ck, v in zip(big, (30000.0, -30000.0, -30000.0)):
        ck.tensors[BIG_KEY].fill_(v)
    big[0].tensors[BIG_KEY][0, 0] = 29000.0                # not all equal: a real threshold pass
    with pytest.raises(MergeError, match=f"produced NaN/Inf values in {BIG_KEY}"):
        merge(Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"],
                     alpha=2.0, density=0.9), big[0], models=big[1:])
    assert scans


def test_stop_while_the_pipeline_prepares_a_merge_keeps_the_last_merge_intact(demo_ws, monkeypatch):
    """The resident pipeline checks (and for TIES prepares) a merge before it writes a weight:
    Stop pressed then ends the merge with the pipeline still holding the last one, intact."""
    ws = demo_ws
    names = ws.dirs.checkpoints()
    sd1 = [n for n in names if "sdxl" not in n.lower()][:3]
    ws.merge(ws.recipe(sd1[0], models=sd1[1:], method="ties", density=0.3, alpha=0.8))
    before = {k: v.clone() for k, v in ws.pipeline.state_dict().items()}
    real = ties_mod.input_thresholds
    monkeypatch.setattr(ties_mod, "input_thresholds", lambda *a, **k: ws.stop() or real(*a, **k))
    with pytest.raises(MergeStopped):
        ws.merge(ws.recipe(sd1[0], models=sd1[1:], method="ties", density=0.6, alpha=0.8))
    assert ws.pipeline.state == "ok"
    after = ws.pipeline.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(ties_mod, "input_thresholds", real)
    ws.merge(ws.recipe(sd1[0], models=sd1[1:], method="ties", density=0.6, alpha=0.8))
    assert ws.pipeline.state == "ok"
    assert any(not torch.equal(before[k], v) for k, v in ws.pipeline.state_dict().items())
