"""Image generation on the resident pipeline: A1111-style weighted prompts, samplers, seeds,
clip skip, VAE choice, PNG info."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..errors import MergeError, MergeStopped
from .prompt import (BREAK, check_variants, choose_variants, enumerate_variants, parse_attention,
                     parse_prompt_options)

HIRES_UPSCALERS = ("Latent", "Lanczos")
SAMPLERS = {
    # A1111 name: (diffusers scheduler class, config overrides)
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
}


@dataclass
class GenParams:
    prompt: str = ""
    negative: str = ""
    steps: int = 20
    cfg: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_count: int = 1
    batch_size: int = 1
    clip_skip: int = 1
    sampler: str = "Euler a"
    hires_scale: float = 1.0          # A1111 hires fix: 1 = off, else the second pass' size factor
    hires_upscaler: str = "Latent"    # "Latent" (latents resized) or "Lanczos" (decoded image resized)
    hires_steps: int = 0              # 0 = as many as the first pass
    denoise: float = 0.7              # A1111 "Denoising strength": hires second pass and img2img

    @property
    def hires(self) -> bool:
        return self.hires_scale != 1.0

    def hires_size(self) -> tuple[int, int]:
        """The second pass' (width, height), multiples of 8 as A1111 rounds them."""
        return (int(self.width * self.hires_scale) // 8 * 8, int(self.height * self.hires_scale) // 8 * 8)

    def with_prompt_options(self) -> "GenParams":
        """Apply sd-scripts options written in the prompt line (``--n --w --h --d --l --s``)."""
        o = parse_prompt_options(self.prompt)
        p = replace(self, prompt=o.prompt)
        for name, value in (("negative", o.negative), ("width", o.width), ("height", o.height),
                            ("seed", o.seed), ("cfg", o.cfg), ("steps", o.steps), ("sampler", o.sampler)):
            if value is not None:
                setattr(p, name, value)
        return p

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise MergeError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        for name, lo, hi in (("steps", 1, 500), ("batch_count", 1, 1000), ("batch_size", 1, 64),
                             ("clip_skip", 1, 12), ("width", 64, 4096), ("height", 64, 4096)):
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise MergeError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
        if self.width % 8 or self.height % 8:
            raise MergeError(f"width and height must be multiples of 8, got {self.width}x{self.height}")
        check_variants(self.prompt)
        if self.hires_upscaler not in HIRES_UPSCALERS:
            raise MergeError(f"hires upscaler must be one of {', '.join(HIRES_UPSCALERS)}, got {self.hires_upscaler!r}")
        if not isinstance(self.hires_scale, (int, float)) or not 1 <= self.hires_scale <= 4:
            raise MergeError(f"hires upscale must be a number from 1 (off) to 4, got {self.hires_scale!r}")
        if self.hires and max(self.hires_size()) > 4096:
            raise MergeError(f"hires fix would make {self.hires_size()[0]}x{self.hires_size()[1]}: at most 4096 per side")
        if not isinstance(self.hires_steps, int) or not 0 <= self.hires_steps <= 500:
            raise MergeError(f"hires steps must be a whole number from 0 (same as steps) to 500, got {self.hires_steps!r}")
        if not isinstance(self.denoise, (int, float)) or not 0 <= self.denoise <= 1:
            raise MergeError(f"denoising strength must be from 0 to 1, got {self.denoise!r}")
        last = MAX_SEED - self.batch_count * self.batch_size + 1
        if not isinstance(self.seed, int) or not (self.seed == -1 or 0 <= self.seed <= last):
            raise MergeError(f"seed must be -1 (random) or a whole number from 0 to {last}, got {self.seed!r}")
        if not isinstance(self.cfg, (int, float)) or not 0 <= self.cfg <= 100:
            raise MergeError(f"CFG scale must be a number from 0 to 100, got {self.cfg!r}")


MAX_SEED = 2**63 - 1     # torch generators take 64-bit seeds; image i of a run uses seed + i


@dataclass
class GenImage:
    image: object          # PIL.Image
    seed: int
    infotext: str
    info_args: tuple = ()  # infotext()'s arguments, to write it again with a merge ID added

    def infotext_with_id(self, merge_id: int | None) -> str:
        """The infotext as an in-process generation after merge ``merge_id`` writes it (the
        merge ID first among the extra fields): for images rendered by a worker that does not
        write the history."""
        if merge_id is None or not self.info_args:
            return self.infotext
        shown, seed, label, model_hash, extra, img2img = self.info_args
        return infotext(shown, seed, label, model_hash, {"Merge ID": merge_id, **(extra or {})}, img2img)


@dataclass
class GenResult:
    images: list[GenImage] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- prompt encoding
def _weighted_tokens(tokenizer, text: str) -> list[list[tuple[int, float]]]:
    """Tokens with weights, split into chunks of at most 75 (BREAK forces a new chunk)."""
    chunks: list[list[tuple[int, float]]] = [[]]
    for frag, w in parse_attention(text):
        if frag == BREAK and w == -1.0:
            chunks.append([])
            continue
        for tid in tokenizer(frag, add_special_tokens=False, truncation=False).input_ids:
            if len(chunks[-1]) == 75:
                chunks.append([])
            chunks[-1].append((tid, w))
    return chunks


def _encode_chunk(encoders, tokenizers, chunk, arch: str, clip_skip: int, device):
    feats, pooled = [], None
    for enc, tok in zip(encoders, tokenizers):
        ids = [tok.bos_token_id] + [t for t, _ in chunk] + [tok.eos_token_id]
        ids += [tok.pad_token_id] * (77 - len(ids))
        weights = torch.tensor([1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk)), device=device)
        out = enc(torch.tensor([ids], device=device), output_hidden_states=True)
        if arch == "sdxl":
            z = out.hidden_states[-(clip_skip + 1)]
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        elif clip_skip > 1:
            tm = enc.text_model if hasattr(enc, "text_model") else enc
            z = tm.final_layer_norm(out.hidden_states[-clip_skip])
        else:
            z = out.last_hidden_state
        mean = z.float().mean()
        z = z * weights.to(z.dtype)[None, :, None]
        z = z * (mean / z.float().mean()).to(z.dtype)   # A1111: keep the mean after emphasis
        feats.append(z)
    return torch.cat(feats, dim=-1), pooled


