"""normal: the plain formula of the merge mode."""
from .. import modes
from . import calcmode


@calcmode("normal", reference="SuperMerger mergers.py smerge(), calcmode 'normal'; formulas in "
          "merger/modes.py", uses_beta=False, elementwise=True)
def normal(a, b, c, alpha, beta, *, mode, out, ctx):
    if mode == "weight_sum":
        return modes.weight_sum(a, b, alpha, out)
    if mode == "add_difference":
        return modes.add_difference(a, b, c, alpha, out)
    if mode == "triple_sum":
        return modes.triple_sum(a, b, c, alpha, beta, out)
    return modes.sum_twice(a, b, c, alpha, beta, out)
