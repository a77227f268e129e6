"""ImageReward (Xu et al. 2023, arXiv 2304.05977; THUDM/ImageReward) from local files, on
transformers' BLIP classes — the ``image-reward`` package itself needs torchvision, timm and
fairscale, which cannot sit beside this project's torch.

The model, as THUDM's ``ImageReward.score``:
``reward = (MLP(BLIP_text(prompt ids, cross-attending to ViT(image))[CLS]) − 0.16717362830052426)
/ 1.0333394966054072`` with the prompt padded/truncated to 35 BERT tokens and the image resized
(bicubic, short side 224), centre-cropped to 224 and normalised with CLIP's mean/std.

The folder holds ``ImageReward.pt`` (or ``.safetensors``; THUDM/ImageReward's state dict, loaded
with ``weights_only=True``), optionally ``med_config.json`` (the published BERT-base values are used
without it) and bert-base-uncased's ``vocab.txt`` (else a local Hugging Face cache of
``bert-base-uncased``). Nothing is downloaded. ``tests/test_imagereward.py`` checks the rewards
against THUDM's own code (fixture made by ``tests/data/imagereward/make_reference.py``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import MergeError
from ..pipeline.resident import empty_module
from .objectives import CLIP_MEAN, CLIP_STD

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
SIZE = 224
WEIGHT_FILES = ("ImageReward.pt", "ImageReward.safetensors")
# THUDM/ImageReward med_config.json (BERT-base with cross-attention); its encoder_width is the ViT's.
MED_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                "max_position_embeddings": 512, "vocab_size": 30524, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                "pad_token_id": 0}
_VISION = [(r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
           (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^norm\.", "post_layernorm."),
           (r"^blocks\.(\d+)\.norm(\d)\.", r"encoder.layers.\1.layer_norm\2."),
           (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
           (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
           (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp.")]
_HEAD = (0, 2, 4, 6, 7)          # the Linear layers of THUDM's MLP (dropouts between them)


def vision_key(key: str) -> str:
    """BLIP/timm ViT name (``blocks.3.attn.qkv.weight``) → transformers' BlipVisionModel name."""
    for pat, rep in _VISION:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    raise KeyError(key)