@torch.no_grad()
def encode_prompt(pipe, arch: str, text: str, clip_skip: int, n_chunks: int = 0):
    """(embeddings [1, 77·k, dim], pooled or None, k) with A1111 emphasis and 75-token chunks."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    chunks = _weighted_tokens(tokenizers[0], text)
    chunks += [[] for _ in range(n_chunks - len(chunks))]
    device = pipe.text_encoder.device
    embs, pooled = [], None
    for i, chunk in enumerate(chunks):
        z, p = _encode_chunk(encoders, tokenizers, chunk, arch, clip_skip, device)
        embs.append(z)
        if i == 0:
            pooled = p
    return torch.cat(embs, dim=1), pooled, len(chunks)


def scheduler_for(pipe, sampler: str):
    import diffusers
    cls_name, overrides = SAMPLERS[sampler]
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


# ----------------------------------------------------------------------------- generation
def infotext(p: GenParams, seed: int, model: str, model_hash: str, extra: dict | None = None,
             img2img: bool = False) -> str:
    """A1111 ``parameters`` text, which A1111's PNG Info tab (and :func:`pnginfo.settings_from_png`)
    reads back. Hires fix and img2img add A1111's ``Denoising strength`` / ``Hires ...`` fields."""
    lines = [p.prompt]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    fields = {"Steps": p.steps, "Sampler": p.sampler, "CFG scale": p.cfg, "Seed": seed,
              "Size": f"{p.width}x{p.height}", "Model hash": model_hash, "Model": model}
    if p.clip_skip > 1:
        fields["Clip skip"] = p.clip_skip
    if img2img or p.hires:
        fields["Denoising strength"] = f"{p.denoise:g}"
    if p.hires and not img2img:
        fields.update({"Hires upscale": f"{p.hires_scale:g}", "Hires steps": p.hires_steps or None,
                       "Hires upscaler": p.hires_upscaler})
    fields.update(extra or {})
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v not in (None, "")))
    return "\n".join(lines)


def _img2img(pipe):
    """An img2img pipeline on the same modules (no weights copied or cast, tested; made per
    call, so it always uses the pipeline's current VAE and weights). diffusers' and transformers'
    notes while assembling it (dtype casts it does not do, torchvision-less image processors)
    are silenced."""
    import diffusers
    import transformers
    from diffusers import AutoPipelineForImage2Image
    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    try:
        i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
    i2i.set_progress_bar_config(disable=True)
    return i2i


