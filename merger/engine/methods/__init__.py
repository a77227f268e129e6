"""N-model merge methods over task vectors (beyond SuperMerger). Each method is one module here,
registered with :func:`method`, and imported automatically.

A recipe with a ``method`` names a BASE (``model_a``) and models M1…Mn (``models``). For each
merged key the engine stacks the task vectors τᵢ = Mᵢ − BASE in float32 into one tensor of shape
``(n, *shape)`` and calls ``fn(taus, args, generator)``, which returns merge(τ₁…τₙ) in float32
as a new tensor (it may overwrite ``taus``, a reused per-thread buffer). A method may also give a
``fused`` function that computes the whole key from the inputs in one loop (numba's
:mod:`..kernels`, or Inductor's :mod:`..compiled`); the engine tries it first. The result is BASE + λ·merge(τ), with λ the key's α (scalar, MBW
vector or elemental) and the method's second parameter (density or drop) the key's β.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from ...errors import MergeError
from ..tensor_ops import scratch

MAX_MODELS = 8
SIGNS = ("sum", "count")
STOCKS = ("tensor", "row")


@dataclass(frozen=True)
class MethodArgs:
    """A method's parameters for one key (``density``/``drop`` may vary per block)."""
    weights: tuple[float, ...]
    density: float = 1.0
    drop: float = 0.0
    sign: str = "sum"
    della_eps: float = 0.1
    stock: str = "tensor"
    seed: int = 0                    # random methods: the generator's seed for every key

    def weight_tensor(self, n: int) -> torch.Tensor:
        return torch.tensor(self.weights or (1.0,) * n, dtype=torch.float32)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    reference: str
    formula: str
    second: str | None = None        # the recipe field β sets per block: "density" or "drop"
    random: bool = False             # uses the recipe's seed
    uses_weights: bool = True
    min_models: int = 1
    defaults: dict = field(default_factory=dict)
    reads: tuple[str, ...] = ()      # recipe fields that change its result (besides λ and weights)
    # optional fused path: fused(base, models, λ, args, out_dtype, memo, out) -> BASE + λ·merge(τ)
    # straight from the inputs (any float dtypes; the models as stored, on the CPU), or None to take
    # the stacked path; results equal fn's. Where ``base`` is on another device (a GPU) it may use
    # only what the prefetch put in the memo.
    # ``memo`` (a dict per key and model set, or None) keeps what does not depend on λ; ``out``
    # (None, or a contiguous buffer of base's shape and out_dtype that aliases no input) receives
    # the result, which is then ``out`` itself.
    fused: Callable | None = None
    # optional: prefetch(items, should_stop, every_size, serial) fills the memos of the keys ``fused``
    # will compute, items = [(base, models, args, memo)] with the inputs on the CPU, before the first
    # key (TIES: every key's thresholds); ``every_size``: also keys too small for a fused CPU kernel,
    # as a merge on a GPU asks (its fused path takes every key whose memo is filled); ``serial``: all
    # on the calling thread (a background warm-up ahead of the merge: engine.run.prepare). A
    # prefetch that reads every input of a key anyway may leave memo[INPUT_STATS] = ((finite,
    # largest |value|) of base, of each model): the engine's NaN/Inf check then reads that key
    # no more (it checks after the prefetch and before any result is made)
    prefetch: Callable | None = None
    # optional: growth(args) -> g with |merge(τ₁…τₙ)| ≤ g·maxᵢ|τᵢ| element by element, or None where
    # no such bound holds; lets the engine skip scanning results that cannot overflow
    growth: Callable | None = None


REGISTRY: dict[str, Method] = {}
INPUT_STATS = "input_stats"          # a memo's entry: see Method.prefetch


def remembered(memo: dict | None, tag, make: Callable[[], object]):
    """``memo[tag]`` if the key's memo holds it, else ``make()``, kept there (where there is a
    memo) for the next merge of the same loaded models: what a fused path computes that does not
    depend on λ (TIES's thresholds, the median's final weights, Model Stock's t)."""
    if memo is not None and tag in memo:
        return memo[tag]
    value = make()
    if memo is not None:
        memo[tag] = value
    return value


