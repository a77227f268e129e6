"""The merge loop: plan which keys merge with which ratios, then stream merged tensors.

``plan_merge`` checks everything that can be checked before any arithmetic (architectures,
shapes, MBW lengths, elemental syntax). ``iter_merge`` then yields ``(key, tensor)`` in output
order, computing each merged tensor straight into a caller-supplied buffer when there is one
(the resident pipeline's parameter, a reusable arena) and never copying kept tensors of A.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .adjust import adjust_factors, apply_adjust
from .arch import check_same_arch, detect_arch
from .calcmodes import CalcContext, get_calcmode
from .files.checkpoint_io import Checkpoint
from .key_coverage import check_coverage
from .errors import MergeError, MergeStopped
from .ratios import RatioPlan
from .recipe import Recipe
from .tensor_ops import CHUNK, chunked, same_dtype

POSITION_IDS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
Progress = Callable[[int, int, str], None]
OutFor = Callable[[str, torch.Tensor], "torch.Tensor | None"]


@dataclass
class KeyJob:
    key: str
    source: str = "a"                     # "a": A's tensor (maybe merged), "b": B-only key
    ratios: tuple[float, float] | None = None   # None: keep A (or B for source "b")
    channels: int | None = None           # inpainting: merge only [:, :channels]
    adjust: float | list | None = None


@dataclass
class MergePlan:
    recipe: Recipe
    arch: str
    a: Checkpoint
    b: Checkpoint | None
    c: Checkpoint | None
    jobs: list[KeyJob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # which model provided what (key_coverage)

    @property
    def merged_keys(self) -> list[str]:
        return [j.key for j in self.jobs if j.ratios is not None]

    def output_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """key -> (shape, dtype) of the merged state dict, known before merging."""
        spec = {}
        for j in self.jobs:
            t = (self.b if j.source == "b" else self.a).tensors[j.key]
            spec[j.key] = (tuple(t.shape), t.dtype)
        return spec


def _is_candidate(key: str, t: torch.Tensor) -> bool:
    """SuperMerger merges keys whose name contains "model" and "weight" or "bias"."""
    return "model" in key and ("weight" in key or "bias" in key) and t.is_floating_point()


def _inpaint_channels(key: str, shapes: dict[str, torch.Size]) -> int | None:
    """None when all shapes agree; the common channel count when A is an inpainting /
    instruct-pix2pix model (8 or 9 input channels) merged with 4-channel models."""
    a = shapes["A"]
    if all(s == a for s in shapes.values()):
        return None
    chans = {n: s[1] if len(s) > 1 else None for n, s in shapes.items()}
    same_rest = all(len(s) == len(a) and s[:1] + s[2:] == a[:1] + a[2:] for s in shapes.values())
    if same_rest and len(a) == 4:
        low = min(chans.values())
        if chans["A"] == max(chans.values()) and low == 4:
            return low
        if chans["A"] == 4:
            other = next(n for n, c in chans.items() if c != 4)
            kind = "instruct-pix2pix" if chans[other] == 8 else "inpainting"
            raise MergeError(f"model {other} is an {kind} model: when merging it with a normal "
                             f"model, it must be model A")
    desc = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    raise MergeError(f"shape mismatch for {key}: {desc}")


def plan_merge(recipe: Recipe, a: Checkpoint, b: Checkpoint | None = None,
               c: Checkpoint | None = None, arch: str | None = None) -> MergePlan:
    """Check everything and resolve every key's ratios. ``arch`` skips detection (for partial
    state dicts such as one component of a model)."""
    recipe.check()
    cm = get_calcmode(recipe.calcmode)
    needed = {"A": a}
    if cm.needs_b:
        needed["B"] = b
    if recipe.uses_c():
        needed["C"] = c
    for n, ck in needed.items():
        if ck is None:
            raise MergeError(f"model {n} is not loaded")
    present = {n: ck for n, ck in (("A", a), ("B", b), ("C", c)) if ck is not None}
    arch = arch or check_same_arch({ck.name: detect_arch(ck.tensors, ck.name) for ck in present.values()})
    notes = check_coverage(needed)
    ratios = RatioPlan(recipe, arch)
    adjust = adjust_factors(recipe.adjust, arch)
    plan = MergePlan(recipe, arch, a, b, c, notes=notes)
    for key, t in a.tensors.items():
        job = KeyJob(key)
        plan.jobs.append(job)
        if not _is_candidate(key, t) or (cm.skip_key and cm.skip_key(key)):
            continue
        if any(key not in ck.tensors for ck in needed.values()):
            continue
        job.ratios = ratios.ratios(key)
        if job.ratios is None:
            continue
        job.channels = _inpaint_channels(key, {n: ck.tensors[key].shape for n, ck in needed.items()})
        job.adjust = adjust.get(key)
    if b is not None:
        for key in b.tensors:
            if key not in a.tensors and "model" in key and key not in POSITION_IDS:
                plan.jobs.append(KeyJob(key, source="b"))
    return plan


def check_inputs(plan: MergePlan) -> None:
    """Raise before any arithmetic if a tensor to be merged holds NaN/Inf (cached per model)."""
    _Runner(plan, check_finite=True)


def _nonfinite(t: torch.Tensor) -> bool:
    """NaN or ±Inf anywhere (one ``aminmax`` pass: NaN propagates, Inf is the min or max;
    about memory speed, 15x faster than an fp32 sum)."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.reshape(-1))
    return not (math.isfinite(lo.item()) and math.isfinite(hi.item()))


