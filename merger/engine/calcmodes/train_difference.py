"""trainDifference: add B-C to A as if fine-tuning A (SuperMerger)."""
import torch

from . import calcmode


@calcmode("trainDifference", modes=("add_difference",),
          reference="SuperMerger mergers.py traindiff(), calcmode 'trainDifference'")
def train_difference(a, b, c, alpha, beta, *, mode, out, ctx):
    """A + 1.8·α · sign(B-C)·|B-C| · |B-A| / (|B-C| + |B-A|) in float32 (0 where both
    distances are 0); keys where B equals C exactly keep A."""
    if torch.equal(b, c):
        return a
    a32, b32, c32 = a.float(), b.float(), c.float()
    diff = b32 - c32
    dist_bc = diff.abs()
    dist_ba = (b32 - a32).abs()
    total = dist_bc + dist_ba
    scale = torch.where(total != 0, dist_ba / total, torch.tensor(0.0))
    scale = torch.sign(diff) * scale.abs()
    return (a32 + scale * dist_bc * (alpha * 1.8)).to(a.dtype)
