"""Calcmode registry. Each calcmode is one small function in its own module, registered with
:func:`calcmode` (name, the merge modes it works with, and where its formula comes from).

A calcmode function has the signature ``fn(a, b, c, alpha, beta, *, mode, out, ctx)`` and returns
the merged tensor for one key (it may write into ``out``, a tensor shaped and typed like ``a``,
or return ``a`` unchanged). ``b``/``c`` are already in ``a``'s dtype. Adding a calcmode means
adding one module here; it is imported automatically.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from ...errors import MergeError

ALL_MODES = ("weight_sum", "add_difference", "triple_sum", "sum_twice")


@dataclass
class CalcContext:
    """What a calcmode may need beyond the tensors of one key."""
    key: str = ""
    gamma: float = 1.0
    stats: object = None


@dataclass(frozen=True)
class CalcMode:
    name: str
    fn: Callable
    modes: tuple[str, ...]
    reference: str
    needs_b: bool = True
    uses_beta: bool = False
    # keys (by name) this calcmode leaves as model A
    skip_key: Callable[[str], bool] | None = None
    # whole-model pass before merging: prepare(iter of (key, a, b)) -> stats for CalcContext
    prepare: Callable | None = None
    # recipe validation beyond the generic checks
    check: Callable | None = None
    # keys may be computed in parallel threads
    parallel: bool = False
    # each output element depends only on the same element of the inputs: the engine may run
    # the function on flat chunks (to write a differently typed destination at memory speed)
    elementwise: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)


REGISTRY: dict[str, CalcMode] = {}
# SuperMerger's menu order; calcmodes added later are listed after these
MENU_ORDER = ("normal", "cosineA", "cosineB", "trainDifference", "smoothAdd", "smoothAddMT",
              "extract", "tensor", "tensor2", "self")


def calcmode(name: str, *, modes=ALL_MODES, reference: str, **options):
    """Register the decorated per-key function as calcmode ``name``."""
    def register(fn):
        cm = CalcMode(name=name, fn=fn, modes=tuple(modes), reference=reference, **options)
        for n in (name, *cm.aliases):
            if n in REGISTRY:
                raise RuntimeError(f"calcmode {n!r} registered twice")
            REGISTRY[n] = cm
        return fn
    return register


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_calcmode(name: str) -> CalcMode:
    if name not in REGISTRY:
        raise MergeError(f"unknown calcmode {name!r}; choose one of {', '.join(calcmode_names())}")
    return REGISTRY[name]


def calcmode_names(mode: str | None = None) -> list[str]:
    """Calcmode names (each once), optionally only those valid with merge ``mode``."""
    names = [n for n, cm in REGISTRY.items() if n == cm.name and (mode is None or mode in cm.modes)]
    rank = {n: i for i, n in enumerate(MENU_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


_load_all()
