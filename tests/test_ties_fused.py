"""TIES's fused CPU path (exact thresholds from the inputs + one fused pass: numba's, or inductor's
where numba is missing) gives bit for bit what the stacked eager path gives, equals sd-mecha, survives a missed bracket, and falls back to
eager torch when nothing can be compiled."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from sd_mecha.extensions.builtin.merge_methods import ties as mecha

import merger.engine.compiled as compiled_mod
import merger.engine.methods.ties as ties_mod
from merger.engine import merge
from merger.engine.methods import REGISTRY, MethodArgs, get_method
from merger.errors import MergeStopped
from merger.files.checkpoint_io import Checkpoint
from merger.recipe import Recipe

BIG = 300_000          # above the sample bracket's threshold (2^17)
MID = 70_000           # fused, thresholds selected directly


def inputs(numel: int, n: int, dtype, base_dtype=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.05).to(base_dtype or dtype)
    models = [(base.float() + torch.randn(numel, generator=g) * 0.01 * (i + 1)).to(dtype) for i in range(n)]
    return base, models


def stacked(base, models, lam, args):
    b = base.float()
    taus = torch.stack([m.float() - b for m in models])
    return get_method("ties").fn(taus, args, None).mul_(lam).add_(b).to(base.dtype), taus


CASES = [
    (BIG, 4, torch.float16, None, "count", (), 0.2),
    (BIG, 3, torch.bfloat16, None, "sum", (1.0, 0.5, 2.0), 0.5),
    (MID, 2, torch.float16, torch.float32, "sum", (1.0, -0.5), 0.3),
    (BIG, 2, torch.float16, None, "count", (), 1.0),
]
# inductor (the fallback where numba's combination does not apply) compiles C++ per model count,
# dtypes and output dtype, 5-18 s each in a fresh CI: the weighted sum vote and the untrimmed
# count vote (density 1) cover its branches
INDUCTOR_CASES = [CASES[1], CASES[3]]


@pytest.mark.parametrize("numel,n,dtype,base_dtype,sign,weights,density,combination",
                         [(*c, "numba") for c in CASES] + [(*c, "inductor") for c in INDUCTOR_CASES])
def test_fused_equals_the_stacked_path_bit_for_bit(numel, n, dtype, base_dtype, sign, weights, density, combination,
                                                   monkeypatch):
    if combination == "inductor":            # as where numba's combination does not apply
        monkeypatch.setattr(ties_mod, "_numba_combine", lambda *a: None)
    base, models = inputs(numel, n, dtype, base_dtype)
    args = MethodArgs(weights=weights, density=density, sign=sign)
    want, taus = stacked(base, models, 0.7, args)
    thr = ties_mod.thresholds(taus, density)
    got_thr = ties_mod.input_thresholds(base, models, density)
    assert (thr is None and got_thr is None) or torch.equal(thr, got_thr)
    got = ties_mod.ties_fused(base, models, 0.7, args, base.dtype)
    assert got is not None and got.dtype == base.dtype
    assert torch.equal(got, want)
    if combination == "inductor":
        return                               # a float32 output: one more compilation
    f32 = ties_mod.ties_fused(base, models, 0.7, args, torch.float32)      # keys that Adjust changes
    assert f32.dtype == torch.float32 and torch.equal(f32.to(base.dtype), want)


@pytest.mark.parametrize("vote_sgn,sign", [(False, "count"), (True, "sum")])
def test_fused_equals_sd_mecha(vote_sgn, sign):
    base, models = inputs(BIG, 4, torch.float32)
    taus = torch.stack([m - base for m in models])
    ref = base + mecha.ties_sum.__wrapped__(*taus.clone(), k=0.2, vote_sgn=vote_sgn)
    got = ties_mod.ties_fused(base, models, 1.0, MethodArgs(weights=(), density=0.2, sign=sign), torch.float32)
    assert torch.allclose(got, ref, atol=1e-6)


def test_a_missed_bracket_still_gives_the_exact_threshold(monkeypatch):
    """A sample whose bracket misses the k-th value (below it, or above it) sends the numba path
    to a selection over all values: the same exact threshold."""
    base, models = inputs(BIG, 2, torch.float16)
    want = ties_mod.thresholds(torch.stack([m.float() - base.float() for m in models]), 0.3)
    assert torch.equal(ties_mod.input_thresholds(base, models, 0.3), want)
    sizes = []
    real = ties_mod.select
    monkeypatch.setattr(ties_mod, "select", lambda x, kths: sizes.append(x.numel()) or real(x, kths))
    size = ties_mod.sample_size(BIG)
    for ranks in ((1, 2), (size - 3, size - 2)):      # below / above the answer
        monkeypatch.setattr(ties_mod, "_ranks", lambda kth, n, r=ranks: r)
        sizes.clear()
        assert torch.equal(ties_mod.input_thresholds(base, models, 0.3), want)
        assert sizes == [BIG, BIG]                  # each model's fallback selected from all


@pytest.mark.parametrize("density", [0.999, 0.001])
def test_open_bracket_ends_give_the_exact_threshold(density):
    """Near density 1 (0) the sample bracket has no lower (upper) end: every |τ| counts as above
    (below) it, and the threshold is still the exact k-th smallest."""
    base, models = inputs(BIG, 3, torch.float16)
    kth = max(int((1 - density) * BIG), 1)
    lo, hi = ties_mod._bracket(torch.rand(ties_mod.sample_size(BIG)).sort().values, kth, BIG)
    assert (lo is None) == (density > 0.5) and (hi is None) == (density < 0.5)
    taus = torch.stack([m.float() - base.float() for m in models])
    assert torch.equal(ties_mod.input_thresholds(base, models, density), ties_mod.thresholds(taus, density))


def test_engine_takes_the_fused_path_and_matches_eager(monkeypatch):
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    cks = []
    for i in range(4):
        g = torch.Generator().manual_seed(40 + i)
        tensors = {key: (torch.randn(640, 320, 3, 3, generator=g) * 0.05).half(),
                   "model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half()}
        cks.append(Checkpoint(Path(f"m{i}.safetensors"), tensors))
    recipe = Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors",
                                                                     "m3.safetensors"], alpha=0.8, density=0.2)
    calls = []
    real = ties_mod.ties_fused

    def spy(*a):
        out = real(*a)
        calls.append(out is not None)
        return out
    monkeypatch.setitem(REGISTRY, "ties", dataclasses.replace(REGISTRY["ties"], fused=spy))
    fused = merge(recipe, cks[0], models=cks[1:]).tensors
    assert calls == [True, True]                    # both by numba's kernels
    monkeypatch.setenv("SDMW_COMPILE", "0")
    eager = merge(recipe, cks[0], models=cks[1:]).tensors
    assert calls == [True, True, False, False]
    assert all(torch.equal(fused[k], eager[k]) for k in eager)
    monkeypatch.delenv("SDMW_COMPILE")
    monkeypatch.setattr(ties_mod.kernels, "available", lambda: False)     # no numba: the big key compiled, the bias eager
    calls.clear()
    merge(recipe, cks[0], models=cks[1:])
    assert sorted(calls) == [False, True]


def test_numba_failing_to_compile_here_falls_back_to_torch(monkeypatch, capsys):
    """A numba kernel that cannot compile on a user's machine (an LLVM error nobody saw) prints one
    note and turns numba off: thresholds and combination take torch's paths, with the same bits."""
    from numba.core.errors import LoweringError

    from merger.engine import kernels
    from merger.engine.kernels import ties_combine, ties_kth
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    cks = []
    for i in range(4):
        g = torch.Generator().manual_seed(60 + i)
        cks.append(Checkpoint(Path(f"m{i}.safetensors"), {
            key: (torch.randn(640, 320, 3, 3, generator=g) * 0.05).half(),
            "model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half()}))
    recipe = Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors",
                                                                     "m3.safetensors"], alpha=0.8, density=0.2)
    monkeypatch.setenv("SDMW_COMPILE", "0")
    eager = merge(recipe, cks[0], models=cks[1:]).tensors
    monkeypatch.delenv("SDMW_COMPILE")

    def fail(*a):
        raise LoweringError("no lowering for this intrinsic on this CPU")
    monkeypatch.setattr(kernels, "_broken", [])
    monkeypatch.setattr(ties_kth, "_split_range", fail)
    monkeypatch.setattr(ties_combine, "_combine_count", fail)
    monkeypatch.setattr(ties_combine, "_combine_sum", fail)
    fresh = [Checkpoint(ck.path, dict(ck.tensors)) for ck in cks]        # no thresholds kept
    got = merge(recipe, fresh[0], models=fresh[1:]).tensors
    assert all(torch.equal(got[k], eager[k]) for k in eager)
    assert not kernels.available()
    assert capsys.readouterr().err.count("numba's CPU kernels are off (LoweringError") == 1


def test_float8_inputs_take_the_stacked_path():
    base, models = inputs(BIG, 2, torch.float16)
    e4 = [m.to(torch.float8_e4m3fn) for m in models]
    assert ties_mod.ties_fused(base, e4, 1.0, MethodArgs(weights=(), density=0.2), base.dtype) is None


def test_without_a_compiler_one_note_then_numba(monkeypatch, capsys):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled_mod, "_broken", [])
    fn = compiled_mod.compiled(lambda x: x + 1)
    assert fn(torch.ones(3)) is None and fn(torch.ones(3)) is None
    assert capsys.readouterr().err.count("compiled CPU kernels are off") == 1
    base, models = inputs(BIG, 2, torch.float16)
    assert not compiled_mod.usable(base) and compiled_mod.usable(base, compiler=False)
    args = MethodArgs(weights=(), density=0.2)
    got = ties_mod.ties_fused(base, models, 1.0, args, base.dtype)      # numba's kernel: no compiler
    assert got is not None and torch.equal(got, stacked(base, models, 1.0, args)[0])
    monkeypatch.setattr(ties_mod.kernels, "available", lambda: False)     # nor numba: the stacked path
    assert ties_mod.ties_fused(base, models, 1.0, args, base.dtype) is None


