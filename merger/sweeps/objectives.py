"""What a search maximises, from a trial's images (every prompt × seed of the search).

* :class:`LooksLike`: closeness to reference images — CLIP image embeddings when a CLIP model is
  given, else a multi-scale pixel distance (no model files needed).
* :class:`Scorer`: CLIP score against the prompt, the LAION aesthetic predictor (CLIP ViT-L/14
  image embedding → its MLP head) and/or ImageReward (:mod:`.imagereward`), from local files only.
* "Your eye" needs no objective here: :mod:`.search` asks the user to pick (preferences).

Models are loaded from the folders the user names (``local_files_only``): nothing is ever
downloaded, and a missing file is a clear error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MergeError

SCALES = (64, 32, 16)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pixels(image, size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255


def pixel_distance(a, b) -> float:
    """Mean absolute RGB difference of two images averaged over 64, 32 and 16 px versions (0 =
    identical, 1 = opposite): coarse scales see composition and colour, the finest some detail."""
    return float(np.mean([np.abs(_pixels(a, s) - _pixels(b, s)).mean() for s in SCALES]))


class Clip:
    """A CLIP model (transformers layout: ``config.json`` + weights, tokenizer files) from a
    local folder, e.g. a copy of openai/clip-vit-large-patch14. Images are preprocessed here as
    CLIP's own processor does (bicubic resize of the short side, centre crop, CLIP mean/std)."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPTokenizer
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise MergeError(f"no CLIP model in {folder} (expected config.json and weights of a transformers "
                             f"CLIPModel, e.g. a local copy of openai/clip-vit-large-patch14)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise MergeError(f"could not load the CLIP model in {folder}: {str(e).splitlines()[0]}") from None
        self.size = self.model.config.vision_config.image_size

    def to(self, device) -> "Clip":
        self.model.to(device)
        return self

    def _tensor(self, images) -> torch.Tensor:
        from PIL import Image
        out = []
        for im in images:
            im = im.convert("RGB")
            w, h = im.size
            s = self.size / min(w, h)
            im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.Resampling.BICUBIC)
            left, top = (im.width - self.size) // 2, (im.height - self.size) // 2
            a = np.asarray(im.crop((left, top, left + self.size, top + self.size)), dtype=np.float32) / 255
            out.append((a - CLIP_MEAN) / CLIP_STD)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        e = self.model.get_image_features(pixel_values=self._tensor(images).to(self.model.device))
        e = getattr(e, "pooler_output", e).float().cpu()
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        e = self.model.get_text_features(**tok)
        e = getattr(e, "pooler_output", e).float().cpu()
        return e / e.norm(dim=-1, keepdim=True)


def aesthetic_head(path: str | Path, dim: int) -> torch.nn.Module:
    """The LAION improved aesthetic predictor's MLP (``sac+logos+ava1-l14-linearMSE.pth``:
    dim→1024→128→64→16→1 with dropouts) over L2-normalised CLIP image embeddings."""
    from torch import nn
    path = Path(path)
    if not path.is_file():
        raise MergeError(f"aesthetic head not found: {path} (the LAION predictor's .pth or .safetensors file)")
    head = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch as st
            sd = st.load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k.removeprefix("layers."): v for k, v in sd.items()}
        head.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001 - any malformed file is one clear line
        raise MergeError(f"{path.name} is not the LAION aesthetic head for {dim}-d CLIP embeddings "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return head.eval()


class LooksLike:
    """Similarity to reference images (higher is closer): mean cosine of CLIP image embeddings
    to the references' mean embedding, or 1 − the mean :func:`pixel_distance` to the reference
    at the same position (prompt × seed order) — or to every reference when counts differ."""

    name = "look like the references"

    def __init__(self, references: list, clip: Clip | None = None):
        if not references:
            raise MergeError("'look like this' needs at least one reference image")
        self.refs, self.clip = list(references), clip
        self.target = clip.image_embeds(self.refs).mean(0) if clip else None

    def to(self, device) -> "LooksLike":
        """Run the CLIP model on ``device`` (the workstation's); results stay on the CPU."""
        if self.clip is not None:
            self.clip.to(device)
        return self

    def __call__(self, images, prompts) -> float:
        if self.clip is not None:
            return float((self.clip.image_embeds(images) @ self.target).mean())
        if len(self.refs) == len(images):
            return 1 - float(np.mean([pixel_distance(a, b) for a, b in zip(images, self.refs)]))
        return 1 - float(np.mean([pixel_distance(a, b) for a in images for b in self.refs]))


class Scorer:
    """The sum of the parts given, averaged over the trial's images: ``clip_weight`` × CLIP score
    (cosine of image and prompt, A1111's *CLIP score* before its ×100), the aesthetic predictor's
    score (about 1–10) and the ImageReward reward (standardised: about −2…2)."""

    name = "scorer"

    def __init__(self, clip: Clip | None, head: torch.nn.Module | None = None, clip_weight: float = 10.0,
                 reward=None):
        if clip is None and reward is None:
            raise MergeError("the scorer objective needs a CLIP model folder (--clip-dir) for CLIP score and the "
                             "aesthetic predictor, or an ImageReward folder (--imagereward)")
        self.clip, self.head, self.clip_weight, self.reward = clip, head, clip_weight, reward

    def to(self, device) -> "Scorer":
        """Run CLIP and ImageReward on ``device`` (the workstation's); the small aesthetic head
        and the sums stay on the CPU."""
        for part in (self.clip, self.reward):
            if part is not None:
                part.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images, prompts) -> float:
        score = torch.zeros(len(images))
        if self.clip is not None:
            emb = self.clip.image_embeds(images)
            score += self.clip_weight * (emb * self.clip.text_embeds(list(prompts))).sum(-1)
            if self.head is not None:
                score += self.head(emb).squeeze(-1)
        if self.reward is not None:
            score += self.reward(images, prompts)
        return float(score.mean())


def make_objective(kind: str, *, references=(), clip_dir: str | None = None, aesthetic: str | None = None,
                   imagereward: str | None = None):
    """The objective of a search from its settings (``kind``: "like" or "scorer")."""
    clip = Clip(clip_dir) if clip_dir else None
    if kind == "like":
        return LooksLike(list(references), clip)
    if kind == "scorer":
        if clip is None and aesthetic:
            raise MergeError("the aesthetic predictor works on CLIP embeddings: give a CLIP model folder "
                             "(--clip-dir) too")
        head = aesthetic_head(aesthetic, clip.model.config.projection_dim) if aesthetic else None
        reward = None
        if imagereward:
            from .imagereward import ImageReward
            reward = ImageReward(imagereward)
        return Scorer(clip, head, reward=reward)
    raise MergeError(f"unknown objective {kind!r}")