class _Runner:
    """Computes one key of a plan."""

    def __init__(self, plan: MergePlan, check_finite: bool, device: str | None = None):
        self.plan, self.device = plan, device
        self.cm = get_calcmode(plan.recipe.calcmode)
        self.ctx = CalcContext(gamma=plan.recipe.gamma)
        self.check_finite = check_finite and not (self._check_inputs() and self._cannot_overflow())

    def _inputs(self):
        r = self.plan.recipe
        for n, ck in (("A", self.plan.a), ("B", self.plan.b), ("C", self.plan.c)):
            if ck is not None and (n != "C" or r.uses_c()):
                yield n, ck

    def _check_inputs(self) -> bool:
        """NaN/Inf in a tensor that will be merged is a clear error before anything is written."""
        merged = {j.key for j in self.plan.jobs if j.ratios is not None}
        for n, ck in self._inputs():
            bad = sorted(ck.value_stats()[0] & merged)
            if bad:
                raise MergeError(f"model {n} ({ck.name}) contains NaN/Inf values in {bad[0]}"
                                 + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""))
        return True

    def _cannot_overflow(self) -> bool:
        """True when the result provably stays finite, so it need not be scanned: the normal
        formulas with |α|, |β| ≤ 1 give |result| ≤ 5·max|input|, checked against the dtype's range."""
        if self.cm.name != "normal" or self.plan.recipe.adjust:
            return False
        ratios = [abs(x) for j in self.plan.jobs if j.ratios is not None for x in j.ratios]
        if any(x > 1 for x in ratios):
            return False
        top = max((ck.value_stats()[1] for _, ck in self._inputs()), default=0.0)
        limit = min(torch.finfo(t.dtype).max for _, ck in self._inputs() for t in ck.tensors.values()
                    if t.is_floating_point()) if ratios else float("inf")
        return 5 * top < limit

    def compute(self, job: KeyJob, out: torch.Tensor | None) -> torch.Tensor:
        p, r = self.plan, self.plan.recipe
        a = self._fetch(p.a.tensors[job.key])
        b = same_dtype(self._fetch(p.b.tensors[job.key]), a) if p.b is not None and job.key in p.b.tensors else None
        c = same_dtype(self._fetch(p.c.tensors[job.key]), a) if p.c is not None and r.uses_c() else None
        alpha, beta = job.ratios
        ctx = CalcContext(key=job.key, gamma=self.ctx.gamma, stats=self.ctx.stats)
        if out is not None and out.dtype != a.dtype:
            if self.cm.elementwise and job.channels is None and job.adjust is None:
                return self._chunked_into(job, a, b, c, out, ctx)
            out = None   # computed in A's dtype, converted by the caller's copy
        if job.channels is None:
            res = self.cm.fn(a, b, c, alpha, beta, mode=r.mode, out=out, ctx=ctx)
        else:
            n = job.channels
            part = lambda x: None if x is None else x[:, :n].contiguous()  # noqa: E731
            merged = self.cm.fn(part(a), part(b), part(c), alpha, beta, mode=r.mode, out=None, ctx=ctx)
            res = out if out is not None else torch.empty_like(a)
            res.copy_(a)
            res[:, :n] = merged
        if job.adjust is not None:
            res = apply_adjust(res, job.adjust)
        if res.dtype != a.dtype:
            res = res.to(a.dtype)
        if self.check_finite and _nonfinite(res):
            self._overflow(job.key)
        return res

    def _chunked_into(self, job, a, b, c, out, ctx) -> torch.Tensor:
        """Elementwise calcmodes into a destination of another dtype (an fp32 pipeline fed by
        fp16 models): each chunk is computed in A's dtype into a cache-sized scratch and then
        converted into ``out``, so the result is exactly the A-dtype merge, at memory speed."""
        scratch = torch.empty(min(out.numel(), CHUNK), dtype=a.dtype, device=a.device)
        alpha, beta = job.ratios
        present = [x is not None for x in (a, b, c)]

        def body(o, *parts):
            it = iter(parts)
            args = [next(it) if p else None for p in present]
            res = self.cm.fn(*args, alpha, beta, mode=self.plan.recipe.mode, out=scratch[: o.numel()], ctx=ctx)
            if self.check_finite and _nonfinite(res):
                self._overflow(job.key)
            o.copy_(res)
        return chunked(out, tuple(x for x in (a, b, c) if x is not None), body, chunk=CHUNK)

    def _fetch(self, t: torch.Tensor) -> torch.Tensor:
        """Inputs move to the merge device key by key (the models stay cached on the CPU)."""
        return t if self.device is None or t.device.type == torch.device(self.device).type \
            else t.to(self.device, non_blocking=True)

    def _overflow(self, key: str):
        """A non-finite result: the inputs of merged keys were checked at start, so the
        arithmetic (ratios) made it."""
        raise MergeError(f"the merge produced NaN/Inf values in {key} "
                         f"(calcmode {self.cm.name}; check the ratios)")


