"""The 8-value Adjust vector (SuperMerger ``fineman``/``colorcalc``): detail, contrast and colour
tweaks applied to the U-Net's first and last layers after merging.

Values are IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3 (SuperMerger's order). With
f = values: ``input_blocks.0.0.weight *= 1 - 0.01 f0``, ``.bias *= 1 + 0.02 f0``,
``out.0.weight *= 1 - 0.01 f1``, ``out.0.bias *= 1 + 0.02 f1``, ``out.2.weight *= 1 - 0.01 f2``,
``out.2.bias += [0.02 f3] + Σ_i 0.02 f(4+i) · COL[i]`` (a 4-vector, one per latent channel).
"""
from __future__ import annotations

import torch

from ..errors import MergeError

ADJUST_NAMES = ("IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3")
ADJUST_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.bias",
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.0.bias",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.out.2.bias",
)
_COLS_SD = [[-1, 1 / 3, 2 / 3], [1, 1, 0], [0, -1, -1], [1, 0, 1]]
_COLS_XL = [[0, 0, 1], [1, 0, 0], [-1, -1, 0], [-1, 1, 0]]


def adjust_factors(values: list[float] | None, arch: str) -> dict[str, float | list[float]]:
    """Key -> multiplier (float) or additive 4-vector (list); empty when all values are 0."""
    if not values or not any(values):
        return {}
    if arch == "flux":
        raise MergeError("Adjust works on the SD U-Net's input and output convolutions; a Flux model has "
                         "none (set every Adjust value to 0)")
    f = list(values) + [0.0] * (8 - len(values))
    cols = _COLS_XL if arch == "sdxl" else _COLS_SD
    color = [sum(y) for y in zip(*[[c * f[4 + i] * 0.02 for c in row] for i, row in enumerate(cols)])]
    return {
        ADJUST_KEYS[0]: 1 - f[0] * 0.01, ADJUST_KEYS[1]: 1 + f[0] * 0.02,
        ADJUST_KEYS[2]: 1 - f[1] * 0.01, ADJUST_KEYS[3]: 1 + f[1] * 0.02,
        ADJUST_KEYS[4]: 1 - f[2] * 0.01, ADJUST_KEYS[5]: [f[3] * 0.02] + color,
    }


def apply_adjust(t: torch.Tensor, factor: float | list[float]) -> torch.Tensor:
    """A new tensor (never in place: ``t`` may be a cached input). As in SuperMerger the
    multiplier is applied in the tensor's dtype and the colour vector added in float32."""
    if isinstance(factor, list):
        return t + torch.tensor(factor, dtype=torch.float32, device=t.device)
    return t * factor
