"""Per-block similarity (Analysis tab math)."""
import torch

from merger.analysis import asimilarity, block_cosines, tensor_cosines
from merger.blocks import block_ids
from merger.synthetic import random_checkpoint


def test_identical_models_are_100_everywhere():
    a = random_checkpoint("sd1", seed=1)
    blocks = block_cosines(a, a, "sd1")
    assert [b for b, _ in blocks] == block_ids("sd1") and all(v == 100.0 for _, v in blocks)
    assert all(v == 100.0 for _, v in asimilarity(a, a, "sd1"))


def test_changing_one_block_shows_only_there():
    a = random_checkpoint("sd1", seed=1)
    b = dict(a)
    for k in a:
        if ".output_blocks.4." in k and a[k].is_floating_point():
            b[k] = -a[k]
    blocks = dict(block_cosines(a, b, "sd1"))
    assert blocks["OUT04"] == -100.0 and all(v == 100.0 for k, v in blocks.items() if k != "OUT04")
    asim = dict(asimilarity(a, b, "sd1"))
    assert asim["OUT04"] < 100.0 and asim["OUT05"] == 100.0
    rows = tensor_cosines(a, b, "sd1", ("VAE",))
    assert rows and all(blk == "VAE" and v == 100.0 for blk, _, v in rows)


def test_min_aggregation_and_sdxl():
    a, b = random_checkpoint("sdxl", seed=1), random_checkpoint("sdxl", seed=2)
    mean = dict(block_cosines(a, b, "sdxl"))
    low = dict(block_cosines(a, b, "sdxl", how="min"))
    assert set(mean) == set(block_ids("sdxl")) and all(low[k] <= mean[k] for k in mean)
    assert {blk for blk, _ in asimilarity(a, b, "sdxl")} <= set(block_ids("sdxl"))
    assert torch.is_tensor(a["model.diffusion_model.out.2.weight"])
