"""tensor: swap whole slices of tensors between A and B instead of averaging (SuperMerger)."""
from . import calcmode


def swap_slices(a, b, alpha, beta, out, second_axis: bool):
    """SuperMerger ``tensormerge``. With n = size of axis 0: if α+β ≤ 1 the result is A with
    rows [⌊nβ⌋, ⌊n(α+β)⌋) taken from B, else B with rows [⌊n(α+β-1)⌋, ⌊nβ⌋) taken from A.
    tensor2 (``second_axis``) slices axis 1 of tensors with 2+ axes, sizing the slice by axis 1
    only when that axis is longer than 100 (else by axis 0, as the original does)."""
    if a.dim() == 0:
        return a
    n = a.shape[0]
    if second_axis and a.dim() > 1 and a.shape[1] > 100:
        n = a.shape[1]
    if alpha + beta <= 1:
        start, end, base, donor = int(n * beta), int(n * (alpha + beta)), a, b
    else:
        start, end, base, donor = int(n * (alpha + beta - 1)), int(n * beta), b, a
    out.copy_(base)
    if second_axis and a.dim() > 1:
        out[:, start:end] = donor[:, start:end]
    else:
        out[start:end] = donor[start:end]
    return out


@calcmode("tensor", modes=("weight_sum",), uses_beta=True,
          reference="SuperMerger mergers.py tensormerge(), calcmode 'tensor'")
def tensor(a, b, c, alpha, beta, *, mode, out, ctx):
    """Rows of axis 0 from B between β and α+β (fractions of the axis)."""
    return swap_slices(a, b, alpha, beta, out if out is not None else a.clone(), second_axis=False)
