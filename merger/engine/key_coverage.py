"""Which model provides which part of a merge, checked before any arithmetic.

A checkpoint is made of components (U-Net, text encoder(s), VAE). Two rules:

* A model that lacks a **whole** component (a file without a VAE, a U-Net + text-encoder
  export) is accepted: that component comes from the models that have it, and the merge says so
  in a note (status line, CLI, history row). SuperMerger does the same silently.
* A model that has a component but only **part** of its tensors is refused, naming the missing
  keys: it is damaged, pruned wrongly or another variant, and merging it would silently keep
  the other model's values in the gaps. So is a tensor that is a float in one model and an
  integer in another.

Keys that real files carry or omit freely (CLIP ``position_ids``, OpenCLIP ``logit_scale``) are
not counted.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import MergeError

COMPONENTS = (("U-Net", "model.diffusion_model."), ("VAE", "first_stage_model."),
              ("text encoder", "cond_stage_model."), ("text encoder 1", "conditioner.embedders.0."),
              ("text encoder 2", "conditioner.embedders.1."))
OPTIONAL_SUFFIXES = ("position_ids", "logit_scale")


def component_of(key: str) -> str | None:
    for name, prefix in COMPONENTS:
        if key.startswith(prefix):
            return name
    return None


def _listing(keys: list[str], n: int = 2) -> str:
    head = ", ".join(keys[:n])
    return head + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_coverage(models: Mapping[str, object]) -> list[str]:
    """``models``: slot ("A", "B", "C") -> Checkpoint, model A first. Raises on a partial
    component or a float/integer clash; returns notes for whole components that some model
    lacks (empty when every model has every component)."""
    by_model: dict[str, dict[str, set[str]]] = {}
    for slot, ck in models.items():
        parts: dict[str, set[str]] = {}
        for key in ck.tensors:
            comp = component_of(key)
            if comp and not key.endswith(OPTIONAL_SUFFIXES):
                parts.setdefault(comp, set()).add(key)
        by_model[slot] = parts
    notes = []
    slots = list(models)
    for comp, _ in COMPONENTS:
        have = [s for s in slots if comp in by_model[s]]
        if not have:
            continue
        union = set().union(*(by_model[s][comp] for s in have))
        for s in have:
            missing = sorted(union - by_model[s][comp])
            if missing:
                other = next(o for o in have if o != s and missing[0] in by_model[o][comp])
                raise MergeError(f"model {s} ({models[s].name}) lacks {len(missing)} {comp} tensor(s) that model "
                                 f"{other} has ({_listing(missing)}): the file is incomplete or another variant "
                                 f"of the architecture")
        lacking = [s for s in slots if s not in have]
        if lacking:   # the engine keeps A's tensor where a model lacks it, else takes B's
            source = "A" if "A" in have else have[0]
            names = ", ".join(f"model {s} ({models[s].name})" for s in lacking)
            notes.append(f"{names} {'has' if len(lacking) == 1 else 'have'} no {comp}: "
                         f"model {source}'s {comp} is used as it is (not merged)")
        for key in sorted(union):
            kinds = {s: models[s].tensors[key].is_floating_point() for s in have if key in models[s].tensors}
            if len(set(kinds.values())) > 1:
                f = next(s for s, v in kinds.items() if v)
                i = next(s for s, v in kinds.items() if not v)
                raise MergeError(f"model {i} ({models[i].name}) has {key} as {models[i].tensors[key].dtype}, "
                                 f"model {f} as {models[f].tensors[key].dtype}: the file is corrupt")
    return notes
