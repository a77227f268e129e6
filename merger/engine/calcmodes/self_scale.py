"""self: multiply model A by α (SuperMerger)."""
import torch

from . import calcmode

SELF_SKIP = ("to_out", "proj_out", "norm")


@calcmode("self", modes=("weight_sum",), needs_b=False, elementwise=True,
          skip_key=lambda k: any(s in k for s in SELF_SKIP),
          reference="SuperMerger mergers.py smerge(), calcmode 'self'")
def self_scale(a, b, c, alpha, beta, *, mode, out, ctx):
    """A·α, in A's dtype; α = 0 leaves A unchanged, and keys containing to_out, proj_out or
    norm are never scaled."""
    if alpha == 0:
        return a
    return torch.mul(a, alpha, out=out) if out is not None else a * alpha
