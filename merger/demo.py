"""Small demo models written on first start, so every feature can be tried with no downloads.

They have the real SD1 / SDXL block structure and key names with tiny widths and random
weights: images are abstract noise, but every merge visibly changes them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .files.model_dirs import ModelDirs
from .synthetic import random_checkpoint, random_vae

DEMO_CHECKPOINTS = {  # file name: (architecture, seed)
    "demo-sd1-tiny-A.safetensors": ("sd1", 101),
    "demo-sd1-tiny-B.safetensors": ("sd1", 202),
    "demo-sd1-tiny-C.safetensors": ("sd1", 303),
    "demo-sdxl-tiny.safetensors": ("sdxl", 404),
}
DEMO_LORA = "demo-sd1-tiny-lora.safetensors"
DEMO_VAE = "demo-sd1-tiny.vae.safetensors"


def demo_lora(base: dict[str, torch.Tensor], rank: int = 4, alpha: float = 2.0, seed: int = 7) -> dict:
    """A kohya-format LoRA (LierLa, with 1x1 conv proj_in/out) for a tiny SD1 checkpoint."""
    from lora_ops.naming import kohya_names
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in base.items():
        for name in kohya_names(key, "sd1"):
            extra = w.shape[2:]
            out[f"{name}.lora_down.weight"] = (torch.randn((rank, w.shape[1], *extra), generator=g) * 0.25).half()
            out[f"{name}.lora_up.weight"] = (torch.randn((w.shape[0], rank, *[1] * len(extra)), generator=g) * 0.25).half()
            out[f"{name}.alpha"] = torch.tensor(alpha).half()
    return out


def ensure_demo_models(dirs: ModelDirs) -> list[Path]:
    """Write the demo files that are missing; returns the paths written."""
    import safetensors.torch as st
    dirs.create()
    written = []
    for name, (arch, seed) in DEMO_CHECKPOINTS.items():
        path = dirs.ckpt / name
        if not path.exists():
            sd = random_checkpoint(arch, seed=seed, dtype=torch.float16)
            st.save_file(sd, str(path), metadata={"demo": "random tiny model with real SD key names"})
            written.append(path)
    if not (dirs.lora / DEMO_LORA).exists():
        base = random_checkpoint("sd1", seed=101, extras=False)
        st.save_file(demo_lora(base), str(dirs.lora / DEMO_LORA),
                     metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4",
                               "ss_network_alpha": "2.0", "ss_output_name": "demo-sd1-tiny-lora",
                               "ss_base_model_version": "sd_v1"})
        written.append(dirs.lora / DEMO_LORA)
    if not (dirs.vae / DEMO_VAE).exists():
        st.save_file({k: v.half() for k, v in random_vae(seed=505).items()}, str(dirs.vae / DEMO_VAE))
        written.append(dirs.vae / DEMO_VAE)
    return written
