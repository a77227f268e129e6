"""Local diffusers config folder for the tiny SD1 layout (merger.ldm_layout.TINY), so diffusers'
own single-file loader can read our files offline."""
import json
from pathlib import Path


def tiny_sd1_config(folder: Path) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig
    folder.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).save_config(folder / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 16, 16, 16), layers_per_block=2, latent_channels=4,
                  norm_num_groups=8, sample_size=64).save_config(folder / "vae")
    CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=49408, max_position_embeddings=77).save_pretrained(folder / "text_encoder")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear").save_config(folder / "scheduler")
    tok = folder / "tokenizer"
    tok.mkdir(exist_ok=True)
    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}))
    return folder
