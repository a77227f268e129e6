"""perpendicular (sd-mecha's add_perpendicular) against sd-mecha and a reference from the
definition, its edge cases, and as an add difference calcmode with MBW."""
import pytest
import torch

from merger.engine import merge
from merger.engine.calcmodes.perpendicular import perpendicular, perpendicular_component
from merger.errors import MergeError
from merger.recipe import Recipe
from tests.conftest import tiny

mecha_linear = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.linear")


def mecha_add_perpendicular(a, b, c, alpha):
    """sd-mecha's add_perpendicular graph (wrappers.py) on one key: A + α·⊥(B − C, A − C)."""
    perp = mecha_linear.perpendicular_component.__wrapped__(a - c, b - c)
    return a.addcmul(perp, torch.tensor(alpha))


def reference(a, b, c, alpha):
    """From the definition, in float64: remove from d = B − C its projection on u = A − C."""
    u, d = (a - c).double().flatten(), (b - c).double().flatten()
    perp = d - u * (u @ d) / (u @ u)
    return (a.double() + alpha * perp.reshape(a.shape)).float()


def perp_merge(a, b, c, alpha):
    """The calcmode on one key."""
    return perpendicular(a, b, c, alpha, 0.0, mode="add_difference", out=None, ctx=None)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.7, -0.3])
def test_equals_sd_mecha_and_the_definition(alpha):
    g = torch.Generator().manual_seed(5)
    for shape in [(9, 4), (3, 5, 3, 3), (17,)]:
        a, b, c = (torch.randn(shape, generator=g) for _ in range(3))
        ours = perp_merge(a, b, c, alpha)
        torch.testing.assert_close(ours, mecha_add_perpendicular(a, b, c, alpha), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, reference(a, b, c, alpha), rtol=1e-5, atol=1e-5)


def test_the_added_part_is_orthogonal_to_a_minus_c():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(40, 30, generator=g) for _ in range(3))
    added = perp_merge(a, b, c, 1.0) - a
    cos = torch.nn.functional.cosine_similarity(added.flatten(), (a - c).flatten(), dim=0)
    assert abs(float(cos)) < 1e-5
    assert float(added.norm()) > 0.5 * float((b - c).norm())       # most of B − C is still added


def test_edge_cases():
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(6, 5, generator=g) for _ in range(3))
    # A = C: no direction to project out; sd-mecha returns zeros, so the key keeps A
    assert torch.equal(perp_merge(c.clone(), b, c, 0.8), c)
    assert torch.equal(perpendicular_component(torch.zeros(3), torch.ones(3)), torch.zeros(3))
    # B − C parallel to A − C: nothing perpendicular is left
    torch.testing.assert_close(perp_merge(c + 2 * (a - c), c + 0.5 * (a - c), c, 1.0), c + 2 * (a - c), atol=1e-5, rtol=0)
    # B = C: nothing to add
    torch.testing.assert_close(perp_merge(a, c, c, 0.7), a)
    # α = 0 is A
    assert torch.equal(perp_merge(a, b, c, 0.0), a)
    # fp16 in, fp16 out, computed in float32
    half = perp_merge(a.half(), b.half(), c.half(), 0.5)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, reference(a.half().float(), b.half().float(), c.half().float(), 0.5).half())


def test_is_an_add_difference_calcmode_with_mbw():
    A, B, C = tiny("sd1", 1), tiny("sd1", 2), tiny("sd1", 3)
    vec = [0.5] * 26
    vec[3] = 0.9
    out = merge(Recipe("a", "b", "c", mode="add_difference", calcmode="perpendicular", mbw_alpha=vec), A, B, C).tensors
    k = "model.diffusion_model.input_blocks.2.1.proj_in.weight"          # IN02: alpha 0.9
    t = (A.tensors[k], B.tensors[k], C.tensors[k])
    torch.testing.assert_close(out[k], mecha_add_perpendicular(*t, 0.9))
    k2 = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    t2 = (A.tensors[k2], B.tensors[k2], C.tensors[k2])
    torch.testing.assert_close(out[k2], mecha_add_perpendicular(*t2, 0.5))
    with pytest.raises(MergeError, match="calcmode 'perpendicular' works only with"):
        merge(Recipe("a", "b", mode="weight_sum", calcmode="perpendicular"), A, B)