def iter_merge(plan: MergePlan, *, out_for: OutFor | None = None, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None, check_finite: bool = True,
               alloc: Callable | None = None, device: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every output key, in order.

    ``out_for(key, like)`` may return a buffer (shape and dtype of ``like``) that receives the
    key's value; otherwise merged keys get fresh tensors (from ``alloc(shape, dtype)`` when
    given; a calcmode may still return an input unchanged, which is then shared) and kept keys
    are A's (or B's) own tensors, shared, not copied. ``should_stop()`` is polled before each key; a stop raises
    :class:`MergeStopped`. ``device`` (e.g. "cuda") is where the arithmetic runs; inputs are
    moved there one key at a time."""
    runner = _Runner(plan, check_finite, device)
    cm = runner.cm
    if cm.prepare is not None:
        if progress:
            progress(0, len(plan.jobs), "computing similarities")
        runner.ctx.stats = cm.prepare(plan.a.tensors, plan.b.tensors)
    total = len(plan.jobs)
    pool = ThreadPoolExecutor(os.cpu_count() or 2) if cm.parallel else None
    pending: dict[int, object] = {}
    try:
        for i, job in enumerate(plan.jobs):
            if should_stop is not None and should_stop():
                raise MergeStopped()
            if pool is not None:  # keep a window of parallel jobs in flight
                for k in range(i, min(i + 2 * pool._max_workers, total)):
                    jk = plan.jobs[k]
                    if k not in pending and jk.ratios is not None:
                        pending[k] = pool.submit(runner.compute, jk, None)
            src = plan.b if job.source == "b" else plan.a
            like = runner._fetch(src.tensors[job.key])
            out = out_for(job.key, like) if out_for is not None else None
            if job.ratios is None:
                value = like
            elif i in pending:
                value = pending.pop(i).result()
            elif out is None and alloc is not None:
                value = runner.compute(job, alloc(like.shape, like.dtype))
            else:
                value = runner.compute(job, out)
            if out is not None and value is not out:
                out.copy_(value)
                value = out
            if progress:
                progress(i + 1, total, job.key)
            yield job.key, value
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class MergeResult:
    tensors: dict[str, torch.Tensor]
    plan: MergePlan
    seconds: float

    @property
    def arch(self) -> str:
        return self.plan.arch

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe


def merge(recipe: Recipe, a: Checkpoint, b: Checkpoint | None = None, c: Checkpoint | None = None,
          **options) -> MergeResult:
    """Merge into a new state dict (kept keys share A's tensors). Options as :func:`iter_merge`."""
    t0 = time.perf_counter()
    plan = plan_merge(recipe, a, b, c, arch=options.pop("arch", None))
    tensors = dict(iter_merge(plan, **options))
    return MergeResult(tensors, plan, time.perf_counter() - t0)
