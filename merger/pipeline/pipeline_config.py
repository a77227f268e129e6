"""Diffusers pipeline folders (configs + CLIP tokenizers) made offline from ``archs.json``.

The configs are derived from the same architecture data as the LDM key layouts, so real and
tiny models get matching pipelines; the tokenizer files are built from the CLIP BPE vocabulary
carried in ``merger/data`` (no hub, no open_clip install).
"""
from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from ..files.paths import data_dir

VOCAB_GZ = Path(__file__).resolve().parents[1] / "data" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48894  # lines 2 .. 48,895 of the vocabulary file


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP), in vocabulary
    order: the printable bytes first (as themselves), then the others mapped to 256, 257, ..."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the original CLIP tokenizer: 49,408 entries."""
    lines = gzip.open(VOCAB_GZ, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:1 + N_MERGES]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def _vocab_files() -> tuple[str, str]:
    """The texts of ``vocab.json`` and ``merges.txt``, the same in every CLIP tokenizer folder."""
    vocab, merges = clip_vocab()
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def write_tokenizer(folder: Path, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_files()
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))


_tokenizers: dict = {}


def clip_tokenizer(folder: Path):
    """The CLIP tokenizer in ``folder`` (written by :func:`write_tokenizer`): loaded once per pad
    token in this process (every such folder holds the same vocabulary, the pad token aside) and
    shared by the pipelines built here, which only read it. A load took 0.1 s per pipeline."""
    from transformers import CLIPTokenizer
    pad = json.loads((folder / "special_tokens_map.json").read_text())["pad_token"]
    if pad not in _tokenizers:
        _tokenizers[pad] = CLIPTokenizer.from_pretrained(folder)
    return _tokenizers[pad]


def unet_config(p: dict) -> dict:
    u, size = p["unet"], p["image_size"]
    C, mult, depth = u["model_channels"], u["channel_mult"], u["transformer_depth"]
    heads = u.get("heads") or [C * m // u["head_channels"] for m in mult]
    cfg = {
        "_class_name": "UNet2DConditionModel", "sample_size": size // 8,
        "in_channels": u["in_channels"], "out_channels": u["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [C * m for m in mult], "layers_per_block": u["num_res_blocks"],
        "cross_attention_dim": u["context_dim"], "attention_head_dim": heads,
        "use_linear_projection": u["linear_proj"], "norm_num_groups": min(32, C),
        "transformer_layers_per_block": [max(d, 1) for d in depth[:-1]] + [u["mid_depth"]],
    }
    if u.get("adm_in_channels"):
        cfg.update({"addition_embed_type": "text_time",
                    "addition_time_embed_dim": u["addition_time_embed_dim"],
                    "projection_class_embeddings_input_dim": u["adm_in_channels"]})
    return cfg


def vae_config(p: dict) -> dict:
    v = p["vae"]
    n = len(v["ch_mult"])
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [v["ch"] * m for m in v["ch_mult"]], "layers_per_block": v["num_res_blocks"],
            "latent_channels": v["z_channels"], "norm_num_groups": min(32, v["ch"]),
            "sample_size": p["image_size"], "scaling_factor": v["scaling_factor"]}


def text_config(t: dict, with_projection: bool) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "hidden_size": t["width"], "intermediate_size": 4 * t["width"],
            "num_hidden_layers": t["pipeline_layers"], "num_attention_heads": t["heads"],
            "hidden_act": t["act"], "projection_dim": t["projection_dim"], "vocab_size": t["vocab"],
            "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 1}


def scheduler_config(prediction_type: str) -> dict:
    return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": prediction_type,
            "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
            "use_karras_sigmas": False}


def model_index(arch: str) -> dict:
    idx = {"_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    if arch == "sdxl":
        idx.update({"_class_name": "StableDiffusionXLPipeline",
                    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                    "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
    else:
        idx.update({"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
                    "feature_extractor": [None, None], "requires_safety_checker": False})
    return idx


def pipeline_folder(arch: str, params: dict, prediction_type: str = "epsilon",
                    root: Path | None = None) -> Path:
    """A diffusers pipeline folder (no weights) for ``arch`` with ``params``; cached by content."""
    files = {"model_index.json": model_index(arch), "unet/config.json": unet_config(params),
             "vae/config.json": vae_config(params),
             "text_encoder/config.json": text_config(params["text"], False),
             "scheduler/scheduler_config.json": scheduler_config(prediction_type)}
    tokenizers = {"tokenizer": params["text"]["pad"]}
    if arch == "sdxl":
        files["text_encoder_2/config.json"] = text_config(params["text2"], True)
        tokenizers["tokenizer_2"] = params["text2"]["pad"]
    return config_folder(f"{arch}-{prediction_type}", files, tokenizers, root)


def config_folder(tag: str, files: dict, tokenizers: dict[str, str], root: Path | None = None) -> Path:
    """``files`` (path -> config dict) and CLIP tokenizers (subfolder -> pad token) written once into
    a folder named by ``tag`` and the configs' hash; the first file marks a complete folder."""
    blob = json.dumps(files, sort_keys=True).encode()
    folder = (root or data_dir() / "pipelines") / f"{tag}-{hashlib.sha1(blob).hexdigest()[:10]}"
    if (folder / next(iter(files))).exists():
        return folder
    for name, cfg in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=1))
    for sub, pad in tokenizers.items():
        write_tokenizer(folder / sub, pad)
    return folder