def stack_taus(b: torch.Tensor, n: int, models: Iterable[torch.Tensor]) -> torch.Tensor:
    """τᵢ = Mᵢ − ``b`` (``b`` the base in float32) for the ``n`` ``models``, stacked in float32 in
    the per-key scratch, shape ``(n, *b.shape)``: each model converted, then ``b`` subtracted
    (exact τ; 2x faster than one mixed-dtype subtraction). ``models`` is consumed one at a time,
    so a merge on a GPU holds one model's copy at once."""
    taus = scratch("taus", n * b.numel(), torch.float32, b.device).view((n,) + tuple(b.shape))
    for i, m in enumerate(models):
        taus[i].copy_(m)
        taus[i].sub_(b)
    return taus


def method(name: str, *, reference: str, formula: str, **options):
    """Register the decorated ``fn(taus, args, generator) -> delta`` as method ``name``."""
    def register(fn):
        if name in REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        REGISTRY[name] = Method(name=name, fn=fn, reference=reference, formula=formula, **options)
        return fn
    return register


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise MergeError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return REGISTRY[name]


MENU_ORDER = ("ties", "dare_ties", "dare_linear", "della", "model_stock", "geometric_median")


def method_names() -> list[str]:
    rank = {n: i for i, n in enumerate(MENU_ORDER)}
    return sorted(REGISTRY, key=lambda n: (rank.get(n, len(rank)), n))


def _unit(value, what: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise MergeError(f"{what} must be between 0 and 1, got {value!r}")


def check_method_recipe(r) -> None:
    """Everything about a method recipe that does not need the files (the boundary check)."""
    m = get_method(r.method)
    if not r.model_a:
        raise MergeError(f"{m.name} needs a base model (model A / --base)")
    n = len(r.models)
    if not m.min_models <= n <= MAX_MODELS:
        raise MergeError(f"{m.name} merges {m.min_models} to {MAX_MODELS} models besides the base; "
                         f"{n} given")
    if any(not isinstance(x, str) or not x for x in r.models):
        raise MergeError("every model of the method must be named")
    if r.calcmode != "normal":
        raise MergeError(f"calcmode {r.calcmode!r} cannot be combined with method {m.name} (use normal)")
    if r.weights is not None:
        if not m.uses_weights:
            raise MergeError(f"{m.name} takes no per-model weights")
        if len(r.weights) != n or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in r.weights):
            raise MergeError(f"weights: {n} finite numbers needed (one per model), got {r.weights!r}")
        if sum(r.weights) == 0:
            raise MergeError("weights must not sum to zero")
    for name in ("density", "drop"):
        if getattr(r, name) is not None:
            _unit(getattr(r, name), name)
    if r.sign not in SIGNS:
        raise MergeError(f"sign must be one of {', '.join(SIGNS)}")
    if r.stock not in STOCKS:
        raise MergeError(f"stock must be one of {', '.join(STOCKS)}")
    if not isinstance(r.della_eps, (int, float)) or not math.isfinite(r.della_eps) or r.della_eps < 0:
        raise MergeError(f"della_eps must be a number ≥ 0, got {r.della_eps!r}")
    if m.random and not (isinstance(r.seed, int) and 0 <= r.seed < 2**63):
        raise MergeError(f"{m.name} needs a seed ≥ 0 (got {r.seed!r})")


def method_args(r) -> MethodArgs:
    return MethodArgs(weights=tuple(float(w) for w in r.weights) if r.weights else (),
                      density=1.0 if r.density is None else float(r.density),
                      drop=0.0 if r.drop is None else float(r.drop),
                      sign=r.sign, della_eps=float(r.della_eps), stock=r.stock, seed=max(int(r.seed), 0))


def with_second(m: Method, args: MethodArgs, value: float) -> MethodArgs:
    """The args of one key, whose β (block vector) sets the method's second parameter."""
    if m.second is None or getattr(args, m.second) == value:
        return args
    return replace(args, **{m.second: value})


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_load_all()
