"""The merge loop: stream the merged tensors of a plan (:mod:`.plan`).

``iter_merge`` yields ``(key, tensor)`` in output
order, computing each merged tensor straight into a caller-supplied buffer when there is one
(the resident pipeline's parameter, a reusable arena) and never copying kept tensors of A.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import MergeError, MergeStopped
from ..files.checkpoint_io import Checkpoint
from ..recipe import Recipe
from .adjust import apply_adjust
from .calcmodes import CalcContext, get_calcmode
from .kernels.fp8 import copy_into, to_dtype
from .methods import INPUT_STATS, get_method, method_args, stack_taus, with_second
from .plan import KeyJob, MergePlan, plan_merge
from .tensor_ops import CHUNK, chunked, finite_top, is_fp8, release_scratch, same_dtype, scratch, work_dtype

Progress = Callable[[int, int, str], None]
OutFor = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def check_inputs(plan: MergePlan, should_stop: Callable[[], bool] | None = None, device: str | None = None,
                 progress: Progress | None = None) -> None:
    """Raise before any result is made if a tensor to be merged holds NaN/Inf (cached per model).
    For a method with a prefetch (TIES) the check comes after it, which reads the inputs anyway
    and finds their NaN/Inf on the way (the memos it fills serve the merge on ``device`` that
    follows); a stop during it raises :class:`MergeStopped`."""
    runner = _Runner(plan, check_finite=True, device=device)
    if runner.prefetches() and not runner.prefetch(should_stop, progress=progress):
        raise MergeStopped()


def prepare(plan: MergePlan, should_stop: Callable[[], bool] | None = None, device: str | None = None) -> bool:
    """Do ahead of the merge of ``plan``, on the calling thread alone, what does not depend on λ:
    the inputs' NaN/Inf check and the method's memos (TIES: every key's thresholds, kept by the
    base model, where a merge of the same models on ``device`` finds them). For the background
    warm-up of picked models (:mod:`...files.warmup`); ``should_stop()`` is polled before each
    key (stopped, the check is left to the merge). True where there was a prefetch to do.
    Raises :class:`MergeError` as the merge would."""
    runner = _Runner(plan, check_finite=True, device=device)
    if not runner.prefetches():
        return False
    runner.prefetch(should_stop, serial=True)
    return True


SATURATING = (torch.float8_e4m3fn, torch.float32)   # casts that never make a finite value non-finite


def _nonfinite(t: torch.Tensor) -> bool:
    """NaN or ±Inf anywhere (:func:`.tensor_ops.finite_top`: about memory speed, 15x faster
    than an fp32 sum)."""
    return not finite_top(t)[0]


class _Runner:
    """Computes one key of a plan."""

    def __init__(self, plan: MergePlan, check_finite: bool, device: str | None = None, per_key: bool = False):
        self.plan, self.device, self.per_key = plan, device, per_key
        self._moved: dict[str, dict[int, torch.Tensor]] = {}     # per key: its inputs on the device
        self.cm = get_calcmode(plan.recipe.calcmode)
        self.ctx = CalcContext(gamma=plan.recipe.gamma)
        self.method = get_method(plan.recipe.method) if plan.recipe.method else None
        self.method_args = method_args(plan.recipe) if self.method else None
        self.check_finite = check_finite
        # the up-front NaN/Inf check (not ``per_key``: there inputs are checked key by key as they
        # are read, one pass over files larger than RAM); after the prefetch where there is one
        self._unchecked = check_finite and not per_key
        self._checking = threading.Lock()
        if not self.prefetches():
            self.check()

    def check(self) -> None:
        """The up-front check of every merged input for NaN/Inf (once); whether results need a
        scan for overflow too."""
        with self._checking:
            if self._unchecked:
                self.check_finite = not (self._check_inputs() and self._cannot_overflow())
                self._unchecked = False

    def _inputs(self):
        r = self.plan.recipe
        for n, ck in (("A", self.plan.a), ("B", self.plan.b), ("C", self.plan.c)):
            if ck is not None and (n != "C" or r.uses_c()):
                yield n, ck
        for i, ck in enumerate(self.plan.models, 1):
            yield f"M{i}", ck

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
        formulas with |α|, |β| ≤ 1 give |result| ≤ 5·max|input|; a method whose merge of the task
        vectors is at most g·max|τᵢ| (``Method.growth``) gives |BASE + λ·merge| ≤ (1 + 2g·|λ|)·max|input|,
        as |τᵢ| ≤ 2·max|input|. Checked against the dtypes' range, with 1% to spare."""
        if self.cm.name != "normal" or self.plan.recipe.adjust:
            return False
        ratios = [abs(x) for j in self.plan.jobs if j.ratios is not None for x in j.ratios]
        if self.method:
            g = self.method.growth(self.method_args) if self.method.growth else None
            if g is None:
                return False
            lams = [abs(j.ratios[0]) for j in self.plan.jobs if j.ratios is not None]
            factor = 1 + 2 * g * max(lams, default=0.0)
        elif any(x > 1 for x in ratios):
            return False
        else:
            factor = 5
        top = max((ck.value_stats()[1] for _, ck in self._inputs()), default=0.0)
        limit = min(torch.finfo(t.dtype).max for _, ck in self._inputs() for t in ck.tensors.values()
                    if t.is_floating_point()) if ratios else float("inf")
        return factor * top * 1.01 < limit

    def prefetches(self) -> bool:
        """Whether the method fills its memos up front (on the CPU, also for a merge on a GPU),
        not where each key's inputs are read once as it is merged (``per_key``: inputs larger
        than RAM)."""
        return self.method is not None and self.method.prefetch is not None and not self.per_key

    def prefetch(self, should_stop: Callable[[], bool] | None, serial: bool = False,
                 progress: Progress | None = None) -> bool:
        """The method's prefetch, then :meth:`check`, skipping the inputs the prefetch read
        (``INPUT_STATS``). False, unchecked, where ``should_stop()`` stopped it."""
        p = self.plan
        jobs = [j for j in p.jobs if j.ratios is not None and j.channels is None]
        items = [(p.a.tensors[j.key], [ck.tensors[j.key] for ck in p.models],
                  with_second(self.method, self.method_args, j.ratios[1]), self._memo(j.key)) for j in jobs]
        on_device = self.device is not None and torch.device(self.device).type != "cpu"
        if progress:
            progress(0, len(p.jobs), f"{self.method.name}: preparing")
        self.method.prefetch(items, should_stop, every_size=on_device, serial=serial)
        if should_stop is not None and should_stop():
            return False
        for j, (_, _, _, memo) in zip(jobs, items):
            for ck, (finite, top) in zip((p.a, *p.models), memo.get(INPUT_STATS, ())):
                ck.note_stats(j.key, ck.tensors[j.key], finite, top)
        self.check()
        return True

    def _check_key(self, key: str) -> None:
        """``per_key``: NaN/Inf in this key's inputs is the same clear error as the up-front check."""
        for n, ck in self._inputs():
            t = ck.tensors.get(key)
            if t is not None and t.is_floating_point() and _nonfinite(t):
                raise MergeError(f"model {n} ({ck.name}) contains NaN/Inf values in {key}")

    def compute(self, job: KeyJob, out: torch.Tensor | None) -> torch.Tensor:
        self.check()                       # nothing is computed from unchecked inputs
        if self.per_key and self.check_finite:
            self._check_key(job.key)
        if self.method is not None:
            return self._finish(job, self._compute_method(job, out))
        p, r = self.plan, self.plan.recipe
        a = self._fetch(p.a.tensors[job.key], job.key)
        b = self._fetch(p.b.tensors[job.key], job.key) if p.b is not None and job.key in p.b.tensors else None
        c = self._fetch(p.c.tensors[job.key], job.key) if p.c is not None and r.uses_c() else None
        alpha, beta = job.ratios
        ctx = CalcContext(key=job.key, gamma=self.ctx.gamma, stats=self.ctx.stats)
        if any(x is not None and is_fp8(x.dtype) for x in (a, b, c)):
            return self._compute_fp8(job, a, b, c, out, ctx)
        b, c = same_dtype(b, a), same_dtype(c, a)
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
        return self._finish(job, res)

    def _compute_fp8(self, job: KeyJob, a, b, c, out, ctx) -> torch.Tensor:
        """A key where a model holds float8: computed in :func:`work_dtype` of A's dtype (float32
        for float8 A; a bf16/fp16 A computes in its own dtype, the float8 inputs upcast exactly),
        rounded to A's dtype. Elementwise calcmodes upcast chunk by chunk into cache-sized
        scratch; the others upcast the key's tensors whole (one key at a time)."""
        work = work_dtype(a.dtype)
        if self.cm.elementwise and job.channels is None and job.adjust is None:
            res = out if out is not None else torch.empty_like(a)
            n = min(a.numel(), CHUNK)
            bufs = [scratch(f"fp8-{k}", n, work, a.device) for k in range(4)]     # reused key to key
            present = [x is not None for x in (a, b, c)]
            alpha, beta = job.ratios

            def body(o, *parts):
                it = iter(parts)
                args = []
                for k, here in enumerate(present):
                    if here:
                        x = next(it)
                        args.append(copy_into(bufs[k][: x.numel()], x))     # float8 by table
                    else:
                        args.append(None)
                val = self.cm.fn(*args, alpha, beta, mode=self.plan.recipe.mode, out=bufs[3][: o.numel()], ctx=ctx)
                # checked while the chunk is in cache, so _finish need not scan the result again:
                # NaN/Inf before the cast (torch's cast to e4m3fn saturates, even Inf becomes
                # 448), and after it for the float8 formats whose cast can overflow to Inf (e5m2)
                if self.check_finite and _nonfinite(val):
                    self._overflow(job.key)
                o.copy_(val)
                if self.check_finite and o.dtype not in SATURATING and _nonfinite(o):
                    self._overflow(job.key)
            chunked(res, tuple(x for x in (a, b, c) if x is not None), body, chunk=CHUNK)
            return self._finish(job, res, checked=res.dtype == a.dtype)
        up = [None if x is None else to_dtype(x, work) for x in (a, b, c)]
        alpha, beta = job.ratios
        if job.channels is None:
            val = self.cm.fn(*up, alpha, beta, mode=self.plan.recipe.mode, out=None, ctx=ctx)
        else:
            n = job.channels
            val = up[0].clone()
            val[:, :n] = self.cm.fn(*(None if x is None else x[:, :n].contiguous() for x in up), alpha, beta,
                                    mode=self.plan.recipe.mode, out=None, ctx=ctx)
        if self.check_finite and _nonfinite(val):
            self._overflow(job.key)
        return self._finish(job, val)

    def _finish(self, job: KeyJob, res: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """Adjust, A's dtype, and the overflow check common to every merged key (``checked``:
        the caller already checked ``res`` in A's dtype)."""
        if job.adjust is not None:
            res = apply_adjust(res, job.adjust)
        dtype = self.plan.a.tensors[job.key].dtype
        if res.dtype != dtype:
            res = res.to(dtype)
        if self.check_finite and not checked and _nonfinite(res):
            self._overflow(job.key)
        return res

    def _memo(self, key: str) -> dict:
        """A dict in which a fused method keeps, per key and set of models, what does not depend
        on λ (TIES: its thresholds), so that changing only α re-merges at the speed of one pass.
        Held by the base Checkpoint and valid while the very same model objects are loaded (a
        reloaded file is a new object, so nothing stale is ever used; loaded tensors are never
        changed in place)."""
        store = self.plan.a.__dict__.setdefault("_method_memo", {})
        ids = (key, tuple(id(ck) for ck in self.plan.models))
        entry = store.get(ids)
        if entry is None or any(ref() is not ck for ref, ck in zip(entry[0], self.plan.models)):
            if len(store) > 50_000:                   # forget model sets that are gone
                for k in [k for k, (refs, _) in store.items() if any(r() is None for r in refs)]:
                    del store[k]
            entry = store[ids] = ([weakref.ref(ck) for ck in self.plan.models], {})
        return entry[1]

    def _compute_method(self, job: KeyJob, out: torch.Tensor | None) -> torch.Tensor:
        """BASE + λ·method(τ₁…τₙ) for one key, τᵢ = Mᵢ − BASE stacked in float32 (the per-key
        scratch: n × the key's size; nothing else of the N models is held). An inpainting base
        merges its first ``channels`` input channels and keeps the rest."""
        p = self.plan
        base = self._fetch(p.a.tensors[job.key], job.key)
        lam, second = job.ratios
        args = with_second(self.method, self.method_args, second)
        if self.method.fused is not None and job.channels is None:
            # the models' tensors as stored (on the CPU): a fused path copies them to the base's
            # device itself where it runs there (TIES on a GPU, its thresholds prefetched)
            models = [ck.tensors[job.key] for ck in p.models]
            dtype = torch.float32 if job.adjust is not None else base.dtype
            into = out if _writable_into(out, base, dtype, models) else None
            res = self.method.fused(base, models, lam, args, dtype, self._memo(job.key), into)
            if res is not None:
                return res
        part = (lambda x: x) if job.channels is None else (lambda x: x[:, :job.channels])  # noqa: E731
        b = part(base).float()
        taus = stack_taus(b, len(p.models), (part(self._fetch(ck.tensors[job.key], job.key)) for ck in p.models))
        gen = None
        if self.method.random:
            gen = torch.Generator(device=b.device).manual_seed(p.recipe.seed)
        delta = self.method.fn(taus, args, gen)
        delta = delta.mul_(lam).add_(b)
        if job.channels is None:
            return delta              # rounded to the base's dtype by _finish, as every merge
        res = out if out is not None and out.dtype == base.dtype else torch.empty_like(base)
        res.copy_(base)
        res[:, :job.channels] = delta
        return res

    def _chunked_into(self, job, a, b, c, out, ctx) -> torch.Tensor:
        """Elementwise calcmodes into a destination of another dtype (an fp32 pipeline fed by
        fp16 models): each chunk is computed in A's dtype into a cache-sized scratch and then
        converted into ``out``, so the result is exactly the A-dtype merge, at memory speed."""
        buf = torch.empty(min(out.numel(), CHUNK), dtype=a.dtype, device=a.device)
        alpha, beta = job.ratios
        present = [x is not None for x in (a, b, c)]

        def body(o, *parts):
            it = iter(parts)
            args = [next(it) if p else None for p in present]
            res = self.cm.fn(*args, alpha, beta, mode=self.plan.recipe.mode, out=buf[: o.numel()], ctx=ctx)
            if self.check_finite and _nonfinite(res):
                self._overflow(job.key)
            o.copy_(res)
        return chunked(out, tuple(x for x in (a, b, c) if x is not None), body, chunk=CHUNK)

    def _fetch(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """Inputs move to the merge device key by key (the models stay cached on the CPU), each
        once per key: the output's template and the first input are the same tensor of A (copied
        twice before, 1.5 copies per input of a weight sum instead of 1)."""
        if self.device is None or t.device.type == torch.device(self.device).type:
            return t
        moved = self._moved.setdefault(key, {})
        found = moved.get(id(t))
        if found is None:
            found = moved[id(t)] = t.to(self.device, non_blocking=True)
        return found

    def done(self, key: str) -> None:
        """The merge loop has handed ``key`` on: its inputs' device copies are dropped."""
        self._moved.pop(key, None)

    def _overflow(self, key: str):
        """A non-finite result: the inputs of merged keys were checked at start, so the
        arithmetic (ratios) made it."""
        raise MergeError(f"the merge produced NaN/Inf values in {key} "
                         f"(calcmode {self.cm.name}; check the ratios)")


def _writable_into(out: torch.Tensor | None, base: torch.Tensor, dtype: torch.dtype,
                   inputs: list[torch.Tensor]) -> bool:
    """Whether a fused method may write a key straight into the caller's ``out``: a contiguous
    buffer of the result's shape, dtype and device that shares memory with none of the inputs."""
    if out is None or out.dtype != dtype or out.shape != base.shape or out.device != base.device \
            or not out.is_contiguous():
        return False
    ptr = out.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() != ptr for t in (base, *inputs))


def iter_merge(plan: MergePlan, *, out_for: OutFor | None = None, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None, check_finite: bool = True,
               alloc: Callable | None = None, device: str | None = None,
               per_key_checks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every output key, in order.

    ``out_for(key, like)`` may return a buffer (shape and dtype of ``like``) that receives the
    key's value; otherwise merged keys get fresh tensors (from ``alloc(shape, dtype)`` when
    given; a calcmode may still return an input unchanged, which is then shared) and kept keys
    are A's (or B's) own tensors, shared, not copied. ``should_stop()`` is polled before each key; a stop raises
    :class:`MergeStopped`. ``device`` (e.g. "cuda") is where the arithmetic runs; inputs are
    moved there one key at a time. ``per_key_checks`` checks each key's inputs for NaN/Inf when
    it is computed instead of all of them first: for a consumer that can drop what it has
    (a streamed save to a temp file), it reads inputs larger than RAM once instead of twice."""
    runner = _Runner(plan, check_finite, device, per_key_checks)
    cm = runner.cm
    if cm.prepare is not None:
        if progress:
            progress(0, len(plan.jobs), "computing similarities")
        runner.ctx.stats = cm.prepare(plan.a.tensors, plan.b.tensors)
    total = len(plan.jobs)
    if runner.prefetches() and not runner.prefetch(should_stop, progress=progress):
        raise MergeStopped()
    # methods (calcmode normal) run keys in turn: their ops use every core, and in parallel
    # threads they ran 1.4x slower on 2 cores
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
            like = runner._fetch(plan.source(job).tensors[job.key], job.key)
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
            runner.done(job.key)
            if progress:
                progress(i + 1, total, job.key)
            yield job.key, value
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        release_scratch()


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
    """Merge into a new state dict (kept keys share A's tensors). Options as :func:`iter_merge`,
    plus ``arch`` and ``models`` (a method's M1…Mn) as :func:`plan_merge`."""
    t0 = time.perf_counter()
    plan = plan_merge(recipe, a, b, c, arch=options.pop("arch", None), models=options.pop("models", ()))
    tensors = dict(iter_merge(plan, **options))
    return MergeResult(tensors, plan, time.perf_counter() - t0)
