"""Orthogonal alignment of weight matrices, for the ``rotate`` calcmode: the orthogonal
Procrustes transform of one matrix onto another and its fractional powers.

A transform acts on the rows x of a (rows × p) matrix, x ↦ x·Qᵗ for an orthogonal Q and a real t:

- Tall or square matrices (rows ≥ p): Q = U·Vᴴ from the SVD of AᴴB (p × p), the rotation that
  minimises ‖A·Q − B‖ (Schönemann 1966). Fractional t through Q's eigendecomposition,
  Q = W·diag(λ)·Wᴴ, Qᵗ = W·diag(λᵗ)·Wᴴ (real part).
- Wide matrices (rows < p): Q only moves the rank-n subspace the rows span. With B's rows
  orthonormalised by a QR decomposition and the SVD of Aᴴ·Rᴴ, Q maps an orthonormal p × n frame V
  onto another, U, and leaves the complement alone: x ↦ x − x·V·Vᴴ + x·U·Vᴴ. A fraction t of it
  follows the geodesic of the Stiefel manifold between the two frames: with Δ = Log_V(U),
  L = Exp_V(Δ·(1+t)/2) and R = Exp_V(Δ·(1−t)/2), x ↦ x − x·R·Rᴴ + x·L·Rᴴ (t = 1 gives L = U,
  R = V; t = 0 gives the identity).
- The Stiefel logarithm is Zimmermann's algorithm (R. Zimmermann, "A matrix-algebraic algorithm
  for the Riemannian logarithm on the Stiefel manifold under the canonical metric", SIAM J.
  Matrix Anal. Appl. 38(2), 2017), the exponential Edelman, Arias & Smith (1998), eq. 2.45.

The same construction, step for step, as sd-mecha's ``merge_methods/svd.py`` (``rotate``,
``orthogonal_procrustes``, ``log_stiefel``, ``exp_stiefel``), which the tests compare against.
Pure functions on tensors; the caller picks the dtype (float32 as sd-mecha's default).
"""
from __future__ import annotations

import math

import torch


