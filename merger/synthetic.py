"""Random checkpoints with real LDM key names (tests, benchmarks, demo models).

No weights are ever downloaded: tiny models have every block of the real architecture with
small widths; ``size="full"`` gives real SD shapes filled with random values.
"""
from __future__ import annotations

import torch

from .ldm_layout import sized_layout

EXTRA_KEYS_SD = {"alphas_cumprod": (1000,), "betas": (1000,), "model_ema.decay": ()}


def random_checkpoint(arch: str = "sd1", *, size: str = "tiny", seed: int = 0,
                      dtype: torch.dtype = torch.float32, extras: bool = True,
                      scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A state dict of ``arch`` with uniform random values in [-scale, scale] (norm weights
    around 1). ``extras`` adds the non-inference keys real files carry (EMA, schedule buffers,
    CLIP ``position_ids``) so pruning and key handling are exercised."""
    layout = sized_layout(arch, size)
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    fill = torch.float32 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dtype   # no float8 RNG
    for key, shape in layout.items():
        t = torch.empty(shape, dtype=fill)
        t.uniform_(-scale, scale, generator=gen)
        if len(shape) == 1 and ("norm" in key or "ln_" in key) and key.endswith(("weight", "scale")):
            t.add_(1.0)
        sd[key] = t if fill == dtype else t.to(dtype)
    if extras and arch != "flux":      # Flux files carry no schedule or EMA buffers
        if arch == "sd1":
            sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
                torch.arange(77, dtype=torch.int64)[None]
        for key, shape in EXTRA_KEYS_SD.items():
            sd[key] = torch.rand(shape, generator=gen)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return sd


def random_vae(seed: int = 0, tiny: bool = True, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A stand-alone VAE file's state dict (keys without the ``first_stage_model.`` prefix)."""
    sd = random_checkpoint("sd1", size="tiny" if tiny else "full", seed=seed, dtype=dtype, extras=False)
    p = "first_stage_model."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
