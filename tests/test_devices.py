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


@pytest.mark.parametrize("kind", ["weight_sum", "add_difference", "ties"])
def test_a_merge_on_another_device_copies_each_input_once(monkeypatch, kind):
    """Merging on a GPU copies every key's inputs from the host once: A's tensor is both the
    output's template and the first input, and was copied twice."""
    from merger.engine import merge
    from merger.recipe import Recipe
    from tests.conftest import tiny
    A, B, C = (tiny(seed=s, dtype=torch.float16) for s in (1, 2, 3))
    recipe = {"weight_sum": Recipe("a", "b", alpha=0.3),
              "add_difference": Recipe("a", "b", "c", mode="add_difference", alpha=0.5),
              "ties": Recipe("a", method="ties", models=["1", "2"], alpha=1.0, density=0.2)}[kind]
    copied: list[int] = []
    real_to = torch.Tensor.to
    stored = {id(t) for ck in (A, B, C) for t in ck.tensors.values()}

    def to(self, *a, **k):
        if id(self) in stored:
            copied.append(id(self))
        return real_to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", to)
    if kind == "ties":
        res = merge(recipe, A, models=[B, C], device="meta")
    else:
        res = merge(recipe, A, B, C if recipe.uses_c() else None, device="meta")
    assert {t.device.type for t in res.tensors.values()} == {"meta"}
    assert len(copied) == len(set(copied))
    inputs = 3 if recipe.uses_c() or kind == "ties" else 2
    merged = set(res.plan.merged_keys)
    assert len(copied) == sum(inputs if k in merged else 1 for k in A.tensors)
