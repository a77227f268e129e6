"""DARE's combination on the CPU, straight from the stored inputs and the 0/1 masks (numba):
BASE + λ·(Σᵢ wᵢ·(mᵢ⊙τᵢ))/(1 − p), written once into the output, each element read once.

Per element, τᵢ = float32(Mᵢ) − float32(BASE) times its mask (0 or 1: τ or ±0), times wᵢ, summed
in model order, divided by 1 − p, times λ, plus BASE, rounded to the output format: the same
float32 operations in the same order as the eager path (:func:`..methods.dare_linear.dare_linear`
and the engine's ``mul_(λ).add_(BASE)``), so the same bits. The masks come from
:mod:`.bernoulli`, model after model, as ``torch.bernoulli`` draws them. dare_ties uses TIES's
combination with the same masks (:mod:`.ties_combine`).
"""
from __future__ import annotations

import numpy as np

from . import HAVE_NUMBA

if HAVE_NUMBA:
    from numba import njit

    from .convert import f32, narrow

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _linear(base, models, masks, w, div, lam, out):
        """Slices of one element range, indexed from 0 (see :mod:`.ties_combine`); ``masks`` a
        tuple of uint8 slices like ``models``; ``w`` a tuple of float32."""
        for j in range(out.size):
            b = f32(base[j])
            acc = np.float32(0.0)
            for i in range(len(models)):
                x = ((f32(models[i][j]) - b) * np.float32(masks[i][j])) * w[i]
                acc = x if i == 0 else acc + x
            out[j] = narrow((acc / div) * lam + b, out)


def linear(base: np.ndarray, models: tuple, masks: np.ndarray, w, div: float, lam: float, out: np.ndarray,
           parts: list[tuple[int, int]], run) -> None:
    """Write the key into ``out`` (views of :func:`..as_numpy`; ``masks`` n × elements uint8),
    ``parts`` of the elements mapped over the workers by ``run``."""
    w_t = tuple(np.float32(x) for x in w)
    div32, lam32 = np.float32(div), np.float32(lam)

    def part(p):
        s, e = p
        _linear(base[s:e], tuple(m[s:e] for m in models), tuple(m[s:e] for m in masks), w_t, div32, lam32,
                out[s:e])
    for _ in run(part, parts):
        pass
