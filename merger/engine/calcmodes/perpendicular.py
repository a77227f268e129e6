"""perpendicular: add only the part of B − C that is orthogonal to A − C (beyond SuperMerger;
sd-mecha's ``add_perpendicular``)."""
import torch

from . import calcmode


def perpendicular_component(a_diff: torch.Tensor, b_diff: torch.Tensor) -> torch.Tensor:
    """The component of ``b_diff`` orthogonal to ``a_diff`` over the flattened tensors:
    ``b − a·Σ((a/‖a‖)·(b/‖a‖))`` (sd-mecha ``merge_methods/linear.py: perpendicular_component``,
    evaluated the same way), and zeros where that holds a NaN, as sd-mecha returns: that is where
    ‖a‖ = 0 (A equals C), where the direction to project out is undefined."""
    norm = torch.linalg.norm(a_diff)
    res = b_diff - a_diff * (a_diff / norm * (b_diff / norm)).sum()
    if bool(res.isnan().any()):
        return torch.zeros_like(a_diff)
    return res


@calcmode("perpendicular", modes=("add_difference",), parallel=True,
          reference="sd-mecha merge_methods/wrappers.py add_perpendicular and linear.py "
                    "perpendicular_component (beyond SuperMerger)")
def perpendicular(a, b, c, alpha, beta, *, mode, out, ctx):
    """A + α·⊥(B − C against A − C), in float32 (:func:`perpendicular_component`): B's change
    from C without the part that points the way A already moved from C, so A's own change is
    neither doubled nor undone. Keys where A equals C keep A (sd-mecha's zeros); the result is in
    A's dtype."""
    a32 = a.float()
    c32 = c.float()
    res = a32.add(perpendicular_component(a32 - c32, b.float() - c32), alpha=alpha)
    if out is not None:
        return out.copy_(res)
    return res.to(a.dtype)