def qr_pos(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced QR decomposition with R's diagonal made non-negative (unique for full rank)."""
    q, r = torch.linalg.qr(x)
    s = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    s[s == 0] = 1
    return q * s.unsqueeze(-2), r * s.unsqueeze(-1)


def complete(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal m × n columns ``a`` (m > n) extended to an m × m orthogonal matrix: the new
    columns are a Householder QR basis of the part of the unit vectors e_{n+1}…e_m outside a's span."""
    m, n = a.shape[-2:]
    if m <= n:
        return a
    rest = torch.eye(m, dtype=a.dtype, device=a.device)[:, n:] - a @ a.mH[..., n:]
    return torch.cat((a, torch.linalg.householder_product(*torch.geqrf(rest))), dim=-1)


def real_logm(m: torch.Tensor) -> torch.Tensor:
    """The principal matrix logarithm of a (diagonalisable) real matrix through its
    eigendecomposition, W·diag(log λ)·W⁻¹, real part."""
    lam, w = torch.linalg.eig(m)
    return torch.linalg.solve(w, w * lam.log().unsqueeze(-2), left=False).real.to(m.dtype)


def sylvester_symmetric(s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The G with S·G + G·S = C for a symmetric S: in S's eigenbasis, G̃ᵢⱼ = C̃ᵢⱼ / (λᵢ + λⱼ)."""
    lam, vs = torch.linalg.eigh(s)
    g = (vs.mH @ c @ vs) / (lam.unsqueeze(-2) + lam.unsqueeze(-1))
    return vs @ g @ vs.mH


def exp_stiefel(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The Stiefel exponential at the n × p frame ``u`` (n > p) of the tangent ``delta``, under
    the canonical metric: with A = uᴴΔ and Q·R = Δ − u·A (QR, k = min(n − p, p) columns),
    M = expm([[A, −Rᴴ], [R, 0]]), the point is u·M₁₁ + Q·M₂₁."""
    n, p = u.shape[-2:]
    k = min(n - p, p)
    a = u.mH @ delta
    q, r = qr_pos(delta - u @ a)
    q, r = q[..., :k], r[..., :k, :]
    w = torch.cat((torch.cat((a, -r.mH), -1), torch.cat((r, torch.zeros_like(a[..., :k, :k])), -1)), -2)
    m = torch.linalg.matrix_exp(w)
    return u @ m[..., :p, :p] + q @ m[..., p:, :p]


def log_stiefel(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8, max_iters: int = 100) -> torch.Tensor:
    """The tangent Δ at the n × p frame ``a`` (n > p) with Exp_a(Δ) = ``b`` (Zimmermann 2017,
    Algorithm 1): complete [aᴴb; N] (from b − a·aᴴb = Q·N) to an orthogonal V, then rotate V's
    last columns by expm(G), G solving the symmetric Sylvester equation of the algorithm, until
    the lower-right block C of log V is below ``eps`` or stops shrinking (at most ``max_iters``
    times); Δ = a·L₁₁ + Q·L₂₁.

    Beyond sd-mecha, which runs until ``eps`` or ``max_iters``: in float32, ‖C‖ reaches its
    rounding floor (1e-4 to 1e-5 for SD's matrices) in two to four iterations and then only
    wobbles, so sd-mecha's default ε = 1e-8 made every wide key run all 100 iterations (an
    eigendecomposition of a 2p × 2p matrix each: 148 s for one 768 × 3072 CLIP key here, against
    about 6 s stopping at the floor). Both results lie within that floor of each other."""
    n, p = b.shape[-2:]
    k = min(n - p, p)
    m = a.mH @ b
    q, nm = qr_pos(b - a @ m)
    q, nm = q[..., :k], nm[..., :k, :]
    v = complete(torch.cat((m, nm), dim=-2))
    r, sigma, rh = torch.linalg.svd(v[..., p:, p:])
    q = q @ r
    v[..., p:, :p] = r.mH @ nm
    v[..., :p, p:] = v[..., :p, p:] @ rh.mH
    v[..., p:, p:] = torch.diag_embed(sigma)
    if torch.linalg.slogdet(v)[0] < 0:
        v[..., -1] *= -1
    diag = torch.arange(k, device=v.device)
    log, last = v, math.inf
    for _ in range(max(max_iters, 1)):
        log = real_logm(v)
        c = log[..., p:, p:]
        size = float(torch.linalg.matrix_norm(c))
        if size <= eps or size >= last:
            break
        last = size
        s = log[..., p:, :p] @ log[..., p:, :p].mH / 12
        s[..., diag, diag] -= 0.5
        v[..., p:] = v[..., p:] @ torch.linalg.matrix_exp(sylvester_symmetric(s, c))
    return a @ log[..., :p, :p] + q @ log[..., p:, :p]


def orthogonal_power(q: torch.Tensor, t: float) -> torch.Tensor:
    """Qᵗ of an orthogonal Q: the identity, Q, Qᴴ and integer powers directly, else
    W·diag(λᵗ)·Wᴴ from the eigendecomposition (principal branch), real part."""
    if math.isclose(t, 0.0):
        return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    if math.isclose(t, 1.0):
        return q
    if math.isclose(t, -1.0):
        return q.mH
    if math.isclose(t, round(t)):
        return torch.linalg.matrix_power(q, round(t))
    lam, w = torch.linalg.eig(q)
    return ((w * (lam ** t).unsqueeze(-2)) @ w.mH).real.to(q.dtype)


class Transform:
    """x ↦ x·Qᵗ for the Procrustes rotation of :func:`procrustes` (see the module's text)."""

    def __init__(self, q: torch.Tensor | None = None, u: torch.Tensor | None = None, v: torch.Tensor | None = None):
        self.q, self.u, self.v = q, u, v

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        if math.isclose(t, 0.0):
            return x
        if self.q is not None:
            return x @ orthogonal_power(self.q, t)
        u, v = self.u, self.v
        if math.isclose(t, 1.0):
            return x - x @ v @ v.mH + x @ u @ v.mH
        if math.isclose(t, -1.0):
            return x - x @ u @ u.mH + x @ v @ u.mH
        delta = log_stiefel(v, u)
        left, right = exp_stiefel(v, delta * (t + 1) / 2), exp_stiefel(v, delta * (1 - t) / 2)
        return x - x @ right @ right.mH + x @ left @ right.mH


def numerical_rank(s: torch.Tensor, shape) -> int:
    """How many of the singular values ``s`` (descending) stand above rounding: σ > σ₁·max(shape)·ε
    (numpy's ``matrix_rank`` rule)."""
    tol = s[..., :1] * max(shape[-2:]) * torch.finfo(s.dtype).eps
    return int((s > tol).sum(-1).min())


def unit_outside(x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor | None:
    """The part of the vector ``x`` outside the span of ``frame``'s orthonormal columns, as a unit
    column; None where that part is at rounding level."""
    rest = x - frame @ (frame.mH @ x)
    size = torch.linalg.vector_norm(rest)
    if not size > torch.linalg.vector_norm(x) * max(frame.shape[-2:]) * torch.finfo(x.dtype).eps:
        return None
    return (rest / size).unsqueeze(-1)


def complete_frames(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, shape, means):
    """Frames ``u``, ``v`` (columns paired by the singular values ``s``) whose last pair is
    arbitrary because centring took one rank from both matrices: that pair replaced by the unit
    parts of the removed row means outside the other columns, (m_A⊥, m_B⊥).

    Why: with centralization c < 1 the rows keep (1 − c)·m, and as c → 1 the pair the SVD finds
    for the vanishing singular value tends to exactly (m_A⊥, m_B⊥): AᴴB gains (1 − c)²·n·m_A·m_Bᵀ
    and nothing else, since centred rows sum to zero. So this is sd-mecha's result in the limit
    c → 1, where sd-mecha at c = 1 takes whatever rounding leaves in that direction (results that
    moved by 7–17 % of |B − A| between float32 and float64, and between a GPU and a CPU). A frame
    missing more than that one rank, or means with nothing outside it, keeps what rounding gave;
    a wide frame (``u`` narrower than it is tall) drops those columns instead."""
    k = u.shape[-1]
    r = numerical_rank(s, shape)
    if r >= k:
        return u, v
    if means is not None and r == k - 1:
        eu, ev = unit_outside(means[0], u[..., :r]), unit_outside(means[1], v[..., :r])
        if eu is not None and ev is not None:
            return torch.cat((u[..., :r], eu), -1), torch.cat((v[..., :r], ev), -1)
    if u.shape[-2] > k:
        return u[..., :max(r, 1)], v[..., :max(r, 1)]
    return u, v


def procrustes(a: torch.Tensor, b: torch.Tensor, cancel_reflection: bool = False,
               means: tuple[torch.Tensor, torch.Tensor] | None = None) -> Transform:
    """The orthogonal transform of the rows of ``a`` (rows × p) closest to ``b``.

    rows ≥ p: Q = U·Vᴴ from AᴴB = U·Σ·Vᴴ; ``cancel_reflection`` flips U's last column where
    det Q = −1, so that fractional powers stay real rotations. rows < p: Bᴴ = Q_b·R_b,
    Aᴴ·R_bᴴ = U·Σ·Vᴴ, and the frames U (p × rows) and V = Q_b·V (p × rows).

    ``means``: the row means (m_A, m_B) that were subtracted from ``a`` and ``b``; where centring
    left the product one rank short (square and wide matrices), :func:`complete_frames` fixes the
    pair that rounding would otherwise pick (beyond sd-mecha: its c → 1 limit)."""
    n, p = a.shape[-2:]
    if n < p:
        bq, br = torch.linalg.qr(b.mH)
        u, s, vh = torch.linalg.svd(a.mH @ br.mH, full_matrices=False)
        u, v = complete_frames(u, bq @ vh.mH, s, (n, p), means)
        return Transform(u=u, v=v)
    u, s, vh = torch.linalg.svd(a.mH @ b, full_matrices=False)
    u, v = complete_frames(u, vh.mH, s, (n, p), means)
    vh = v.mH
    if cancel_reflection:
        u[..., -1] /= torch.linalg.slogdet(u @ vh)[0]
    return Transform(q=u @ vh)