def test_thresholds_are_kept_for_the_same_models_and_density(monkeypatch):
    """Changing only α (or weights, or the sign rule) reuses the thresholds of the same loaded
    models; another density, or a model loaded again as a new object, computes them anew — and
    every result equals a merge from fresh objects."""
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"

    def load(seed_base=40):
        out = []
        for i in range(3):
            g = torch.Generator().manual_seed(seed_base + i)
            out.append(Checkpoint(Path(f"m{i}.safetensors"),
                                  {key: (torch.randn(640, 320, 3, 3, generator=g) * 0.05).half()}))
        return out
    cks = load()
    counted = []
    real = ties_mod.input_thresholds
    monkeypatch.setattr(ties_mod, "input_thresholds", lambda *a, **k: counted.append(1) or real(*a, **k))

    def run(cks, **kw):
        r = Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"], **kw)
        return merge(r, cks[0], models=cks[1:]).tensors[key]
    run(cks, alpha=1.0, density=0.2)
    assert len(counted) == 1
    again = run(cks, alpha=0.4, density=0.2, sign="count", weights=[1.0, 2.0])
    assert len(counted) == 1                                   # kept: only λ, weights and sign changed
    assert torch.equal(again, run(load(), alpha=0.4, density=0.2, sign="count", weights=[1.0, 2.0]))
    assert len(counted) == 2                                   # new objects: computed
    run(cks, alpha=0.4, density=0.5)
    assert len(counted) == 3                                   # another density: computed
    other = load(seed_base=40)
    other[2] = load(seed_base=90)[2]                           # same names, another model 2
    assert torch.equal(run([cks[0], cks[1], other[2]], alpha=1.0, density=0.2),
                       run(load(40)[:2] + [other[2]], alpha=1.0, density=0.2))


