"""Make the ImageReward reference fixture with THUDM's own ImageReward code (not run by the tests).

ImageReward's package needs torchvision, timm and fairscale, which cannot live beside this
project's torch, so this runs once in a separate environment, e.g.::

    python3.11 -m venv /tmp/irref
    /tmp/irref/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.27.4 timm fairscale==0.4.13 pillow
    git clone https://github.com/THUDM/ImageReward /tmp/ImageReward      # the model code, no weights
    /tmp/irref/bin/python tests/data/imagereward/make_reference.py /tmp/ImageReward

It builds THUDM's ``ImageReward`` module from their classes at a tiny size (ViT width 128,
text width 32; the real model is ViT-L/16 + BERT-base), fills it with seeded random weights
(rounded to fp16, the dtype stored), and writes into this folder: ``ImageReward.pt`` (its
state dict, as the real file), ``med_config.json``, ``vocab.txt``, three images and
``expected.json`` with the rewards their ``ImageReward.score`` returns for each prompt × image
(and the token ids of each prompt).
``tests/test_imagereward.py`` checks ``merger.sweeps.imagereward`` against those numbers.
"""
from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
PROMPTS = ["a photo of a cat", "a portrait of a woman, soft light", "red car on a road at night",
           "a cat " * 30]  # the last is longer than the 35 tokens ImageReward keeps
WORDS = ["a", "photo", "of", "cat", "portrait", "woman", ",", "soft", "light", "red", "car", "on", "road",
         "at", "night", "dog", "##s", "the", "in"]
MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
       "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 0, "encoder_width": 128,
       "add_cross_attention": True}


def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    out = []
    for w, h in ((224, 224), (300, 200), (96, 160)):   # exact, downscaled landscape, upscaled portrait
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 200
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)))
    return out


def package(src: Path, dst: Path) -> None:
    """Copy ImageReward.py and models/BLIP into a bare package (their __init__ pulls in CLIP,
    ReFL and diffusers, which the reward itself does not use)."""
    (dst / "models" / "BLIP").mkdir(parents=True)
    for init in (dst, dst / "models", dst / "models" / "BLIP"):
        (init / "__init__.py").write_text("")
    shutil.copy(src / "ImageReward" / "ImageReward.py", dst / "ImageReward.py")
    for f in ("blip.py", "blip_pretrain.py", "med.py", "vit.py"):
        shutil.copy(src / "ImageReward" / "models" / "BLIP" / f, dst / "models" / "BLIP" / f)


def main(src: str) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (HERE / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = dict(MED, vocab_size=len(vocab) + 2)      # + [DEC] and [ENC], as BLIP adds them
    (HERE / "med_config.json").write_text(json.dumps(med, indent=2) + "\n")
    tmp = Path(tempfile.mkdtemp())
    package(Path(src), tmp / "irsrc")
    sys.path.insert(0, str(tmp))
    bp = importlib.import_module("irsrc.models.BLIP.blip_pretrain")
    vit = importlib.import_module("irsrc.models.BLIP.vit")
    ir = importlib.import_module("irsrc.ImageReward")
    from transformers import BertTokenizer

    def tokenizer():     # BLIP's init_tokenizer, from the local vocabulary instead of the hub
        t = BertTokenizer(str(HERE / "vocab.txt"))
        t.add_special_tokens({"bos_token": "[DEC]"})
        t.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        t.enc_token_id = t.additional_special_tokens_ids[0]
        return t

    bp.init_tokenizer = tokenizer
    bp.create_vit = lambda *a, **k: (vit.VisionTransformer(img_size=224, patch_size=16, embed_dim=128, depth=2,
                                                           num_heads=2, mlp_ratio=2.0), 128)
    torch.manual_seed(0)
    model = ir.ImageReward(med_config=str(HERE / "med_config.json"), device="cpu")
    model.mlp = ir.MLP(med["hidden_size"])          # theirs is MLP(768), the real text width
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():    # weights that make the output depend on everything
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in)))
            p.copy_(p.half().float())
    model.eval()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               HERE / "ImageReward.pt")
    ims = images()
    for i, im in enumerate(ims):
        im.save(HERE / f"image{i}.png")
    with torch.no_grad():
        expected = [[model.score(p, im) for im in ims] for p in PROMPTS]
    ids = [model.blip.tokenizer(p, padding="max_length", truncation=True, max_length=35).input_ids for p in PROMPTS]
    (HERE / "expected.json").write_text(json.dumps({"prompts": PROMPTS, "rewards": expected, "input_ids": ids})
                                        + "\n")
    print(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
