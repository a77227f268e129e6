"""Reading LoRA files: kohya LoRA (LierLa), LoCon/C3Lier (3x3 conv), DyLoRA, LyCORIS LoHa and
LoKr, as modules with their tensors, rank and alpha, plus the ``ss_*`` metadata."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merger.files.checkpoint_io import load_checkpoint
from merger.errors import MergeError
from merger.files.saving import SaveOptions, save_tensors

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoraModule:
    name: str
    kind: str                                   # lora | loha | lokr
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in t:
                return t[k].shape[0]
        return 0


@dataclass
class LoraFile:
    path: Path
    modules: dict[str, LoraModule]
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    def network_type(self) -> str:
        """LoRA, LoCon (3x3 convs), LoHa, LoKr or DyLoRA, as users call them."""
        if "dylora" in self.metadata.get("ss_network_module", "").lower():
            return "DyLoRA"
        if self.kinds & {"loha"}:
            return "LoHa"
        if self.kinds & {"lokr"}:
            return "LoKr"
        return "LoCon" if self.dims()[1] else "LoRA"

    def dims(self) -> tuple[int, int]:
        """(largest rank of Linear / 1x1 modules, largest rank of 3x3 conv modules; 0 if none)."""
        lin, conv = 0, 0
        for m in self.modules.values():
            down = m.tensors.get("lora_down.weight")
            if down is not None and down.dim() == 4 and down.shape[2] > 1:
                conv = max(conv, m.rank)
            else:
                lin = max(lin, m.rank)
        return lin, conv


_KIND = {"lora_down": "lora", "lora_up": "lora", "lora_mid": "lora", "hada_": "loha", "lokr_": "lokr"}
# PEFT / diffusers / ai-toolkit names (``transformer.x.attn.to_q.lora_A.weight``): A is down, B is up
_PEFT = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
         ".lora_down.weight": "lora_down.weight", ".lora_up.weight": "lora_up.weight", ".alpha": "alpha"}


def split_key(key: str) -> tuple[str, str]:
    """(module name, parameter): kohya modules have no dots (``lora_unet_x.lora_down.weight``);
    PEFT-style modules do (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``)."""
    name, param = key.split(".", 1)
    if "." in param and not param.startswith(tuple(_KIND)):
        for suffix, mapped in _PEFT.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], mapped
    return name, param


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Load a LoRA file; every failure is a MergeError (a checkpoint given as LoRA too)."""
    ck = load_checkpoint(path)
    modules: dict[str, LoraModule] = {}
    for key, t in ck.tensors.items():
        if "." not in key:
            continue
        name, param = split_key(key)
        mod = modules.setdefault(name, LoraModule(name, ""))
        if param == "alpha":
            if t.numel() != 1 or not t.is_floating_point() and t.dtype == torch.bool:
                raise MergeError(f"{Path(path).name} is corrupt: the alpha of {name} is not one number")
            mod.alpha = float(t.float().item())
            continue
        kind = next((k for p, k in _KIND.items() if param.startswith(p)), None)
        if kind is None:
            continue   # dora_scale, bias diffs etc. are not supported; ignored
        mod.kind = kind
        mod.tensors[param] = t
    modules = {n: m for n, m in modules.items() if m.kind}
    if not modules:
        hint = " (it looks like a checkpoint)" if any(k.startswith("model.diffusion_model.") for k in ck.tensors) else ""
        raise MergeError(f"{Path(path).name} has no LoRA / LoCon / LoHa / LoKr modules{hint}")
    for m in modules.values():
        need = {"lora": ("lora_down.weight", "lora_up.weight"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        missing = [p for p in need.get(m.kind, ()) if p not in m.tensors]
        if m.kind == "lokr" and not (("lokr_w1" in m.tensors or "lokr_w1_a" in m.tensors)
                                     and ("lokr_w2" in m.tensors or "lokr_w2_a" in m.tensors)):
            missing = ["lokr_w1/lokr_w2"]
        if missing:
            raise MergeError(f"{Path(path).name}: module {m.name} lacks {', '.join(missing)}")
    bad = sorted(ck.value_stats()[0])
    if bad:
        raise MergeError(f"{Path(path).name} contains NaN/Inf values in {bad[0]}"
                         + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "") + ": it cannot be used")
    return LoraFile(Path(path), modules, dict(ck.metadata))


def metadata_table(lora: LoraFile) -> list[tuple[str, str]]:
    """``ss_*`` training metadata, JSON values pretty-printed, for the metadata viewer."""
    rows = []
    for k, v in sorted(lora.metadata.items()):
        try:
            parsed = json.loads(v)
            v = json.dumps(parsed, indent=1, ensure_ascii=False) if isinstance(parsed, (dict, list)) else v
        except (ValueError, TypeError):
            pass
        rows.append((k, v))
    return rows


def save_lora(path: str | os.PathLike, sd: dict[str, torch.Tensor], metadata: dict[str, str],
              precision: str = "fp16", overwrite: bool = False) -> Path:
    """Write a kohya-format LoRA: weights in ``precision``, alphas in float32 (atomic, no
    silent overwrite)."""
    dtype = PRECISIONS[precision]
    sd = {k: v.to(dtype) if k.endswith("weight") else v.float() for k, v in sd.items()}
    return save_tensors(path, sd, SaveOptions(overwrite=overwrite), metadata)
