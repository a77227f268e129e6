"""smoothAdd MT: smoothAdd with keys filtered in parallel threads (same result)."""
from . import calcmode
from .smooth_add import smooth_add_tensor


@calcmode("smoothAddMT", modes=("add_difference",), parallel=True, aliases=("smoothAdd MT",),
          reference="SuperMerger mergers.py multithread_smoothadd(), calcmode 'smoothAdd MT'")
def smooth_add_mt(a, b, c, alpha, beta, *, mode, out, ctx):
    """Identical to smoothAdd; the engine runs keys on a thread pool."""
    return smooth_add_tensor(a, b, c, alpha)
