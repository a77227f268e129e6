"""rotate: align A with B by an orthogonal transform (beyond SuperMerger; sd-mecha's ``rotate``)."""
import math

import torch

from ...errors import MergeError
from ..orthogonal import procrustes
from . import calcmode


def rotate_tensors(a: torch.Tensor, b: torch.Tensor, alignment: float, alpha: float,
                   centralization: float = 1.0, compute: torch.dtype = torch.float32) -> torch.Tensor:
    """A turned towards B by a fraction ``alignment`` of the orthogonal transform that best maps
    it onto B, its scale part moved towards B's by ``alpha`` (sd-mecha ``merge_methods/svd.py:
    rotate``, step for step), in ``compute`` (float32), returned in A's dtype:

    1. A and B as matrices: a convolution with a kernel larger than 1 × 1 as
       (out·in) × (kh·kw), anything else as out × (the rest).
    2. Centre the columns: Ā = A − c·mean_rows(A), likewise B (c = ``centralization``).
    3. Q from :func:`..orthogonal.procrustes` (Ā onto B̄; reflections cancelled when the
       alignment is fractional; for wide and square keys, the pair of directions that centring
       leaves undetermined is taken from the removed means: sd-mecha's limit as c → 1, where
       sd-mecha at c = 1 keeps whatever rounding picks).
    4. If α ≠ 0: Ā ← lerp(Ā, B̄·Q⁻¹, α) (B brought back into A's orientation).
    5. Result: Ā·Q^alignment + lerp(mean_A, mean_B, alignment).

    alignment = α = 0 gives A; alignment = α = 1 gives B. 1-D keys, and keys where A and B agree
    in float16, are lerp(A, B, α)."""
    if math.isclose(alignment, 0.0) and math.isclose(alpha, 0.0):
        return a
    if math.isclose(alignment, 1.0) and math.isclose(alpha, 1.0):
        return b.to(a.dtype, copy=True)          # never the loaded B itself: the result may be changed in place
    a32, b32 = a.to(compute), b.to(compute)
    if a.dim() <= 1 or torch.allclose(a.half(), b.half()):
        return torch.lerp(a32, b32, alpha).to(a.dtype)
    if a.dim() == 4 and a.shape[-2:].numel() != 1:
        shape = (a.shape[:2].numel(), a.shape[2:].numel())
    else:
        shape = (a.shape[0], a.shape[1:].numel())
    a2, b2 = a32.reshape(shape), b32.reshape(shape)
    mean_a, mean_b = a2.mean(0) * centralization, b2.mean(0) * centralization
    a2, b2 = a2 - mean_a, b2 - mean_b
    turn = procrustes(a2, b2, cancel_reflection=not math.isclose(alignment, round(alignment)),
                      means=(mean_a, mean_b))
    if not math.isclose(alpha, 0.0):
        a2 = torch.lerp(a2, turn(b2, -1.0), alpha)
    res = turn(a2, alignment) + torch.lerp(mean_a, mean_b, alignment)
    return res.reshape(a.shape).to(a.dtype)


@calcmode("rotate", modes=("weight_sum",), uses_beta=True,
          reference="sd-mecha merge_methods/svd.py rotate (beyond SuperMerger); P. Schönemann, 'A "
                    "generalized solution of the orthogonal Procrustes problem', Psychometrika 1966; "
                    "R. Zimmermann, SIAM J. Matrix Anal. Appl. 38(2), 2017 (Stiefel logarithm)")
def rotate(a, b, c, alpha, beta, *, mode, out, ctx):
    """Weight sum by rotation: α is the alignment (how far A turns towards B), β how far A's
    scale moves towards B's (see rotate_tensors). A decomposition that fails (LAPACK's SVD or
    eigensolver not converging on a degenerate key) is a clear error naming the key."""
    try:
        res = rotate_tensors(a, b, alpha, beta)
    except torch.linalg.LinAlgError as e:
        where = f" in {ctx.key}" if ctx is not None and ctx.key else ""
        raise MergeError(f"calcmode rotate failed{where}: {str(e).splitlines()[0]}") from None
    if out is not None and res is not a:
        return out.copy_(res)
    return res