def test_thresholds_work_in_a_forked_child():
    """The worker threads of the parent do not exist in a fork; the child makes its own (with
    the parent's pool it would wait forever). The child runs torch single-threaded: a forked
    child's first OpenMP region after the parent's hangs in GNU libgomp, whatever this code does."""
    import multiprocessing
    base, models = inputs(BIG, 2, torch.float16)
    want = ties_mod.input_thresholds(base, models, 0.3)          # the parent's workers now run
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=lambda: torch.set_num_threads(1) or q.put(
        ties_mod.input_thresholds(base, models, 0.3).tolist()))
    child.start()
    child.join(30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert q.get(timeout=5) == want.tolist()


def test_fused_path_writes_into_the_callers_buffer(monkeypatch):
    """With ``out_for`` (the resident pipeline's buffers) the compiled loop stores the key
    straight into the buffer: same values as a fresh merge, no second copy."""
    from merger.engine import iter_merge, plan_merge
    from merger.engine.run import _writable_into
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    cks = []
    for i in range(3):
        g = torch.Generator().manual_seed(60 + i)
        cks.append(Checkpoint(Path(f"m{i}.safetensors"),
                              {key: (torch.randn(640, 320, 3, 3, generator=g) * 0.05).half()}))
    recipe = Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"],
                    alpha=0.6, density=0.3)
    fresh = merge(recipe, cks[0], models=cks[1:]).tensors[key]
    got = []
    real = ties_mod.ties_fused
    monkeypatch.setitem(REGISTRY, "ties", dataclasses.replace(
        REGISTRY["ties"], fused=lambda *a: got.append(a[-1]) or real(*a)))
    buf = torch.full_like(fresh, float("nan"))
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, *a, **k: copies.append(t is buf) or real_copy(t, *a, **k))
    (k, value), = iter_merge(plan_merge(recipe, cks[0], models=cks[1:]), out_for=lambda k, like: buf)
    assert got == [buf] and value is buf and True not in copies
    assert torch.equal(buf, fresh)
    base = cks[0].tensors[key]
    assert _writable_into(torch.empty_like(base), base, base.dtype, [])
    assert not _writable_into(base, base, base.dtype, [])                     # aliases the base
    assert not _writable_into(cks[1].tensors[key], base, base.dtype, [cks[1].tensors[key]])
    assert not _writable_into(torch.empty_like(base, dtype=torch.float32), base, base.dtype, [])
    transposed = torch.empty(320, 640, 3, 3, dtype=base.dtype).transpose(0, 1)
    assert not _writable_into(transposed, base, base.dtype, [])               # not contiguous


