"""Image generation on the resident pipeline: A1111-style weighted prompts, samplers, seeds,
clip skip, VAE choice, PNG info."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

import torch

from .errors import MergeError, MergeStopped
from .prompt import BREAK, parse_attention, parse_prompt_options

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
def infotext(p: GenParams, seed: int, model: str, model_hash: str, extra: dict | None = None) -> str:
    """A1111 ``parameters`` text, which A1111's PNG Info tab reads back."""
    lines = [p.prompt]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    fields = {"Steps": p.steps, "Sampler": p.sampler, "CFG scale": p.cfg, "Seed": seed,
              "Size": f"{p.width}x{p.height}", "Model hash": model_hash, "Model": model}
    if p.clip_skip > 1:
        fields["Clip skip"] = p.clip_skip
    fields.update(extra or {})
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v not in (None, "")))
    return "\n".join(lines)


def generate(rp, params: GenParams, *, model_label: str = "", model_hash: str = "",
             extra_info: dict | None = None, progress=None, should_stop=None) -> GenResult:
    """Generate ``batch_count × batch_size`` images; image i of the run uses seed + i (A1111)."""
    p = params.with_prompt_options()
    p.check()
    t0 = time.perf_counter()
    with rp.lock:
        rp.check_ready()
        pipe, arch = rp.pipe, rp.spec.arch
        seed = p.seed if p.seed != -1 else random.randrange(2**32)
        pos, pooled, n = encode_prompt(pipe, arch, p.prompt, p.clip_skip)
        neg, npooled, m = encode_prompt(pipe, arch, p.negative, p.clip_skip, n)
        if m > n:
            pos, pooled, _ = encode_prompt(pipe, arch, p.prompt, p.clip_skip, m)
        pipe.scheduler = scheduler_for(pipe, p.sampler)
        result = GenResult()
        total = p.batch_count * p.steps
        for batch in range(p.batch_count):
            if should_stop is not None and should_stop():
                raise MergeStopped("generation stopped by user")
            seeds = [seed + batch * p.batch_size + i for i in range(p.batch_size)]
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            kw = dict(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=p.steps,
                      guidance_scale=p.cfg, width=p.width, height=p.height, generator=gens,
                      num_images_per_prompt=p.batch_size)
            if arch == "sdxl":
                kw.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)

            def on_step(_pipe, step, _t, cb_kwargs, batch=batch):
                if progress:
                    progress(batch * p.steps + step + 1, total, "generating")
                if should_stop is not None and should_stop():
                    _pipe._interrupt = True
                return cb_kwargs
            images = pipe(**kw, callback_on_step_end=on_step).images
            if getattr(pipe, "_interrupt", False):
                pipe._interrupt = False
                raise MergeStopped("generation stopped by user")
            for img, s in zip(images, seeds):
                result.images.append(GenImage(img, s, infotext(p, s, model_label, model_hash, extra_info)))
        result.seconds = time.perf_counter() - t0
        return result
