"""slerp against sd-mecha's implementation and its edge cases."""
import pytest
import torch

from merger.engine.calcmodes.slerp import slerp_tensors
from merger.engine import merge
from merger.recipe import Recipe
from tests.conftest import tiny

mecha_linear = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.linear")


def mecha_slerp(a, b, alpha):
    fn = getattr(mecha_linear.slerp, "__wrapped__", mecha_linear.slerp)
    return fn(a, b, alpha=torch.tensor(alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9, 1.0, 1.3, -0.2])
def test_slerp_equals_sd_mecha(alpha):
    g = torch.Generator().manual_seed(3)
    for shape in [(7, 5), (4, 3, 3, 3), (11,)]:
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        torch.testing.assert_close(slerp_tensors(a, b, alpha), mecha_slerp(a, b, alpha), rtol=1e-5, atol=1e-6)


def test_slerp_keeps_the_great_circle_and_falls_back_to_lerp():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    mid = slerp_tensors(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0]) / 2**0.5 * 1.5)          # on the arc, norm lerped
    assert torch.equal(slerp_tensors(a, b, 0.0), a) and torch.allclose(slerp_tensors(a, b, 1.0), b)
    same = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(slerp_tensors(same, 2 * same, 0.5), torch.lerp(same, 2 * same, 0.5))      # colinear
    zero = torch.zeros(3)
    assert torch.equal(slerp_tensors(zero, same, 0.5), torch.lerp(zero, same, 0.5))
    half = slerp_tensors(a.half(), b.half(), 0.5)
    assert half.dtype == torch.float16


def test_slerp_is_a_weight_sum_calcmode_with_mbw():
    A, B = tiny("sd1", 1), tiny("sd1", 2)
    vec = [0.5] * 26
    vec[3] = 0.9
    out = merge(Recipe("a", "b", calcmode="slerp", mbw_alpha=vec), A, B).tensors
    k = "model.diffusion_model.input_blocks.2.1.proj_in.weight"          # IN02: alpha 0.9
    torch.testing.assert_close(out[k], slerp_tensors(A.tensors[k], B.tensors[k], 0.9))
    k2 = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    torch.testing.assert_close(out[k2], slerp_tensors(A.tensors[k2], B.tensors[k2], 0.5))
