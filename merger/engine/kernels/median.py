"""Weiszfeld's iterations for the geometric median, one pass over the inputs each (numba).

An iteration's median is m = Σᵢ βᵢτᵢ / Σᵢ βᵢ element by element, with τᵢ = float32(Mᵢ) −
float32(BASE); the next iteration needs only the distances ‖τᵢ − m‖. So one pass reads BASE and
every Mᵢ once, makes m element by element and adds each (τᵢ − m)² to a float64 sum per model,
without storing m; the last pass writes BASE + λ·m into the output instead. The eager path
(:func:`..methods.geometric_median.weiszfeld`) reads the stacked float32 τ twice per iteration (a
``tensordot`` and a ``torch.dist`` per model).
"""
from __future__ import annotations

import numpy as np

from . import HAVE_NUMBA

BLOCK = 1024

if HAVE_NUMBA:
    from numba import njit

    from .convert import f32, narrow, widen

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _tau(m, b, out):
        for j in range(m.size):
            out[j] = f32(m[j]) - b[j]

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _block_taus(base, models, o, c, b, t):
        """t[i, :c] = τᵢ of elements [o, o + c) (BASE widened into b once for every model)."""
        widen(base[o:o + c], b[:c])
        for i in range(len(models)):
            _tau(models[i][o:o + c], b[:c], t[i, :c])

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _axpy(x, a, y):
        for j in range(y.size):
            y[j] = y[j] + x[j] * a

    @njit(nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"}, cache=True)
    def _sq(t, m):
        """Σ (t − m)² of one block in float32, the sum reassociated (vectorised); the blocks'
        sums then add up in float64."""
        s = np.float32(0.0)
        for j in range(t.size):
            d = t[j] - m[j]
            s += d * d
        return np.float64(s)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _distances(base, models, beta, total, sq):
        """sq[i] += Σⱼ (τᵢⱼ − mⱼ)² over the slices, m = Σ βᵢτᵢ / total (float32, in model order,
        as :func:`_write`), a block at a time: the τ and m of a block stay in L1."""
        n = len(models)
        size = base.size
        b = np.empty(BLOCK, np.float32)
        t = np.empty((n, BLOCK), np.float32)
        m = np.empty(BLOCK, np.float32)
        for o in range(0, size, BLOCK):
            c = min(BLOCK, size - o)
            _block_taus(base, models, o, c, b, t)
            mc = m[:c]
            for j in range(c):
                mc[j] = t[0, j] * beta[0]
            for i in range(1, n):
                _axpy(t[i, :c], beta[i], mc)
            for j in range(c):
                mc[j] = mc[j] / total
            for i in range(n):
                sq[i] += _sq(t[i, :c], mc)

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _write(base, models, beta, total, lam, out):
        """out = BASE + λ·m, rounded to out's format."""
        n = len(models)
        for j in range(base.size):
            b = f32(base[j])
            s = np.float32(0.0)
            for i in range(n):
                x = (f32(models[i][j]) - b) * beta[i]
                s = x if i == 0 else s + x
            out[j] = narrow((s / total) * lam + b, out)


def _over(parts, run, kernel, base: np.ndarray, models: tuple, *args, out: np.ndarray | None = None,
          acc: tuple | None = None):
    """``kernel(base, models, *args[, acc array][, out])`` on each part's slices over the workers;
    with ``acc`` = (shape, dtype) each part adds into its own zeroed array, and their sum is
    returned."""
    def part(p):
        s, e = p
        extra = () if acc is None else (np.zeros(*acc),)
        kernel(base[s:e], tuple(m[s:e] for m in models), *args, *extra, *(() if out is None else (out[s:e],)))
        return extra[0] if extra else None
    done = list(run(part, parts))
    return None if acc is None else sum(done)


def distances(base: np.ndarray, models: tuple, beta: np.ndarray, parts, run) -> np.ndarray:
    """‖τᵢ − m‖ per model (float32) for the median of weights ``beta`` (float32)."""
    beta_t = tuple(np.float32(x) for x in beta)
    total = np.float32(beta.sum(dtype=np.float32))
    sq = _over(parts, run, _distances, base, models, beta_t, total, acc=(len(models), np.float64))
    return np.sqrt(sq).astype(np.float32)


def write(base: np.ndarray, models: tuple, beta: np.ndarray, lam: float, out: np.ndarray, parts, run) -> None:
    beta_t = tuple(np.float32(x) for x in beta)
    total, lam32 = np.float32(beta.sum(dtype=np.float32)), np.float32(lam)
    _over(parts, run, _write, base, models, beta_t, total, lam32, out=out)


if HAVE_NUMBA:
    @njit(nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
    def _dot(x, y):
        """Σ x·y of one block in float64, reassociated (vectorised): the eager path's float64
        product rounds to the same float32 Gram matrix. A product of two float32 is exact in
        float64, so a fused multiply-add rounds as the add alone would."""
        s = np.float64(0.0)
        for j in range(x.size):
            s += np.float64(x[j]) * np.float64(y[j])
        return s

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _gram(base, models, g):
        """g[i, k] += Σⱼ τᵢⱼ·τₖⱼ over the slices (i ≤ k), a block of τ at a time."""
        n = len(models)
        size = base.size
        b = np.empty(BLOCK, np.float32)
        t = np.empty((n, BLOCK), np.float32)
        for o in range(0, size, BLOCK):
            c = min(BLOCK, size - o)
            _block_taus(base, models, o, c, b, t)
            for i in range(n):
                for k in range(i, n):
                    g[i, k] += _dot(t[i, :c], t[k, :c])

    @njit(nogil=True, boundscheck=False, error_model="numpy", cache=True)
    def _write_mean(base, models, scale, lam, out):
        """out = BASE + λ·(scale·mean(τ)), mean = (τ₁ + … + τₙ)/n in model order as torch's
        ``mean(dim=0)``; a non-finite scale·mean becomes 0 (as the eager ``nan_to_num``)."""
        n = len(models)
        nf = np.float32(n)
        for j in range(base.size):
            b = f32(base[j])
            s = np.float32(0.0)
            for i in range(n):
                x = f32(models[i][j]) - b
                s = x if i == 0 else s + x
            v = scale * (s / nf)
            if not np.isfinite(v):
                v = np.float32(0.0)
            out[j] = narrow(v * lam + b, out)


def gram(base: np.ndarray, models: tuple, parts, run) -> np.ndarray:
    """The task vectors' Gram matrix Σⱼ τᵢⱼτₖⱼ (float64, n × n)."""
    n = len(models)
    g = _over(parts, run, _gram, base, models, acc=((n, n), np.float64))
    return np.triu(g) + np.triu(g, 1).T


def write_mean(base: np.ndarray, models: tuple, scale: float, lam: float, out: np.ndarray, parts, run) -> None:
    scale32, lam32 = np.float32(scale), np.float32(lam)
    _over(parts, run, _write_mean, base, models, scale32, lam32, out=out)
