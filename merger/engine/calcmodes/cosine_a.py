"""cosineA: keep A's structure, take B where the two agree least (SuperMerger)."""
import torch

from ..similarity import combined_similarity, sims_range
from . import calcmode


def cosine_merge(a, b, alpha, stats, normalize: bool):
    lo, hi = stats
    k = (combined_similarity(a, b, normalize) - lo) / (hi - lo) - alpha
    k = k.clip(min=0, max=1.0)
    return torch.lerp(b.float(), a.float(), k).to(a.dtype)


@calcmode("cosineA", modes=("weight_sum",), skip_key=lambda k: "first_stage_model" in k,
          prepare=lambda a_sd, b_sd: sims_range(a_sd, b_sd, normalized_only=True),
          reference="SuperMerger mergers.py cosine()/precosine(), calcmode 'cosineA'; "
                    "recoilme/losslessmix")
def cosine_a(a, b, c, alpha, beta, *, mode, out, ctx):
    """k = clip((s - min)/(max - min) - |α|, 0, 1) with s the combined similarity of the
    dim-0-normalised tensors; result = lerp(B, A, k) in float32."""
    return cosine_merge(a, b, abs(alpha), ctx.stats, normalize=True)
