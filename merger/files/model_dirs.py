"""The user's model folders (A1111 layout: models/Stable-diffusion, models/Lora, models/VAE)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint_io import CHECKPOINT_EXTS
from ..errors import MergeError


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
    def _list(folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if p.is_file() and p.suffix.lower() in CHECKPOINT_EXTS and not p.name.startswith("."))

    def checkpoints(self) -> list[str]:
        return self._list(self.ckpt)

    def loras(self) -> list[str]:
        return self._list(self.lora)

    def vaes(self) -> list[str]:
        return self._list(self.vae)

    def resolve(self, kind: str, name: str) -> Path:
        """Path of a model given by name (relative to its folder) or by path."""
        folder = {"ckpt": self.ckpt, "lora": self.lora, "vae": self.vae}[kind]
        p = Path(name)
        for cand in (p, folder / name):
            if cand.is_file():
                return cand
        raise MergeError(f"model not found: {name} (looked in {folder})")