def vision_config(shapes: dict[str, tuple]):
    """The ViT's config from its tensors' shapes (transformers names). BLIP's ViTs have 64-wide
    heads (ViT-B 768/12, ViT-L 1024/16 in ImageReward), which the file does not record."""
    from transformers import BlipVisionConfig
    width = shapes["embeddings.class_embedding"][-1]
    patch = shapes["embeddings.patch_embedding.weight"][-1]
    grid = round((shapes["embeddings.position_embedding"][1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
    return BlipVisionConfig(hidden_size=width, intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                            num_hidden_layers=depth, num_attention_heads=max(1, width // 64), image_size=grid * patch,
                            patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0)


def preprocess(images) -> torch.Tensor:
    """torchvision's ``Resize(224, BICUBIC)`` (short side to 224, long side ``int(224·long/short)``),
    ``CenterCrop(224)`` (offsets ``round((size − 224) / 2)``), ``ToTensor``, CLIP ``Normalize``."""
    from PIL import Image
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            size = (SIZE, int(SIZE * h / w))
        else:
            size = (int(SIZE * w / h), SIZE)
        im = im.resize(size, Image.Resampling.BICUBIC)
        left, top = int(round((im.width - SIZE) / 2.0)), int(round((im.height - SIZE) / 2.0))
        a = np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32) / 255
        out.append((a - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().contiguous()


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    path = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if path is None:
        raise MergeError(f"no ImageReward weights in {folder} (expected {' or '.join(WEIGHT_FILES)}, "
                         f"THUDM/ImageReward's file)")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch as st
            sd = st.load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or code-carrying file is one clear line
        raise MergeError(f"could not read {path.name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or "blip.visual_encoder.cls_token" not in sd or "mlp.layers.0.weight" not in sd:
        raise MergeError(f"{path.name} is not an ImageReward state dict (no blip.visual_encoder / mlp keys)")
    return sd


def _tokenizer(folder: Path):
    from transformers import BertTokenizer
    vocab = next((p for p in (folder / "vocab.txt", folder / "tokenizer" / "vocab.txt") if p.is_file()), None)
    if vocab is None:                        # a local Hugging Face cache of bert-base-uncased, if any
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache("bert-base-uncased", "vocab.txt")
        vocab = Path(cached) if isinstance(cached, str) else None
    if vocab is None:
        raise MergeError(f"no BERT vocabulary for ImageReward: put bert-base-uncased's vocab.txt in {folder}")
    try:
        tok = BertTokenizer(str(vocab), do_lower_case=True)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MergeError(f"could not read the BERT vocabulary {vocab}: {e}") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})                      # as BLIP's init_tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward:
    """The ImageReward scorer: ``model(images, prompts)`` → one reward per (image, prompt) pair."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise MergeError(f"ImageReward folder not found: {folder}")
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in _state_dict(folder).items()}
        med = dict(MED_DEFAULTS)
        if (folder / "med_config.json").is_file():
            try:
                med.update(json.loads((folder / "med_config.json").read_text()))
            except ValueError as e:
                raise MergeError(f"med_config.json in {folder} is not JSON: {e}") from None
        try:
            self._build(sd, med)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise MergeError(f"the ImageReward weights in {folder} do not fit its config: "
                             f"{str(e).splitlines()[0][:200]}") from None
        self.tokenizer = _tokenizer(folder)
        if len(self.tokenizer) > self.text.config.vocab_size:
            raise MergeError(f"the vocabulary in {folder} has {len(self.tokenizer)} tokens; the model knows "
                             f"{self.text.config.vocab_size} (use bert-base-uncased's vocab.txt)")

    def _build(self, sd: dict, med: dict) -> None:
        from transformers import BlipTextConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel
        pre = "blip.visual_encoder."
        vis = {vision_key(k[len(pre):]): v for k, v in sd.items() if k.startswith(pre)}
        vcfg = vision_config({k: tuple(v.shape) for k, v in vis.items()})
        width = vcfg.hidden_size
        tcfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                              encoder_hidden_size=width, intermediate_size=med["intermediate_size"],
                              num_hidden_layers=med["num_hidden_layers"],
                              num_attention_heads=med["num_attention_heads"],
                              max_position_embeddings=med["max_position_embeddings"],
                              layer_norm_eps=med["layer_norm_eps"], hidden_act=med["hidden_act"],
                              pad_token_id=med["pad_token_id"], bos_token_id=None, eos_token_id=None,
                              sep_token_id=None, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
        # built on the meta device and given uninitialised storage: the weights come from the file
        # (a random init of ViT-L + BERT would take seconds)
        self.vision = empty_module(lambda: BlipVisionModel(vcfg), "cpu", torch.float32)
        self.text = empty_module(lambda: BlipTextModel(tcfg, add_pooling_layer=False), "cpu", torch.float32)
        pre = "blip.text_encoder."
        text = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre) and not k.endswith("position_ids")}
        head = torch.nn.Sequential(*(torch.nn.Linear(*sd[f"mlp.layers.{i}.weight"].shape[::-1]) for i in _HEAD))
        self.vision.load_state_dict(vis, strict=True)
        self.text.load_state_dict(text, strict=True)
        head.load_state_dict({f"{j}.{p}": sd[f"mlp.layers.{i}.{p}"] for j, i in enumerate(_HEAD)
                              for p in ("weight", "bias")})
        self.head = head.eval()

    def to(self, device):
        for m in (self.vision, self.text, self.head):
            m.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        dev = self.head[0].weight.device
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt").to(dev)
        emb = self.vision(pixel_values=preprocess(images).to(dev)).last_hidden_state
        out = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=emb,
                        encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long, device=dev),
                        return_dict=True)
        return ((self.head(out.last_hidden_state[:, 0, :].float()) - MEAN) / STD).squeeze(-1).cpu()
