"""torch's CPU ``bernoulli`` masks, drawn faster and bit for bit (numba): DARE's and DELLA's dropout.

``torch.bernoulli(keep, generator=g)`` on the CPU (a probability tensor, the call sd-mecha and
:func:`..methods.dropout.drop_` make) draws one 32-bit word per element, in order, from the
generator's MT19937 engine (ATen's ``at::mt19937``), and sets the element to 1 where
``float(word & 0xFFFFFF) · 2⁻²⁴ < keep``. It does so one element at a time under a lock: 77 ms
per 15 M elements here, so over an SD1.5 merge of base + 4 (4.3 G draws) about 22 s of DARE's 35 s.

This module runs the same engine: the state, the regeneration of its 624 words, the tempering
and the comparison. The words of one regenerated block are tempered and compared in a loop LLVM
vectorises. It reads the torch generator's state (``get_state``: the initial seed, ``left``,
``seeded``, ``next`` and the 624 words, each stored in 8 bytes, then the normal-sample cache),
draws, and writes the advanced state back, so the generator ends where torch's own draws would
have left it and the masks are the same (tested against ``torch.bernoulli`` for several seeds,
probabilities, sizes and a generator already part-way through its stream).
"""
from __future__ import annotations

import numpy as np
import torch

from . import HAVE_NUMBA

N, M = 624, 397
STATE_BYTES = 8 + 4 + 4 + 8 + N * 8 + 40        # ATen's CPUGeneratorImplState (legacy layout)

if HAVE_NUMBA:
    from numba import njit

    @njit(inline="always")
    def _twist(u, v):
        y = (u & np.uint32(0x80000000)) | (v & np.uint32(0x7FFFFFFF))
        return (y >> np.uint32(1)) ^ (np.uint32(0x9908B0DF) if v & np.uint32(1) else np.uint32(0))

    @njit(nogil=True, boundscheck=False, cache=True)
    def _regenerate(st):
        """ATen's ``next_state``: all 624 words anew."""
        for k in range(N - M):
            st[k] = st[k + M] ^ _twist(st[k], st[k + 1])
        for k in range(N - M, N - 1):
            st[k] = st[k + M - N] ^ _twist(st[k], st[k + 1])
        st[N - 1] = st[M - 1] ^ _twist(st[N - 1], st[0])

    @njit(inline="always")
    def _temper(y):
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        return y ^ (y >> np.uint32(18))

    @njit(inline="always")
    def _uniform(w):
        """The uniform torch compares, (tempered word & 0xFFFFFF)·2⁻²⁴, exact. The 24-bit value
        goes to float through int32: a uint32 has no vector conversion before AVX-512, and LLVM's
        emulation made the compare loops 1.75x slower on AVX2 (12.3 against 7.0 ms per 16.8 M)."""
        return np.float32(np.int32(_temper(w) & np.uint32(0xFFFFFF))) * np.float32(2.0 ** -24)

    @njit(nogil=True, boundscheck=False, cache=True)
    def _compare_scalar(words, keep, out):
        for k in range(out.size):
            out[k] = _uniform(words[k]) < keep

    @njit(nogil=True, boundscheck=False, cache=True)
    def _compare_array(words, keep, out):
        for k in range(out.size):
            out[k] = _uniform(words[k]) < keep[k]

    @njit(nogil=True, boundscheck=False, cache=True)
    def _words24(words, out):
        for k in range(out.size):
            out[k] = _temper(words[k]) & np.uint32(0xFFFFFF)

    @njit(nogil=True, boundscheck=False, cache=True)
    def _draw(st, pos, keep, out, mode):
        """Fill ``out`` from the engine ``st`` (uint32[624]) whose ATen ``left``/``next`` are
        pos[0]/pos[1] (updated), one draw per element: ``mode`` 0: 0/1 (float32 or uint8) against
        one float32 keep[0]; 1: against keep[j] per element; 2: the uniform's 24-bit integer
        (uint32 ``out``, u = value·2⁻²⁴; ``keep`` unused)."""
        left, nxt = pos[0], pos[1]
        j = 0
        n = out.size
        while j < n:
            if left == 1:                 # the next draw regenerates (ATen: --left == 0)
                _regenerate(st)
                left, nxt = N + 1, 0
            c = min(left - 1, n - j)
            if mode == 1:
                _compare_array(st[nxt:nxt + c], keep[j:j + c], out[j:j + c])
            elif mode == 0:
                _compare_scalar(st[nxt:nxt + c], keep[0], out[j:j + c])
            else:
                _words24(st[nxt:nxt + c], out[j:j + c])
            j += c
            nxt += c
            left -= c
        pos[0], pos[1] = left, nxt


def usable(generator: torch.Generator | None) -> bool:
    """Whether :func:`bernoulli_` can stand in for ``torch.bernoulli`` with this generator: numba
    is there, the generator is a CPU one, and its state has the layout this module reads."""
    from . import available
    if not available() or generator is None or generator.device.type != "cpu":
        return False
    return generator.get_state().numel() == STATE_BYTES


def bernoulli_(keep: torch.Tensor | float, out: torch.Tensor | np.ndarray, generator: torch.Generator):
    """``torch.bernoulli(keep, generator=generator, out=out)`` for a float32 CPU ``out``, with
    ``keep`` a float32 tensor of out's shape or one float32 value: the same values, and the
    generator advanced as far (:func:`usable` must hold). ``out`` may also be a uint8 numpy
    array (the same 0/1, as DARE's fused path reads them; rows of a 2-D one are drawn in order,
    one model after the other)."""
    each = isinstance(keep, torch.Tensor)
    k = keep.reshape(-1).numpy() if each else np.array([keep], np.float32)
    _run(generator, k, out.view(-1).numpy() if isinstance(out, torch.Tensor) else out.reshape(-1), int(each))
    return out


def uniforms24(out: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """The next ``out.size`` uniforms ``torch.bernoulli`` would compare, as their 24-bit integers
    (u = value·2⁻²⁴, uint32 ``out``), the generator advanced as far: a caller that decides the
    masks itself (:mod:`.della_mask`) gets torch's masks by comparing u with the same keep."""
    _run(generator, np.zeros(1, np.float32), out.reshape(-1), 2)
    return out


def _run(generator: torch.Generator, keep: np.ndarray, flat: np.ndarray, mode: int) -> None:
    """:func:`_draw` from the torch generator's state, written back advanced."""
    state = generator.get_state().numpy().copy()
    head = state[:24]
    left = int(head[8:12].view(np.int32)[0])
    nxt = int(head[16:24].view(np.uint64)[0])
    words = state[24:24 + N * 8].view(np.uint64).astype(np.uint32)
    pos = np.array([left, nxt], np.int64)
    _draw(words, pos, keep, flat, mode)
    head[8:12] = np.array([pos[0]], np.int32).view(np.uint8)
    head[16:24] = np.array([pos[1]], np.uint64).view(np.uint8)
    state[24:24 + N * 8] = words.astype(np.uint64).view(np.uint8)
    generator.set_state(torch.from_numpy(state))
