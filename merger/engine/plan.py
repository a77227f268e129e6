"""Planning a merge: check everything that can be checked before any arithmetic (architectures,
shapes, key coverage, MBW lengths, elemental syntax) and resolve each key's ratios."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import check_same_arch, detect_arch
from ..errors import MergeError
from ..files.checkpoint_io import Checkpoint
from ..recipe import Recipe
from .adjust import adjust_factors
from .calcmodes import get_calcmode
from .key_coverage import check_coverage
from .methods import get_method
from .ratios import RatioPlan

POSITION_IDS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


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
    models: list[Checkpoint] = field(default_factory=list)   # a method's M1…Mn (A is the base)

    def source(self, job: KeyJob) -> Checkpoint:
        """The checkpoint whose tensor a job starts from (its shape and dtype are the output's)."""
        return self.b if job.source == "b" else self.models[0] if job.source == "m1" else self.a

    @property
    def merged_keys(self) -> list[str]:
        return [j.key for j in self.jobs if j.ratios is not None]

    def output_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """key -> (shape, dtype) of the merged state dict, known before merging."""
        spec = {}
        for j in self.jobs:
            t = self.source(j).tensors[j.key]
            spec[j.key] = (tuple(t.shape), t.dtype)
        return spec


def _is_candidate(key: str, t: torch.Tensor, arch: str = "") -> bool:
    """SuperMerger merges keys whose name contains "model" (any key, for Flux) and "weight" or
    "bias"; EMA copies (``model_ema.*``) stay model A's, as A1111 ignores them (``Recipe.ema``
    merges them instead of the U-Net, see :meth:`Checkpoint.ema_view`)."""
    return (("model" in key or arch == "flux") and ("weight" in key or "bias" in key) and t.is_floating_point()
            and not key.startswith("model_ema."))


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


def _needed(recipe: Recipe, a, b, c, models) -> dict[str, Checkpoint]:
    """Slot name -> checkpoint of every model the recipe reads (refusing missing ones)."""
    if recipe.method:
        if len(models) != len(recipe.models):
            raise MergeError(f"{recipe.method} needs {len(recipe.models)} models loaded, got {len(models)}")
        needed = {"A": a, **{f"M{i}": m for i, m in enumerate(models, 1)}}
    else:
        needed = {"A": a}
        if recipe.uses_b():
            needed["B"] = b
        if recipe.uses_c():
            needed["C"] = c
    for n, ck in needed.items():
        if ck is None:
            raise MergeError(f"model {n} is not loaded")
    return needed


def plan_merge(recipe: Recipe, a: Checkpoint, b: Checkpoint | None = None,
               c: Checkpoint | None = None, arch: str | None = None,
               models: list[Checkpoint] | tuple = ()) -> MergePlan:
    """Check everything and resolve every key's ratios. ``models`` are a method recipe's
    M1…Mn (``a`` is its base). ``arch`` skips detection (for partial state dicts such as one
    component of a model)."""
    recipe.check()
    cm = get_calcmode(recipe.calcmode)
    if recipe.ema:
        a, b, c = (None if ck is None else ck.ema_view() for ck in (a, b, c))
        models = [ck.ema_view() for ck in models]
    needed = _needed(recipe, a, b, c, models)
    present = dict(needed) if recipe.method else {n: ck for n, ck in (("A", a), ("B", b), ("C", c)) if ck is not None}
    arch = arch or check_same_arch({ck.name: ck.cached("arch", lambda ck=ck: detect_arch(ck.tensors, ck.name))
                                    for ck in present.values()})
    # what depends only on the models is kept with model A: an XYZ cell or search trial re-plans
    # the same models with other ratios (10 of the 30 ms a plan took for SD1's 1,100 keys)
    first = next(iter(needed.values()))
    notes = list(first.cached(("coverage", arch, tuple((n, id(ck), ck.stamp()) for n, ck in needed.items())),
                              lambda: check_coverage(needed, arch)))
    ratios = RatioPlan(recipe, arch)
    adjust = adjust_factors(recipe.adjust, arch)
    plan = MergePlan(recipe, arch, a, None if recipe.method else b, None if recipe.method else c,
                     notes=notes, models=list(models) if recipe.method else [])
    second = get_method(recipe.method).second if recipe.method else None
    for key, t in a.tensors.items():
        job = KeyJob(key)
        plan.jobs.append(job)
        if not _is_candidate(key, t, arch) or (cm.skip_key and cm.skip_key(key)):
            continue
        if any(key not in ck.tensors for ck in needed.values()):
            continue
        job.ratios = ratios.ratios(key)
        if job.ratios is None:
            continue
        if second and not 0 <= job.ratios[1] <= 1:
            raise MergeError(f"{second} must be between 0 and 1; the β value {job.ratios[1]:g} for {key} "
                             f"(block {ratios.block(key)}) is not")
        job.channels = _inpaint_channels(key, {n: ck.tensors[key].shape for n, ck in needed.items()})
        job.adjust = adjust.get(key)
    extra, slot = (plan.models[0], "m1") if plan.models else (plan.b, "b")
    if extra is not None and arch != "flux":     # SuperMerger adds no B-only keys to a Flux merge
        for key in extra.tensors:
            if key not in a.tensors and "model" in key and key not in POSITION_IDS:
                plan.jobs.append(KeyJob(key, source=slot))
    return plan


def plan_for(recipe: Recipe, loaded: dict[str, Checkpoint]) -> MergePlan:
    """:func:`plan_merge` from the checkpoints of ``recipe.slots()`` (``a``, ``b``, ``c``,
    ``m1``…), as the CLI and the workstation load them."""
    return plan_merge(recipe, loaded["a"], loaded.get("b"), loaded.get("c"),
                      models=[loaded[s] for s, _, _ in recipe.slots() if s.startswith("m")])
