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
not counted, and neither are the **optional parts** of :func:`optional_part` (after sd-mecha's
``sdxl-sgm`` config): text-encoder layers a pipeline does not use, which some exports drop. A
model lacking one merges with the others' (noted); :mod:`merger.pipeline.resident` then decides
what generation can do without.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..errors import MergeError

COMPONENTS = (("U-Net", "model.diffusion_model."), ("VAE", "first_stage_model."),
              ("text encoder", "cond_stage_model."), ("text encoder 1", "conditioner.embedders.0."),
              ("text encoder 2", "conditioner.embedders.1."),
              # Flux.1 all-in-one files (the transformer is under the U-Net prefix)
              ("CLIP-L", "text_encoders.clip_l."), ("T5-XXL", "text_encoders.t5xxl."), ("Flux VAE", "vae."))
OPTIONAL_SUFFIXES = ("position_ids", "logit_scale")
UNUSED, SKIPPABLE, NEEDED = "unused", "skippable", "needed"   # what generation does without a part

# (arch, pattern with a "last layer" placeholder {L}/{G}, use, description)
_OPTIONAL = (
    ("sdxl", r"conditioner\.embedders\.0\.transformer\.text_model\.(encoder\.layers\.{L}\.|final_layer_norm\.)",
     UNUSED, "CLIP-L's last layer and final norm (SDXL does not use them)"),
    ("sdxl", r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.{G}\.",
     SKIPPABLE, "CLIP-G's last block (it only feeds the pooled embedding)"),
    ("sdxl", r"conditioner\.embedders\.1\.model\.(ln_final\.|text_projection)",
     NEEDED, "CLIP-G's final norm and projection (the pooled embedding)"),
    ("sd2", r"cond_stage_model\.model\.transformer\.resblocks\.{G}\.",
     UNUSED, "OpenCLIP's last block (SD 2.x does not use it)"),
    ("sd2", r"cond_stage_model\.model\.text_projection",
     UNUSED, "OpenCLIP's text projection (SD 2.x does not use it)"),
)


def last_layers(keys: Iterable[str]) -> dict[str, int]:
    """The last CLIP-L encoder layer ("L") and OpenCLIP block ("G") index among ``keys``."""
    out = {"L": -1, "G": -1}
    for k in keys:
        if m := re.search(r"(?:embedders\.0\.transformer|cond_stage_model\.transformer)\.text_model\.encoder\.layers\.(\d+)\.", k):
            out["L"] = max(out["L"], int(m[1]))
        elif m := re.search(r"\.transformer\.resblocks\.(\d+)\.", k):
            out["G"] = max(out["G"], int(m[1]))
    return out


def optional_part(key: str, arch: str, last: Mapping[str, int]) -> tuple[str, str] | None:
    """(use, description) when ``key`` belongs to a part files may omit, else None. ``last``:
    :func:`last_layers` of the keys in play (tiny test models have fewer layers than real ones)."""
    for a, pattern, use, desc in _OPTIONAL:
        if a == arch and re.match(pattern.format(L=last["L"], G=last["G"]), key):
            return use, desc
    return None


def component_of(key: str) -> str | None:
    for name, prefix in COMPONENTS:
        if key.startswith(prefix):
            return name
    return None


def _listing(keys: list[str], n: int = 2) -> str:
    head = ", ".join(keys[:n])
    return head + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_coverage(models: Mapping[str, object], arch: str | None = None) -> list[str]:
    """``models``: slot ("A", "B", "C", "M1"…) -> Checkpoint, model A first. Raises on a partial
    component or a float/integer clash; returns notes for whole components, and optional parts,
    that some model lacks (empty when every model has everything)."""
    slots = list(models)
    last = last_layers(k for ck in models.values() for k in ck.tensors)
    optional: dict[str, tuple[str, str]] = {}
    by_model: dict[str, dict[str, set[str]]] = {}
    for slot, ck in models.items():
        parts: dict[str, set[str]] = {}
        for key in ck.tensors:
            comp = component_of(key)
            if not comp or key.endswith(OPTIONAL_SUFFIXES):
                continue
            opt = optional_part(key, arch, last) if arch else None
            if opt:
                optional[key] = opt
            else:
                parts.setdefault(comp, set()).add(key)
        by_model[slot] = parts
    notes = []
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
        if lacking and arch == "flux" and slots[0] in lacking:    # SuperMerger: only A's keys
            notes.append(f"model {slots[0]} ({models[slots[0]].name}) has no {comp}: the result has none either "
                         f"(a Flux merge keeps model A's parts; the other models' {comp} is not used)")
        elif lacking:   # the engine keeps A's tensor where a model lacks it, else takes B's
            notes.append(_lack_note(models, lacking, have, comp, f"{comp} is used as it is"))
        for key in sorted(union):
            kinds = {s: models[s].tensors[key].is_floating_point() for s in have if key in models[s].tensors}
            if len(set(kinds.values())) > 1:
                f = next(s for s, v in kinds.items() if v)
                i = next(s for s, v in kinds.items() if not v)
                raise MergeError(f"model {i} ({models[i].name}) has {key} as {models[i].tensors[key].dtype}, "
                                 f"model {f} as {models[f].tensors[key].dtype}: the file is corrupt")
    for desc in dict.fromkeys(d for _, d in optional.values()):
        keys = [k for k, (_, d) in optional.items() if d == desc]
        have = [s for s in slots if any(k in models[s].tensors for k in keys)]
        lacking = [s for s in slots if s not in have]
        partial = [s for s in have if not all(k in models[s].tensors for k in keys)]
        if partial:
            s = partial[0]
            gone = sorted(k for k in keys if k not in models[s].tensors)
            raise MergeError(f"model {s} ({models[s].name}) has only part of {desc}: it lacks {_listing(gone)}")
        if lacking:
            notes.append(_lack_note(models, lacking, have, desc, "are used as they are"))
    return notes


def _lack_note(models, lacking: list[str], have: list[str], what: str, used: str) -> str:
    source = "A" if "A" in have else have[0]
    names = ", ".join(f"model {s} ({models[s].name})" for s in lacking)
    return f"{names} {'has' if len(lacking) == 1 else 'have'} no {what}: model {source}'s {used} (not merged)"
