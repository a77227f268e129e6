"""Merging LoRAs into one LoRA (kohya ``merge_lora.py`` / ``svd_merge_lora.py``, SuperMerger)."""
from __future__ import annotations

import math
import random

import torch

from merger.errors import MergeError

from .delta import module_delta
from .formats import PRECISIONS, LoraFile
from .svd import low_rank


def _lora_only(loras):
    for lf, _ in loras:
        if lf.kinds != {"lora"}:
            raise MergeError(f"{lf.name} is {lf.network_type()}: only LoRA/LoCon files can be merged this way "
                             f"(use the SVD merge)")


def parse_ratio_list(text: str) -> list[tuple[str, float]]:
    """``name:ratio, name, ...`` -> [(name, ratio)] (ratio 1 when left out; the last ':' splits,
    so a path with a drive letter works)."""
    pairs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, ratio = item.rpartition(":")
        if not sep:
            name, ratio = item, "1"
        try:
            pairs.append((name.strip(), float(ratio)))
        except ValueError:
            raise MergeError(f"LoRA list: bad ratio in {item!r}") from None
    if not pairs:
        raise MergeError("no LoRA given")
    return pairs


def merge_lora_set(pairs: list[tuple[LoraFile, float]], method: str, *, same_strength: bool = False,
                   shuffle: bool = False, new_rank: int = 64, new_conv_rank: int | None = None,
                   precision: str = "fp32", clamp_quantile: float = 0.99) -> dict[str, torch.Tensor]:
    """One of the three merges by name: "same-rank", "concat" or "svd"."""
    if method == "same-rank":
        return merge_same_rank(pairs, same_strength, precision)
    if method == "concat":
        return merge_concat(pairs, shuffle, precision=precision)
    if method == "svd":
        if not 0 < clamp_quantile <= 1:
            raise MergeError(f"clamp quantile must be in (0, 1], got {clamp_quantile}")
        return merge_svd(pairs, new_rank, new_conv_rank, clamp_quantile, precision=precision)
    raise MergeError(f"unknown LoRA merge method {method!r} (same-rank, concat, svd)")


def merge_same_rank(loras: list[tuple[LoraFile, float]], same_strength: bool = False,
                    precision: str = "fp32") -> dict[str, torch.Tensor]:
    """kohya ``merge_lora_models``: up and down of every LoRA are summed with
    ``s = sqrt(alpha / base_alpha) · ratio`` (base = the first LoRA's alpha, which is kept), up
    with ``|s|`` and down with ``s`` (kohya: ``scale = abs(scale) if "lora_up" in key``), so a
    negative ratio subtracts. The product then scales by about ratio²; with ``same_strength``
    (SuperMerger's option) each side gets sqrt(|ratio|) (the sign on up) so a single LoRA keeps
    the strength it is given."""
    _lora_only(loras)
    out: dict[str, torch.Tensor] = {}
    base_alpha: dict[str, float] = {}
    for lf, ratio in loras:
        for name, m in lf.modules.items():
            rank = m.tensors["lora_down.weight"].shape[0]
            alpha = m.alpha if m.alpha is not None else rank
            base = base_alpha.setdefault(name, alpha)
            for part in ("lora_down.weight", "lora_up.weight"):
                w = m.tensors[part].to(PRECISIONS[precision])
                key = f"{name}.{part}"
                if key in out and out[key].shape != w.shape:
                    raise MergeError(f"{name}: ranks differ ({out[key].shape[0]} vs {w.shape[0]}); "
                                     f"use concat or the SVD merge")
                if same_strength:
                    s = math.sqrt(abs(ratio)) * math.sqrt(alpha / base) * (math.copysign(1, ratio) if "up" in part else 1)
                else:
                    s = math.sqrt(alpha / base) * ratio
                    s = abs(s) if "up" in part else s
                out[key] = out.get(key, 0) + w * s
            out[f"{name}.alpha"] = torch.tensor(base)
    return out