def _three_models(keys):
    cks = []
    for i in range(3):
        g = torch.Generator().manual_seed(70 + i)
        cks.append(Checkpoint(Path(f"m{i}.safetensors"),
                              {k: (torch.randn(*shape, generator=g) * 0.05).half() for k, shape in keys.items()}))
    return cks, Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"],
                       alpha=0.8, density=0.3)


def test_every_keys_thresholds_come_before_the_first_combination(monkeypatch):
    """A TIES merge on the CPU computes the thresholds of all its fused keys first, whole keys on
    the workers, then combines them with those; results equal the eager path."""
    from merger.engine import iter_merge, plan_merge
    keys = {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (640, 320, 3, 3),
            "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
            "model.diffusion_model.out.2.bias": (4,)}
    cks, recipe = _three_models(keys)
    events = []
    real_thr, real_fused = ties_mod.input_thresholds, ties_mod.ties_fused
    monkeypatch.setattr(ties_mod, "input_thresholds",
                        lambda b, *a, **k: events.append(("thresholds", b.numel(), k.get("parallel", True)))
                        or real_thr(b, *a, **k))
    monkeypatch.setitem(REGISTRY, "ties", dataclasses.replace(
        REGISTRY["ties"], fused=lambda *a: events.append(("combine",)) or real_fused(*a)))
    got = merge(recipe, cks[0], models=cks[1:]).tensors
    assert sorted(events[:3]) == [("thresholds", 4, False), ("thresholds", 1280 * 1280, False),
                                  ("thresholds", 640 * 320 * 9, False)]
    assert {e[0] for e in events[3:]} == {"combine"}       # the fused keys found their thresholds
    monkeypatch.setenv("SDMW_COMPILE", "0")
    eager = merge(recipe, cks[0], models=cks[1:]).tensors
    assert all(torch.equal(got[k], eager[k]) for k in keys)
    events.clear()
    monkeypatch.delenv("SDMW_COMPILE")
    stopped = iter_merge(plan_merge(recipe, cks[0], models=cks[1:]), should_stop=lambda: True)
    with pytest.raises(MergeStopped):
        next(stopped)
    assert events == []                                      # Stop: no threshold pass started


