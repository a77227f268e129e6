"""slerp: spherical interpolation between A and B (beyond SuperMerger; sd-mecha's ``slerp``)."""
import torch

from . import calcmode

COLINEAR = 0.9995    # |cos ω| above this: (anti)parallel tensors, lerp (mergekit's DOT_THRESHOLD)


def slerp_tensors(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """With â = a/|a|, b̂ = b/|b|, ω = arccos(clamp(â·b̂, −1, 1)) over the flattened tensors:
    ``(â·sin((1−α)ω) + b̂·sin(αω)) / sin(ω) · lerp(|a|, |b|, α)`` (sd-mecha
    ``merge_methods/linear.py: slerp``; Shoemake 1985 with the norm interpolated linearly), in
    float32. Nearly colinear tensors (|cos ω| > 0.9995, as mergekit; sd-mecha only falls back on
    NaN), zero tensors and non-finite results fall back to ``lerp(a, b, α)``; the result is in A's
    dtype."""
    af, bf = a.float(), b.float()
    na, nb = af.norm(), bf.norm()
    if na == 0 or nb == 0:
        return torch.lerp(af, bf, alpha).to(a.dtype)
    an, bn = af / na, bf / nb
    dot = (an * bn).sum().clamp(-1, 1)
    if dot.abs() > COLINEAR:
        return torch.lerp(af, bf, alpha).to(a.dtype)
    omega = torch.arccos(dot)
    s = torch.sin(omega)
    res = (an * torch.sin((1 - alpha) * omega) + bn * torch.sin(alpha * omega)) / s * torch.lerp(na, nb, alpha)
    if not torch.isfinite(res).all():
        return torch.lerp(af, bf, alpha).to(a.dtype)
    return res.to(a.dtype)


@calcmode("slerp", modes=("weight_sum",), parallel=True,
          reference="sd-mecha merge_methods/linear.py slerp (beyond SuperMerger); K. Shoemake, "
                    "'Animating rotation with quaternion curves', SIGGRAPH 1985")
def slerp(a, b, c, alpha, beta, *, mode, out, ctx):
    """Weight sum along the great circle: α = 0 gives A, α = 1 gives B (see slerp_tensors)."""
    res = slerp_tensors(a, b, alpha)
    if out is not None:
        out.copy_(res)
        return out
    return res