def merge_concat(loras: list[tuple[LoraFile, float]], shuffle: bool = False, seed: int = 0,
                 precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Concatenate along the rank (kohya ``--concat``): ΔW of the result is exactly
    Σ ratio·ΔW_i; alpha = the new rank. ``shuffle`` permutes the rank order (ΔW unchanged)."""
    _lora_only(loras)
    downs: dict[str, list] = {}
    ups: dict[str, list] = {}
    for lf, ratio in loras:
        for name, m in lf.modules.items():
            d, u = (m.tensors[p].to(PRECISIONS[precision]) for p in ("lora_down.weight", "lora_up.weight"))
            rank = d.shape[0]
            scale = (m.alpha if m.alpha is not None else rank) / rank * ratio
            s = math.sqrt(abs(scale))
            downs.setdefault(name, []).append(d * s)
            ups.setdefault(name, []).append(u * s * math.copysign(1, scale))
    out = {}
    rng = random.Random(seed)
    for name in downs:
        d, u = torch.cat(downs[name], 0), torch.cat(ups[name], 1)
        if shuffle:
            perm = list(range(d.shape[0]))
            rng.shuffle(perm)
            d, u = d[perm], u[:, perm]
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = d.contiguous(), u.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(d.shape[0]))
    return out


def merge_svd(loras: list[tuple[LoraFile, float]], new_rank: int, new_conv_rank: int | None = None,
              clamp_quantile: float = 0.99, fast: bool = False, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """kohya ``svd_merge_lora.py``: ΔW = Σ ratio·ΔW_i per module (any LoRA type, ranks may
    differ; summed in ``precision``), then a rank-``new_rank`` SVD in float32 (``new_conv_rank``
    for k×k convs); alpha = the rank."""
    total: dict[str, torch.Tensor] = {}
    for lf, ratio in loras:
        for name, m in lf.modules.items():
            shape = _shape_of(m)
            d = (module_delta(m, shape) * ratio).to(PRECISIONS[precision])
            total[name] = total[name] + d if name in total else d
    out = {}
    for name, d in total.items():
        is_3x3 = d.dim() == 4 and d.shape[2] > 1
        up, down = low_rank(d.float(), (new_conv_rank or new_rank) if is_3x3 else new_rank, clamp_quantile, fast)
        out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"] = up.contiguous(), down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def _shape_of(m) -> tuple[int, ...]:
    t = m.tensors
    if m.kind == "lora":
        d, u = t["lora_down.weight"], t["lora_up.weight"]
        return (u.shape[0], d.shape[1], *d.shape[2:])
    if m.kind == "loha":
        return (t["hada_w1_a"].shape[0], *t["hada_w1_b"].shape[1:])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2s = t["lokr_w2"].shape if "lokr_w2" in t else (t["lokr_w2_a"].shape[0], *t["lokr_w2_b"].shape[1:])
    return (w1.shape[0] * w2s[0], w1.shape[1] * w2s[1], *w2s[2:])


METADATA_MODES = ("create new", "merge", "save all", "use first LoRA")


def network_fields(sd: dict[str, torch.Tensor], loras: list[tuple[LoraFile, float]]) -> dict[str, str]:
    """kohya's ``ss_network_dim`` / ``ss_network_alpha`` (and conv dim/alpha in
    ``ss_network_args``) read from the merged tensors themselves, plus ``ss_base_model_version``
    when every input names the same base."""
    import json
    from collections import Counter
    lin, conv = Counter(), Counter()
    for key, down in sd.items():
        if key.endswith("lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            alpha = sd.get(f"{name}.alpha")
            pair = (down.shape[0], float(alpha) if alpha is not None else float(down.shape[0]))
            (conv if down.dim() == 4 and down.shape[2] > 1 else lin)[pair] += 1
    out: dict[str, str] = {}
    if lin or conv:
        dim, alpha = (lin or conv).most_common(1)[0][0]
        out.update(ss_network_dim=str(dim), ss_network_alpha=f"{alpha:g}")
        if conv:
            cdim, calpha = conv.most_common(1)[0][0]
            out["ss_network_args"] = json.dumps({"conv_dim": str(cdim), "conv_alpha": f"{calpha:g}"})
    bases = {lf.metadata.get("ss_base_model_version") for lf, _ in loras}
    if len(bases) == 1 and None not in bases:
        out["ss_base_model_version"] = bases.pop()
    return out


def merged_metadata(loras: list[tuple[LoraFile, float]], mode: str, summary: dict[str, str],
                    sd: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Metadata of a merged LoRA (SuperMerger's options): *create new* writes only what
    describes the merge; *merge* combines the inputs' ``ss_*`` fields (the first LoRA wins on a
    clash); *save all* keeps every input's metadata as JSON under ``sdmw_source_<n>``; *use first
    LoRA* copies the first one's. With the merged ``sd``, the network dim/alpha (and base model)
    are those of the result in every mode (copied ones would be wrong after an SVD)."""
    import json
    if mode not in METADATA_MODES:
        raise MergeError(f"metadata mode must be one of {', '.join(METADATA_MODES)}")
    meta: dict[str, str] = {}
    if mode == "merge":
        for lf, _ in reversed(loras):
            meta.update(lf.metadata)
    elif mode == "use first LoRA":
        meta.update(loras[0][0].metadata)
    elif mode == "save all":
        for i, (lf, ratio) in enumerate(loras):
            meta[f"sdmw_source_{i}"] = json.dumps({"name": lf.name, "ratio": ratio, "metadata": lf.metadata})
    if sd is not None:
        meta.update(network_fields(sd, loras))
    meta.update(summary)
    return meta
