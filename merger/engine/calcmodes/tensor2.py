"""tensor2: like tensor, but slices along axis 1 of multi-axis tensors (SuperMerger)."""
from . import calcmode
from .tensor import swap_slices


@calcmode("tensor2", modes=("weight_sum",), uses_beta=True,
          reference="SuperMerger mergers.py tensormerge(), calcmode 'tensor2'")
def tensor2(a, b, c, alpha, beta, *, mode, out, ctx):
    """Columns of axis 1 from B between β and α+β."""
    return swap_slices(a, b, alpha, beta, out if out is not None else a.clone(), second_axis=True)
