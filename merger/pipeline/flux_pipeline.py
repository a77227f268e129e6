"""The resident Flux.1 pipeline: diffusers' ``FluxPipeline`` built offline from configs made here
(the transformer, the 16-channel VAE, CLIP-L and the T5 encoder, from ``archs.json``'s
hyper-parameters; no weights), its CLIP tokenizer from the vocabulary this app carries, and its T5
tokenizer from a folder the user names (``--t5-tokenizer``: e.g. the ``tokenizer_2`` folder of a
diffusers FLUX.1 download). Weights are swapped in by :class:`~merger.pipeline.resident.ResidentPipeline`
through :mod:`.flux_keymap`; the sampler is diffusers' flow-matching Euler, the guidance is Flux-dev's
distilled guidance (``cfg`` in the generation panel)."""
from __future__ import annotations

from pathlib import Path

from ..errors import MergeError
from .pipeline_config import clip_tokenizer, config_folder, text_config, vae_config


def transformer_config(t: dict) -> dict:
    hd = t["hidden"] // t["heads"]
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": t["in_channels"],
            "num_layers": t["depth"], "num_single_layers": t["depth_single"], "attention_head_dim": hd,
            "num_attention_heads": t["heads"], "joint_attention_dim": t["context_in_dim"],
            "pooled_projection_dim": t["vec_in_dim"], "guidance_embeds": bool(t.get("guidance_embed", True)),
            "axes_dims_rope": list(t["axes_dim"])}


def t5_config(t: dict) -> dict:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": t["d_model"], "d_ff": t["d_ff"],
            "d_kv": t["d_kv"], "num_layers": t["layers"], "num_heads": t["heads"], "vocab_size": t["vocab"],
            "relative_attention_num_buckets": t["buckets"], "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False,
            "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}


def scheduler_config() -> dict:
    """Flux-dev's FlowMatchEulerDiscreteScheduler (resolution-dependent shift)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096}


def flux_vae_config(p: dict) -> dict:
    cfg = vae_config(p)
    v = p["vae"]
    cfg.update({"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": v["shift_factor"]})
    return cfg


def flux_folder(params: dict, root: Path | None = None) -> Path:
    """Configs and the CLIP tokenizer of a Flux pipeline (no weights), cached by content."""
    files = {"transformer/config.json": transformer_config(params["transformer"]),
             "vae/config.json": flux_vae_config(params),
             "text_encoder/config.json": text_config(params["text"], False),
             "text_encoder_2/config.json": t5_config(params["t5"]),
             "scheduler/scheduler_config.json": scheduler_config()}
    return config_folder("flux", files, {"tokenizer": params["text"]["pad"]}, root)


def t5_tokenizer(folder: str | Path | None):
    """The T5 tokenizer from the user's folder (``tokenizer.json`` or ``spiece.model``); never downloaded."""
    from transformers import T5TokenizerFast
    if not folder:
        raise MergeError("generating with Flux needs the T5 tokenizer, which this app cannot ship: start it with "
                         "--t5-tokenizer DIR (the tokenizer_2 folder of a diffusers FLUX.1 download, or ComfyUI's "
                         "comfy/text_encoders/t5_tokenizer)")
    path = Path(folder)
    if not (path / "tokenizer.json").is_file() and not (path / "spiece.model").is_file():
        raise MergeError(f"--t5-tokenizer {path}: no tokenizer.json or spiece.model there")
    try:
        return T5TokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - one line
        raise MergeError(f"--t5-tokenizer {path}: cannot be read ({str(e).splitlines()[0][:150]})") from None


def build_flux(params: dict, device: str, dtype, tokenizer_dir, empty_module):
    """A FluxPipeline with empty (uninitialised) modules, ready for a swap."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    tok2 = t5_tokenizer(tokenizer_dir)
    folder = flux_folder(params)
    parts = {
        "transformer": empty_module(lambda: FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(folder / "transformer")), device, dtype),
        "vae": empty_module(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                            device, dtype),
        "text_encoder": empty_module(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                                     device, dtype),
        "text_encoder_2": empty_module(lambda: T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2")),
                                       device, dtype),
        "tokenizer": clip_tokenizer(folder / "tokenizer"),
        "tokenizer_2": tok2,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(
            FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler")),
    }
    return FluxPipeline(**parts), folder
