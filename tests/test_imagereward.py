"""ImageReward on transformers' BLIP classes, checked against THUDM's own ImageReward code.

``tests/data/imagereward`` was made by ``make_reference.py`` there: THUDM's ``ImageReward``
module at a tiny size with seeded weights, its state dict, and the rewards its ``score`` gave
for 4 prompts × 3 images (square, landscape and portrait, so resize and crop are exercised).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from merger.errors import MergeError
from merger.sweeps.imagereward import ImageReward, vision_config, vision_key

DATA = Path(__file__).parent / "data" / "imagereward"


@pytest.fixture(scope="module")
def expected():
    return json.loads((DATA / "expected.json").read_text())


@pytest.fixture(scope="module")
def images():
    return [Image.open(DATA / f"image{i}.png").convert("RGB") for i in range(3)]


def copy_model(dst: Path, *skip: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("ImageReward.pt", "med_config.json", "vocab.txt"):
        if f not in skip:
            shutil.copy(DATA / f, dst / f)
    return dst


def test_rewards_equal_thudm_imagereward(expected, images):
    model = ImageReward(DATA)
    for prompt, want, ids in zip(expected["prompts"], expected["rewards"], expected["input_ids"]):
        tok = model.tokenizer(prompt, padding="max_length", truncation=True, max_length=35).input_ids
        assert tok == ids
        got = model(images, [prompt] * len(images))
        assert torch.allclose(got, torch.tensor(want), rtol=1e-5, atol=1e-4), (prompt, got, want)
    flat = [r for row in expected["rewards"] for r in row]
    assert max(flat) - min(flat) > 2          # the fixture's rewards differ: a wrong map could not pass


def test_pairs_are_scored_independently(expected, images):
    model = ImageReward(DATA)
    prompts = expected["prompts"][:3]
    got = model(images, prompts)                                    # image i with prompt i, one batch
    want = [expected["rewards"][i][i] for i in range(3)]
    assert torch.allclose(got, torch.tensor(want), rtol=1e-5, atol=1e-4)


def test_safetensors_weights_and_default_med_config(tmp_path, expected, images):
    import safetensors.torch as st
    d = copy_model(tmp_path / "ir", "ImageReward.pt")
    sd = torch.load(DATA / "ImageReward.pt", weights_only=True)
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "ImageReward.safetensors"))
    got = ImageReward(d)(images[:1], expected["prompts"][:1])
    assert torch.allclose(got, torch.tensor([expected["rewards"][0][0]]), atol=1e-4)
    (d / "med_config.json").unlink()      # the published BERT-base config then: too big for these weights
    with pytest.raises(MergeError, match="do not fit its config"):
        ImageReward(d)


def test_scorer_moves_its_models_to_the_workstation_device():
    from merger.sweeps.objectives import Scorer
    reward = ImageReward(DATA)
    Scorer(None, reward=reward).to("meta")
    assert {p.device.type for m in (reward.vision, reward.text, reward.head) for p in m.parameters()} == {"meta"}


def test_real_model_shapes_give_vit_l():
    """ImageReward v1.0 is BLIP's ViT-L/16 at 224 px: 24 blocks, 16 heads of 64."""
    shapes = {"embeddings.class_embedding": (1, 1, 1024), "embeddings.patch_embedding.weight": (1024, 3, 16, 16),
              "embeddings.position_embedding": (1, 197, 1024), "encoder.layers.0.mlp.fc1.weight": (4096, 1024),
              **{f"encoder.layers.{i}.layer_norm1.weight": (1024,) for i in range(24)}}
    cfg = vision_config(shapes)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size, cfg.intermediate_size) == (24, 16, 224, 4096)
    assert vision_key("blocks.23.attn.qkv.weight") == "encoder.layers.23.self_attn.qkv.weight"
    assert vision_key("norm.bias") == "post_layernorm.bias"


def test_vocabulary_from_a_local_hub_cache(tmp_path, monkeypatch, expected, images):
    import huggingface_hub
    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: asked.append((repo, name)) or str(DATA / "vocab.txt"))
    got = ImageReward(copy_model(tmp_path / "ir", "vocab.txt"))(images[:1], expected["prompts"][:1])
    assert asked == [("bert-base-uncased", "vocab.txt")]
    assert torch.allclose(got, torch.tensor([expected["rewards"][0][0]]), atol=1e-4)


def test_missing_or_bad_files_are_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)   # nothing cached
    with pytest.raises(MergeError, match="ImageReward folder not found"):
        ImageReward(tmp_path / "nope")
    with pytest.raises(MergeError, match="no ImageReward weights"):
        ImageReward(copy_model(tmp_path / "a", "ImageReward.pt"))
    with pytest.raises(MergeError, match="no BERT vocabulary"):
        ImageReward(copy_model(tmp_path / "b", "vocab.txt"))
    d = copy_model(tmp_path / "c")
    (d / "ImageReward.pt").write_bytes((DATA / "ImageReward.pt").read_bytes()[:5000])
    with pytest.raises(MergeError, match="could not read ImageReward.pt"):
        ImageReward(d)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))
    torch.save({"x": Evil()}, d / "ImageReward.pt")
    with pytest.raises(MergeError, match="could not read ImageReward.pt"):
        ImageReward(d)
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}, d / "ImageReward.pt")
    with pytest.raises(MergeError, match="not an ImageReward state dict"):
        ImageReward(d)
    sd = torch.load(DATA / "ImageReward.pt", weights_only=True)
    for broken in ({**sd, "blip.visual_encoder.extra.weight": torch.zeros(2)},        # a key no ViT has
                   {k: v for k, v in sd.items() if k != "mlp.layers.4.weight"},         # a head layer missing
                   {k: v for k, v in sd.items() if k != "blip.visual_encoder.pos_embed"}):
        torch.save(broken, d / "ImageReward.pt")
        with pytest.raises(MergeError, match="do not fit its config"):
            ImageReward(d)
    d = copy_model(tmp_path / "e")
    (d / "vocab.txt").write_text((DATA / "vocab.txt").read_text() + "".join(f"w{i}\n" for i in range(50)))
    with pytest.raises(MergeError, match="the model knows"):
        ImageReward(d)
