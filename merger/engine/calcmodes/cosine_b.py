"""cosineB: keep B's structure, take details from A (SuperMerger)."""
from ..similarity import sims_range
from . import calcmode
from .cosine_a import cosine_merge


@calcmode("cosineB", modes=("weight_sum",), skip_key=lambda k: "first_stage_model" in k,
          prepare=lambda a_sd, b_sd: sims_range(a_sd, b_sd, normalized_only=False),
          reference="SuperMerger mergers.py cosine()/precosine(), calcmode 'cosineB'")
def cosine_b(a, b, c, alpha, beta, *, mode, out, ctx):
    """k = clip((s - min)/(max - min) - α, 0, 1) with s the combined similarity of the raw
    tensors; result = lerp(B, A, k) in float32."""
    return cosine_merge(a, b, alpha, ctx.stats, normalize=False)