def test_the_small_keys_are_one_task_handed_out_first(monkeypatch):
    """The prefetch hands the small keys (≤ ``SMALL`` elements) to one worker as one task, before
    the large ones (largest first): one thread takes them all while the other starts on the largest
    key, instead of both contending for the GIL over them at the end. A Stop is still seen before
    each key, inside that task too."""
    import threading
    keys = {"model.diffusion_model.out.2.bias": (4,),
            "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (640, 320, 3, 3),
            "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (320,),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1)}
    cks, _ = _three_models(keys)
    args = MethodArgs(weights=(1.0, 1.0), density=0.3, sign="count")

    def items():
        return [(cks[0].tensors[k], [c.tensors[k] for c in cks[1:]], args, {}) for k in keys]
    seen = []
    real = ties_mod.input_thresholds
    monkeypatch.setattr(ties_mod, "input_thresholds",
                        lambda b, *a, **k: seen.append((b.numel(), threading.get_ident())) or real(b, *a, **k))
    small = sorted((math.prod(s) for s in keys.values() if math.prod(s) <= ties_mod.SMALL), reverse=True)
    large = sorted((math.prod(s) for s in keys.values() if math.prod(s) > ties_mod.SMALL), reverse=True)
    assert len(small) == 3 and len(large) == 2
    ties_mod.ties_prefetch(items(), serial=True)          # the tasks' order, on the calling thread
    assert [n for n, _ in seen] == small + large
    for _ in range(3):                                     # on the workers: the small keys on one thread
        seen.clear()
        got = items()
        ties_mod.ties_prefetch(got)
        assert sorted(n for n, _ in seen) == sorted(small + large)
        assert len({t for n, t in seen if n <= ties_mod.SMALL}) == 1
        assert all(("thresholds", 0.3) in memo for *_, memo in got)
    seen.clear()
    polls = []
    got = items()
    ties_mod.ties_prefetch(got, should_stop=lambda: polls.append(1) or len(polls) > 2, serial=True)
    assert [n for n, _ in seen] == small[:2]               # stopped before the third small key
    assert [("thresholds", 0.3) in memo for *_, memo in got].count(True) == 2


def test_results_that_cannot_overflow_are_not_scanned_and_those_that_can_are(monkeypatch):
    """TIES with positive weights: |BASE + λ·merge| ≤ (1 + 2|λ|)·max|input|, so the engine skips
    the scan of each result where that is inside the dtype's range; near its edge, or with a
    negative weight (no such bound), results are scanned and an overflow is the clear error."""
    import merger.engine.run as run_mod
    from merger.errors import MergeError
    scans = []
    real = run_mod._nonfinite
    monkeypatch.setattr(run_mod, "_nonfinite", lambda t: scans.append(1) or real(t))
    key = "model.diffusion_model.out.2.weight"

    def models(scale):
        out = []
        for i in range(3):
            g = torch.Generator().manual_seed(5 + i)
            out.append(Checkpoint(Path(f"m{i}.safetensors"), {key: (torch.randn(4, 320, 3, 3, generator=g) * scale).half()}))
        return out

    def run(cks, **kw):
        r = Recipe(model_a="m0.safetensors", method="ties", models=["m1.safetensors", "m2.safetensors"], **kw)
        return merge(r, cks[0], models=cks[1:]).tensors[key]
    run(models(0.05), alpha=1.0, density=0.5)
    assert scans == []
    run(models(0.05), alpha=1.0, density=0.5, weights=[1.0, -0.5])
    assert scans                                       # a negative weight: no bound, scanned
    scans.clear()
    big = models(0.05)
    big[0].tensors[key].fill_(30000.0)                 # (1 + 2)·30000 is past float16's 65504
    big[1].tensors[key].fill_(-30000.0)
    big[2].tensors[key].fill_(-30000.0)
    with pytest.raises(MergeError, match="produced NaN/Inf"):
        run(big, alpha=2.0, density=1.0)               # 30000 + 2·(−60000): −inf in float16
    assert scans


@pytest.mark.parametrize("numel,dtype,sign,weights,density", [
    (BIG, torch.float16, "count", (), 0.2),
    (BIG, torch.bfloat16, "sum", (1.0, 0.5, 2.0), 0.5),
    (MID, torch.float32, "count", (1.0, -0.5, 1.0), 0.2),
    (1000, torch.float16, "sum", (), 1.0),          # density 1: nothing trimmed (thresholds None)
])
def test_the_gpu_path_with_prefetched_thresholds_is_the_stacked_path(numel, dtype, sign, weights, density):
    """A merge on a GPU takes each key's thresholds from the CPU prefetch and then runs the
    stacked path's operations (``_stacked_with``): bit for bit the stacked path's result."""
    base, models = inputs(numel, 3, dtype, seed=7)
    args = MethodArgs(weights=weights, density=density, sign=sign)
    thr = ties_mod.input_thresholds(base, models, density)
    got = ties_mod._stacked_with(base, models, thr, 0.7, args, dtype)
    assert torch.equal(got, stacked(base, models, 0.7, args)[0])


def test_a_merge_on_a_gpu_selects_no_thresholds_there(monkeypatch):
    """On another device (here ``meta``, which has no values: any selection there would fail),
    every key's thresholds come from the CPU prefetch, into the memo, and every key runs the
    device branch; the memo then serves the next merge of the same models."""
    from tests.conftest import tiny

    def part(ck):          # a block and the largest key (sampled thresholds): meta ops run in Python
        return Checkpoint(ck.path, {k: t for k, t in ck.tensors.items()
                                    if ".input_blocks.1." in k or k.endswith("token_embedding.weight")})
    base, m1, m2 = (part(tiny(seed=s, dtype=torch.float16)) for s in (11, 12, 13))
    assert max(t.numel() for t in base.tensors.values()) > 1 << 17
    recipe = Recipe("a", method="ties", models=["1", "2"], alpha=0.8, density=0.3)
    ran = []
    real = ties_mod._stacked_with

    def spy(*a):
        ran.append(a[0].device.type)
        return real(*a)
    monkeypatch.setattr(ties_mod, "_stacked_with", spy)
    res = merge(recipe, base, models=[m1, m2], device="meta")
    merged = res.plan.merged_keys
    assert {t.device.type for t in res.tensors.values()} == {"meta"}
    assert ran == ["meta"] * len(merged)
    memo = base.__dict__["_method_memo"]
    assert sum(("thresholds", 0.3) in entry for _, entry in memo.values()) == len(merged)
    prefetched = []
    monkeypatch.setattr(ties_mod, "input_thresholds", lambda *a, **k: prefetched.append(1))
    merge(dataclasses.replace(recipe, alpha=0.4), base, models=[m1, m2], device="meta")
    assert not prefetched and len(ran) == 2 * len(merged)


@pytest.mark.parametrize("numel,n,dtype,sign,weights,density", [
    (5, 2, torch.float16, "count", (), 0.2),
    (777, 3, torch.bfloat16, "sum", (1.0, 0.5, 2.0), 0.5),
    (4096, 4, torch.float32, "count", (1.0, -0.5, 1.0, 1.0), 0.2),
    (3000, 2, torch.float16, "sum", (), 1.0),
])
def test_small_keys_by_numba_equal_the_stacked_path(numel, n, dtype, sign, weights, density):
    """Keys under MIN_NUMEL elements (most of a model's keys, few of its values) go to numba's
    combination on the calling thread: bit for bit the stacked path."""
    base, models = inputs(numel, n, dtype, seed=3)
    args = MethodArgs(weights=weights, density=density, sign=sign)
    memo: dict = {}
    got = ties_mod.ties_fused(base, models, 0.6, args, dtype, memo)
    assert got is not None and ("thresholds", density) in memo
    assert torch.equal(got, stacked(base, models, 0.6, args)[0])
