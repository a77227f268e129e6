"""smoothAdd: add a median- then Gaussian-filtered B-C (SuperMerger)."""
import torch

from . import calcmode


def smooth_difference(b, c):
    """median_filter(B-C, size=3) then gaussian_filter(sigma=1), over every tensor axis,
    on float32 (B-C itself rounded to the model dtype first, as SuperMerger stores it). The
    filters are scipy's, on the CPU (as SuperMerger's); the result goes back to B's device.
    scipy.ndimage is imported here, not with the module: it is 0.4 s of every CLI start."""
    import scipy.ndimage
    diff = torch.sub(b, c).float().cpu().numpy()
    filtered = scipy.ndimage.median_filter(diff, size=3)
    return torch.from_numpy(scipy.ndimage.gaussian_filter(filtered, sigma=1)).to(b.device)


def smooth_add_tensor(a, b, c, alpha):
    return (a.float() + alpha * smooth_difference(b, c)).to(a.dtype)


@calcmode("smoothAdd", modes=("add_difference",),
          reference="SuperMerger mergers.py smerge(), calcmode 'smoothAdd'")
def smooth_add(a, b, c, alpha, beta, *, mode, out, ctx):
    """A + α · gaussian(median(B-C, 3), σ=1)."""
    return smooth_add_tensor(a, b, c, alpha)