@contextmanager
def _vae_kept_as_is(vae, on_cpu: bool):
    """SDXL's img2img casts the VAE to fp32 for encoding when ``force_upcast`` is set, and leaves
    it there: on the CPU, which computes in fp32 anyway (held fp16 weights are upcast layer by
    layer), that only doubles the VAE's memory for good. There it is switched off for the call."""
    if not (on_cpu and vae.config.get("force_upcast")):
        yield
        return
    vae.register_to_config(force_upcast=False)
    try:
        yield
    finally:
        vae.register_to_config(force_upcast=True)


def upscale_latents(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A1111's "Latent" hires upscaler: bilinear resize of the latents to the second pass' size."""
    return torch.nn.functional.interpolate(latents, size=(height // 8, width // 8), mode="bilinear",
                                           align_corners=False)


def generate(rp, params: GenParams, *, model_label: str = "", model_hash: str = "",
             extra_info: dict | None = None, progress=None, should_stop=None, init_image=None) -> GenResult:
    """Generate ``batch_count × batch_size`` images; image i of the run uses seed + i (A1111).

    ``init_image`` (a PIL image) makes it img2img: the image is resized to width × height and
    noised by ``denoise``. Otherwise, with ``hires_scale`` > 1, A1111's hires fix: the first pass
    at width × height, then its latents ("Latent") or its decoded image ("Lanczos") are resized
    and a second img2img pass with ``denoise`` and ``hires_steps`` refines them."""
    p = params.with_prompt_options()
    p.check()
    for what, steps in (("img2img", p.steps if init_image is not None else None),
                        ("the hires pass", (p.hires_steps or p.steps) if p.hires and init_image is None else None)):
        if steps is not None and int(steps * p.denoise) < 1:      # diffusers runs int(steps × strength) steps
            raise MergeError(f"{what} would run no step: {steps} steps × denoising strength {p.denoise:g} < 1; "
                             f"raise the steps or the denoising strength")
    if rp.spec is not None and rp.spec.arch == "flux":
        return generate_flux(rp, p, model_label=model_label, model_hash=model_hash, extra_info=extra_info,
                             progress=progress, should_stop=should_stop, init_image=init_image)
    t0 = time.perf_counter()
    with rp.lock:
        rp.check_ready()
        pipe, arch = rp.pipe, rp.spec.arch
        seed = p.seed if p.seed != -1 else random.randrange(2**32)
        encoded: dict[str, tuple] = {}

        def encode(text: str) -> tuple:
            if text not in encoded:
                pos, pooled, n = encode_prompt(pipe, arch, text, p.clip_skip)
                neg, npooled, m = encode_prompt(pipe, arch, p.negative, p.clip_skip, n)
                if m > n:
                    pos, pooled, _ = encode_prompt(pipe, arch, text, p.clip_skip, m)
                encoded[text] = (pos, pooled, neg, npooled)
            return encoded[text]
        # {e$$...} variants: one run per combination, each with the same seeds (comparable);
        # random {a|b} variants: chosen per batch from its first seed (reproducible)
        templates = enumerate_variants(p.prompt)
        second = init_image is not None or p.hires
        i2i = _img2img(pipe) if second else None
        for pl in (pipe, i2i):
            if pl is not None:
                pl.scheduler = scheduler_for(pipe, p.sampler)
        steps2 = int((p.hires_steps or p.steps) * p.denoise) if p.hires and init_image is None else 0
        per_batch = (int(p.steps * p.denoise) if init_image is not None else p.steps) + steps2
        total, done = len(templates) * p.batch_count * per_batch, [0]
        result = GenResult()
        for template, batch in ((t, b) for t in templates for b in range(p.batch_count)):
            if should_stop is not None and should_stop():
                raise MergeStopped("generation stopped by user")
            seeds = [seed + batch * p.batch_size + i for i in range(p.batch_size)]
            text = choose_variants(template, seeds[0])
            pos, pooled, neg, npooled = encode(text)
            common = dict(prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=p.cfg,
                          num_images_per_prompt=p.batch_size)
            if arch == "sdxl":
                common.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)

            def on_step(_pipe, step, _t, cb_kwargs):
                done[0] += 1
                if progress:
                    progress(min(done[0], total), total, "generating")
                if should_stop is not None and should_stop():
                    _pipe._interrupt = True
                return cb_kwargs

            def run(pl, **kw):
                gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                with _vae_kept_as_is(pipe.vae, pipe.device.type == "cpu"):
                    out = pl(**common, **kw, generator=gens, callback_on_step_end=on_step).images
                if getattr(pl, "_interrupt", False):
                    pl._interrupt = False
                    raise MergeStopped("generation stopped by user")
                return out
            if init_image is not None:
                from PIL import Image
                start = init_image.convert("RGB").resize((p.width, p.height), Image.LANCZOS)
                images = run(i2i, image=start, strength=p.denoise, num_inference_steps=p.steps)
            elif p.hires:
                w2, h2 = p.hires_size()
                latent = p.hires_upscaler == "Latent"
                first = run(pipe, num_inference_steps=p.steps, width=p.width, height=p.height,
                            output_type="latent" if latent else "pil")
                if latent:
                    start = upscale_latents(first, w2, h2)
                else:
                    from PIL import Image
                    start = [im.resize((w2, h2), Image.LANCZOS) for im in first]
                images = run(i2i, image=start, strength=p.denoise, num_inference_steps=p.hires_steps or p.steps)
            else:
                images = run(pipe, num_inference_steps=p.steps, width=p.width, height=p.height)
            shown = replace(p, prompt=text)          # PNG info gets the text actually used
            for img, s in zip(images, seeds):
                args = (shown, s, model_label, model_hash, dict(extra_info or {}), init_image is not None)
                result.images.append(GenImage(img, s, infotext(*args), args))
        result.seconds = time.perf_counter() - t0
        return result


FLUX_SAMPLER = "Euler (flow matching)"


def generate_flux(rp, p: GenParams, *, model_label: str = "", model_hash: str = "", extra_info: dict | None = None,
                  progress=None, should_stop=None, init_image=None) -> GenResult:
    """Flux.1 (diffusers ``FluxPipeline``): the flow-matching Euler sampler and Flux-dev's distilled
    guidance (``cfg``; no negative prompt). Image i of a run uses seed + i, as A1111 (Forge writes
    the guidance as "Distilled CFG Scale", and so does the PNG info here)."""
    if init_image is not None or p.hires:
        raise MergeError("img2img and hires fix are not available for Flux yet")
    if p.negative:
        raise MergeError("Flux-dev has no negative prompt (its guidance is distilled): clear the negative prompt")
    t0 = time.perf_counter()
    with rp.lock:
        rp.check_ready()
        pipe = rp.pipe
        seed = p.seed if p.seed != -1 else random.randrange(2**32)
        total, done = p.batch_count * p.steps, [0]
        result = GenResult()
        shown = replace(p, sampler=FLUX_SAMPLER, cfg=1.0)
        extra = {"Distilled CFG Scale": f"{p.cfg:g}", **(extra_info or {})}
        max_len = min(512, getattr(pipe.tokenizer_2, "model_max_length", 512) or 512)
        for batch in range(p.batch_count):
            if should_stop is not None and should_stop():
                raise MergeStopped("generation stopped by user")
            seeds = [seed + batch * p.batch_size + i for i in range(p.batch_size)]
            gens = [torch.Generator(device=rp.device).manual_seed(s) for s in seeds]

            def on_step(_pipe, step, _t, cb_kwargs):
                done[0] += 1
                if progress:
                    progress(done[0], total, "generating")
                if should_stop is not None and should_stop():
                    _pipe._interrupt = True
                return cb_kwargs
            images = pipe(prompt=[p.prompt] * p.batch_size, height=p.height, width=p.width,
                          num_inference_steps=p.steps, guidance_scale=p.cfg, generator=gens,
                          max_sequence_length=max_len, callback_on_step_end=on_step).images
            if getattr(pipe, "_interrupt", False):
                pipe._interrupt = False
                raise MergeStopped("generation stopped by user")
            for img, s in zip(images, seeds):
                args = (shown, s, model_label, model_hash, dict(extra), False)
                result.images.append(GenImage(img, s, infotext(*args), args))
        result.seconds = time.perf_counter() - t0
        return result
