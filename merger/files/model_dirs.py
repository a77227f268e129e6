"""The user's model folders (A1111 layout: models/Stable-diffusion, models/Lora, models/VAE)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint_io import CHECKPOINT_EXTS
from .diffusers_format import is_diffusers_folder
from .names import check_save_name, relative_parts, resolve_in


@dataclass
class ModelDirs:
    ckpt: Path
    lora: Path
    vae: Path

    @classmethod
    def from_models_dir(cls, models: str | Path, ckpt=None, lora=None, vae=None) -> "ModelDirs":
        m = Path(models)
        return cls(Path(ckpt) if ckpt else m / "Stable-diffusion", Path(lora) if lora else m / "Lora",
                   Path(vae) if vae else m / "VAE")

    def create(self) -> None:
        for d in (self.ckpt, self.lora, self.vae):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _list(folder: Path, with_folders: bool = False) -> list[str]:
        """Model files under ``folder``; with ``with_folders``, diffusers model folders too (as
        one entry each, not their component files)."""
        if not folder.is_dir():
            return []
        out, skip = [], []
        for p in sorted(folder.rglob("*")):
            if p.name.startswith(".") or any(s in p.parents for s in skip):
                continue
            if with_folders and is_diffusers_folder(p):
                out.append(str(p.relative_to(folder)))
                skip.append(p)
            elif p.is_file() and p.suffix.lower() in CHECKPOINT_EXTS:
                out.append(str(p.relative_to(folder)))
        return sorted(out)

    def checkpoints(self) -> list[str]:
        return self._list(self.ckpt, with_folders=True)

    def loras(self) -> list[str]:
        return self._list(self.lora)

    def vaes(self) -> list[str]:
        return self._list(self.vae)

    def folder(self, kind: str) -> Path:
        return {"ckpt": self.ckpt, "lora": self.lora, "vae": self.vae}[kind]

    def resolve(self, kind: str, name: str) -> Path:
        """The file of a model named relative to its folder (``sub/model.safetensors``; a LoRA may
        omit its extension). Nothing outside the folder is reachable: see :mod:`.names`."""
        what = {"ckpt": "model", "lora": "LoRA", "vae": "VAE"}[kind]
        suffixes = ("",) + CHECKPOINT_EXTS[:3] if kind == "lora" else ("",)
        if kind == "ckpt":             # a diffusers model folder is a model too
            parts = relative_parts(name)
            cand = self.ckpt.joinpath(*parts) if parts else None
            if cand is not None and is_diffusers_folder(cand):
                return cand
        return resolve_in(self.folder(kind), name, what, suffixes)

    def new_file(self, kind: str, name: str, ext: str) -> Path:
        """Where a new file named by the user goes: ``name`` (``ext`` appended unless it ends
        with it) must be a plain file name; it is always inside the ``kind`` folder."""
        check_save_name(name, "file name")
        return self.folder(kind) / (name if name.lower().endswith(ext) else name + ext)
