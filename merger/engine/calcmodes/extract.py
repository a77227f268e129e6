"""extract: keep the (dis)similar features of B-A and C-A (SuperMerger, by subaqua)."""
import torch
import torch.nn.functional as F

from ...errors import MergeError
from . import calcmode


def _check(recipe):
    if not (0 <= recipe.alpha <= 1 and 0 <= recipe.beta <= 1):
        raise MergeError("extract needs 0 ≤ alpha ≤ 1 and 0 ≤ beta ≤ 1")
    if recipe.gamma < 0:
        raise MergeError("extract needs gamma ≥ 0")
    for name in ("mbw_alpha", "mbw_beta"):
        if any(not 0 <= v <= 1 for v in getattr(recipe, name) or []):
            raise MergeError(f"extract needs every {name} value in [0, 1]")


def extract_features(base, a, b, alpha, beta, gamma):
    """With a = A'-base, b = B'-base and c = cos(a, b) along the last axis (clamped to
    [-1, 1]), d = ((c+1)/2)^γ: base + lerp(a, b, α) · lerp(d, 1-d, β) (SuperMerger
    ``extract_super``)."""
    dtype = base.dtype
    base32 = base.float()
    a, b = a.float() - base32, b.float() - base32
    c = F.cosine_similarity(a, b, -1).clamp(-1, 1).unsqueeze(-1)
    d = ((c + 1) / 2) ** gamma
    return (base32 + torch.lerp(a, b, alpha) * torch.lerp(d, 1 - d, beta)).to(dtype)


@calcmode("extract", modes=("add_difference",), uses_beta=True, check=_check,
          reference="SuperMerger mergers.py extract_super(), calcmode 'extract' (calcmode_en.md)")
def extract(a, b, c, alpha, beta, *, mode, out, ctx):
    """α: B (0) … C (1); β: similar (0) … dissimilar (1) features; γ = recipe.gamma."""
    return extract_features(a, b, c, alpha, beta, ctx.gamma)
