"""Every scratch buffer follows its inputs' device. CI has no GPU, so the merge functions run
on the ``meta`` device: a temporary made on the CPU beside meta inputs fails exactly as it
would beside CUDA ones ("Expected all tensors to be on the same device")."""
import pytest
import torch

from merger.engine import modes
from merger.engine.adjust import apply_adjust

META = torch.device("meta")


def _t(*shape):
    return torch.empty(*shape, dtype=torch.float16, device=META)


@pytest.mark.parametrize("name,args", [
    ("weight_sum", (0.3,)), ("add_difference", (0.5,)), ("triple_sum", (0.2, 0.3)),
    ("triple_sum", (0.0, 0.0)), ("sum_twice", (0.3, 0.4)),
])
def test_modes_stay_on_the_inputs_device(name, args):
    fn = getattr(modes, name)
    a, b, c = _t(64, 32), _t(64, 32), _t(64, 32)
    out = fn(a, b, c, *args) if name != "weight_sum" else fn(a, b, *args)
    assert out.device == META and out.shape == a.shape


def test_adjust_colour_vector_on_the_tensors_device():
    assert apply_adjust(_t(4), [0.1, 0.2, 0.3, 0.4]).device == META
