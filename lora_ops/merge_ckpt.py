"""Merging LoRAs into a checkpoint: ``name:ratio[:blocks], name:ratio[:blocks], ...``.

W' = W + Σ ratio · block_ratio(W) · ΔW (float32, cast back to W's dtype), as kohya's
``merge_lora.py`` / SuperMerger's LoRA tab. ``blocks`` is a LoRA block-weight preset
(``presets/lora_blocks.tsv``) or 12 / 17 / 20 / 26 values; the ratio multiplies them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from merger.blocks import BLOCKS_FLUX, BLOCKS_SD, BLOCKS_XL, block_ids, block_of
from merger.errors import MergeError
from merger.files.names import resolve_in
from merger.presets import PRESET_DIR, parse_preset_text

from .delta import module_delta
from .formats import LoraFile
from .naming import flux_targets, kohya_targets

LORA_SUFFIXES = ("", ".safetensors", ".pt", ".ckpt")
BLOCKS17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
            "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
BLOCKS12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]


@dataclass
class LoraSpec:
    name: str
    ratio: float
    blocks: dict[str, float]      # block ID -> multiplier (already times ratio)


def lora_presets() -> dict[str, str]:
    return parse_preset_text((PRESET_DIR / "lora_blocks.tsv").read_text())


def block_vector(values: list[float], arch: str) -> dict[str, float]:
    """12/17/20/26 values -> every block of ``arch`` (blocks a short vector omits get 0, as
    SuperMerger's ``to26``); Flux takes its 61 blocks' values."""
    if arch == "flux":
        if len(values) != len(BLOCKS_FLUX):
            raise MergeError(f"Flux LoRA block weights need 61 values (CLIP, T5, IN, D00-D18, S00-S37, OUT), "
                             f"got {len(values)}")
        return dict(zip(BLOCKS_FLUX, values))
    ids = {12: BLOCKS12, 17: BLOCKS17, 20: BLOCKS_XL, 26: BLOCKS_SD}.get(len(values))
    if ids is None:
        raise MergeError(f"LoRA block weights need 12, 17, 20 or 26 values, got {len(values)}")
    out = {b: 0.0 for b in block_ids(arch)}
    for b, v in zip(ids, values):
        if b in out:
            out[b] = v
    return out


def parse_specs(text: str, arch: str) -> list[LoraSpec]:
    """``a:0.8, b:0.5:OUTALL, c:1:1,0,0,...`` (values after a name belong to it)."""
    groups: list[list[str]] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if ":" in item:
            groups.append(item.split(":"))
        elif groups:
            groups[-1].append(item)
        else:
            raise MergeError(f"LoRA list: {item!r} has no name:ratio")
    specs, table = [], lora_presets()
    for g in groups:
        name = g[0].strip()
        try:
            ratio = float(g[1]) if len(g) > 1 else 1.0
            if len(g) <= 2:
                values = [1.0] * len(block_ids(arch) if arch == "flux" else BLOCKS_SD)
            elif len(g) == 3 and g[2].strip() in table:
                values = [float(v) for v in table[g[2].strip()].split(",")]
            else:
                values = [float(v) for v in g[2:]]
        except ValueError:
            raise MergeError(f"LoRA list: bad number in {':'.join(g)!r} (or unknown preset)") from None
        specs.append(LoraSpec(name, ratio, {b: v * ratio for b, v in block_vector(values, arch).items()}))
    if not specs:
        raise MergeError("no LoRA given")
    return specs


def _shape(t) -> tuple[int, ...]:
    """A tensor's shape, or the shape itself (layouts give shapes, state dicts tensors)."""
    return tuple(getattr(t, "shape", t))


def target_map(tensors, arch: str) -> dict[str, list[tuple[str, object]]]:
    """kohya module name -> [(LDM key, Target)] for a checkpoint's keys (tensors or shapes)."""
    out: dict[str, list] = {}
    if arch == "flux":
        hidden = next(_shape(t)[0] for k, t in tensors.items() if k.endswith("img_in.weight"))
        for key, t in tensors.items():
            for name, target in flux_targets(key, _shape(t), hidden):
                out.setdefault(name, []).append((key, target))
        return out
    for key, t in tensors.items():
        width = _shape(t)[1] if key.endswith("in_proj_weight") else 1
        for name, target in kohya_targets(key, arch, width):
            out.setdefault(name, []).append((key, target))
    return out


class LoraApplier:
    """Which checkpoint keys a set of LoRAs changes, and the change of each key computed on
    demand (so a merge can stream: ΔW of one key at a time, never the whole LoRA at once)."""

    def __init__(self, shapes: dict, loras: list[tuple[LoraFile, LoraSpec]], arch: str):
        """``shapes``: LDM key -> tensor or shape of the checkpoint the LoRAs go into."""
        tmap = target_map(shapes, arch)
        self.arch, self.by_key = arch, {}
        for lora, spec in loras:
            unmatched = [n for n in lora.modules if n not in tmap]
            if len(unmatched) > len(lora.modules) // 2:
                raise MergeError(f"LoRA {lora.name} does not fit this {arch.upper()} checkpoint: "
                                 f"{len(unmatched)} of {len(lora.modules)} modules have no match "
                                 f"(e.g. {unmatched[0]}); is it for another architecture?")
            for name, module in lora.modules.items():
                for key, target in tmap.get(name, []):
                    scale = spec.blocks.get(block_of(key, arch) or "BASE", 0.0)
                    if scale:
                        self.by_key.setdefault(key, []).append((lora.name, module, target, scale))
        self.shapes = {k: _shape(shapes[k]) for k in self.by_key}

    @property
    def keys(self) -> list[str]:
        return list(self.by_key)

    def only(self, keep) -> "LoraApplier":
        """The same LoRAs restricted to the keys ``keep(key)`` accepts (a shallow copy)."""
        part = object.__new__(LoraApplier)
        part.arch = self.arch
        part.by_key = {k: v for k, v in self.by_key.items() if keep(k)}
        part.shapes = {k: self.shapes[k] for k in part.by_key}
        return part

    def delta(self, key: str) -> torch.Tensor:
        """Σ scale · ΔW for ``key`` (float32, the key's full shape)."""
        shape = self.shapes[key]
        out = torch.zeros(shape)
        for lora_name, module, target, scale in self.by_key[key]:
            part = out[target.rows[0]:target.rows[1]] if target.kind == "rows" else out
            try:
                part += module_delta(module, tuple(part.shape)) * scale
            except ValueError as e:
                raise MergeError(f"LoRA {lora_name} does not fit this checkpoint: {e}") from None
        return out

    def apply(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return (value.float() + self.delta(key)).to(value.dtype)


def merge_loras(tensors: dict[str, torch.Tensor], loras: list[tuple[LoraFile, LoraSpec]], arch: str,
                should_stop=None) -> dict[str, torch.Tensor]:
    """The changed tensors (new ones; inputs are never modified)."""
    applier = LoraApplier(tensors, loras, arch)
    out = {}
    for key in applier.keys:
        if should_stop is not None and should_stop():
            from merger.errors import MergeStopped
            raise MergeStopped()
        out[key] = applier.apply(key, tensors[key])
    return out


def merged_checkpoint(tensors: dict, loras, arch: str, should_stop=None) -> dict[str, torch.Tensor]:
    """A full state dict: the checkpoint with the LoRAs merged (unchanged tensors shared)."""
    out = dict(tensors)
    out.update(merge_loras(tensors, loras, arch, should_stop))
    return out


def lora_path(folder: Path, name: str) -> Path:
    """A LoRA named relative to ``folder`` (extension optional); never a path outside it."""
    return resolve_in(folder, name, "LoRA", LORA_SUFFIXES)
