"""The app's state and actions (model folders, cache, resident pipeline, history, outputs).

The UI, the XYZ runner and tests call these methods; none of them does arithmetic itself.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .files.checkpoint_io import short_hash, short_hashes
from .arch import UNET
from .engine import plan_for, prepare
from .errors import MergeError
from .pipeline.generate import GenParams, GenResult, generate
from .files.model_cache import ModelCache
from .files.model_dirs import ModelDirs
from .files.warmup import Warmer
from .files.paths import data_dir
from .pipeline.resident import ResidentPipeline
from .pipeline.pnginfo import draw_merge_id, save_png
from .recipe import Recipe
from .files.saving import (SaveOptions, auto_filename, exists_error, model_label, recipe_metadata, save_merge,
                           save_tensors)


DEFAULT_MAX_CELLS = 500


@dataclass
class Timings:
    load: float = 0.0
    merge: float = 0.0
    generate: float = 0.0
    save: float = 0.0

    def line(self) -> str:
        parts = [f"{k} {v:.2f} s" for k, v in (("loading", self.load), ("merging+swapping", self.merge),
                                              ("generating", self.generate), ("saving", self.save)) if v]
        return ", ".join(parts)


@dataclass
class Outcome:
    message: str
    timings: Timings = field(default_factory=Timings)
    history_id: int | None = None
    result: GenResult | None = None
    path: Path | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Workstation:
    def __init__(self, dirs: ModelDirs, cache_bytes: int = 12 << 30, device: str | None = None,
                 dtype=None, outputs: Path | None = None, history=None, storage: str = "model",
                 max_cells: int = DEFAULT_MAX_CELLS):
        from mergehistory import MergeHistory
        self.dirs = dirs
        self.cache = ModelCache(cache_bytes)
        self.warmer = Warmer(self.cache, lambda name: self.dirs.resolve("ckpt", name))
        self.pipeline = ResidentPipeline(device, dtype, storage)
        self.history = history if history is not None else MergeHistory()   # an empty one is falsy
        self.outputs = Path(outputs) if outputs else data_dir() / "outputs"
        self.stop_event = threading.Event()
        self.history_id: int | None = None
        self._loras: dict = {}
        self.max_cells = max_cells                  # XYZ plots above this need confirming
        self.cell_seconds: float | None = None      # running average of a plot cell's time
        self.scorer_files: dict[str, str] = {}      # search scorer: "clip", "aesthetic", "imagereward" (launch flags)
        self.pool = None                            # Ray workers for plots and searches (sweeps.dispatch)

    # ------------------------------------------------------------------ LoRAs
    def load_lora_file(self, name: str):
        """A LoRA file by name (cached until the file changes)."""
        from lora_ops.formats import load_lora
        path = self.dirs.resolve("lora", name)
        stamp = (path.stat().st_size, path.stat().st_mtime_ns)
        hit = self._loras.get(path)
        if hit is None or hit[0] != stamp:
            hit = self._loras[path] = (stamp, load_lora(path))
        return hit[1]

    def lora_applier(self, text: str, shapes, arch: str):
        from lora_ops.merge_ckpt import LoraApplier, parse_specs
        specs = parse_specs(text, arch)
        return LoraApplier(shapes, [(self.load_lora_file(s.name), s) for s in specs], arch)

    # ------------------------------------------------------------------ helpers
    def stop(self) -> None:
        self.stop_event.set()

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def recipe(self, model_a: str, model_b: str = "", model_c: str = "", models=(), hashed: bool = True,
               **settings) -> Recipe:
        """A recipe naming models by file name with their short hashes (``models``: a method's
        M1…Mn, with ``model_a`` its base). ``hashed=False``: without the hashes (a file not
        hashed yet is read whole for its hash: the UI's warm-up does that in the background)."""
        if not model_a:
            raise MergeError("model A is not selected")
        paths = {s: self.dirs.resolve("ckpt", n) for s, n in (("a", model_a), ("b", model_b), ("c", model_c)) if n}
        hashes: dict = {}
        if hashed:                       # files new to the app hashed side by side, then cached
            paths.update({i: self.dirs.resolve("ckpt", n) for i, n in enumerate(models)})
            hashes = dict(zip(paths, short_hashes(paths.values())))
        return Recipe(model_a=model_a, model_b=model_b or "", model_c=model_c or "",
                      hash_a=hashes.get("a", ""), hash_b=hashes.get("b", ""), hash_c=hashes.get("c", ""),
                      models=list(models), model_hashes=[hashes[i] for i in range(len(models))] if hashed else [],
                      **settings)

    def warm(self, model_a: str, model_b: str = "", model_c: str = "", models=(), mode: str = "weight_sum",
             method: str = "") -> tuple[Path, ...]:
        """Start reading, in the background, the models a merge of these picks would read (by
        name, as :meth:`.Recipe.slots` lists them: A and B, C where the mode uses it; a method's
        base A and its models), so that the next merge finds them hashed, loaded and scanned
        (:mod:`.files.warmup`); the picks alone, while the other settings are incomplete.
        Returns those files."""
        picks = Recipe(model_a=model_a or "", model_b=model_b or "", model_c=model_c or "", models=list(models),
                       mode=mode, method=method or "")
        return self.warmer.request(name for _, name, _ in picks.slots())

    def warm_recipe(self, recipe: Recipe) -> tuple[Path, ...]:
        """:meth:`warm` for the models ``recipe`` reads (the Merge tab's complete settings, Load
        settings, a dropped PNG); for a method, also what its merge does not need α for (TIES:
        every key's thresholds, :func:`.engine.prepare`), so that Merge costs one pass."""
        return self.warmer.request((name for _, name, _ in recipe.slots()),
                                   then=(lambda stop: self._prepare(recipe, stop)) if recipe.method else None)

    def _prepare(self, recipe: Recipe, should_stop) -> None:
        recipe.check()
        models, _ = self._load(recipe)
        prepare(plan_for(recipe, models), should_stop, device=self.pipeline.device)

    def _load(self, recipe: Recipe):
        """(slot -> Checkpoint, slot -> path) of every model the recipe reads, refusing files
        whose hash differs from the one recorded."""
        slots = recipe.slots()
        paths = {s: self.dirs.resolve("ckpt", n) for s, n, _ in slots}
        for s, n, h in slots:
            if h and short_hash(paths[s]) != h:
                raise MergeError(f"{n} has changed since this merge was recorded "
                                 f"(hash {short_hash(paths[s])}, recorded {h})")
        pinned = tuple(paths.values())
        return {s: self.cache.get(p, pinned=pinned) for s, p in paths.items()}, paths

    # ------------------------------------------------------------------ actions
    def merge(self, recipe: Recipe, progress=None, source: str = "ui", interruptible: bool = True) -> Outcome:
        """Merge into the resident pipeline and record the merge in the history. Inside an XYZ
        plot (``interruptible=False``) Stop ends the plot after the cell instead."""
        if interruptible:
            self.stop_event.clear()
        self.warmer.hand_over()               # what a background warm-up prepared stays; it stops
        t = Timings()
        t0 = time.perf_counter()
        recipe.check()
        models, _ = self._load(recipe)
        t.load = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = plan_for(recipe, models)
        applier = self.lora_applier(recipe.loras, models["a"].tensors, plan.arch) if recipe.loras else None
        stats = self.pipeline.swap(plan, progress=progress, should_stop=self.should_stop if interruptible else None,
                                   label=model_label(recipe))
        if applier is not None:
            self.pipeline.add_deltas(applier)
        t.merge = time.perf_counter() - t0
        notes = list(plan.notes) + stats.notes
        self.history_id = self.record(recipe, notes, source=source, seconds=t.load + t.merge)
        head = f"merged #{self.history_id}" if self.history_id is not None else "merged"
        return Outcome("; ".join([f"{head}: {model_label(recipe)}"] + notes), t, self.history_id, notes=notes)

    def record(self, recipe: Recipe, notes: list[str], **row) -> int | None:
        """Append the history row of a merge that has happened. A failure to write it (full
        disk, read-only folder) must not undo the merge the user already sees: it is added to
        ``notes`` and the merge has no ID."""
        try:
            return self.history.append(recipe, notes=notes, **row)
        except (OSError, MergeError) as e:
            notes.append(f"warning: the history row could not be written ({getattr(e, 'strerror', None) or e})")
            return None

    def inex_keys(self, recipe: Recipe) -> tuple[list[str], list[str]]:
        """(keys merged, keys kept as model A's) under the recipe's include/exclude setting."""
        from .arch import detect_arch
        from .engine.ratios import inex_selection
        ck = self.cache.get(self.dirs.resolve("ckpt", recipe.model_a))
        return inex_selection(recipe, ck.tensors, detect_arch(ck.tensors, ck.name))

    def load_model(self, name: str) -> Outcome:
        """Show one checkpoint unmerged."""
        t0 = time.perf_counter()
        ck = self.cache.get(self.dirs.resolve("ckpt", name))
        self.pipeline.load_checkpoint(ck)
        self.history_id = None
        return Outcome(f"loaded {name}", Timings(load=time.perf_counter() - t0))

    def set_vae(self, name: str | None) -> None:
        from .files.saving import load_vae
        self.pipeline.use_vae(load_vae(self.dirs.resolve("vae", name)) if name else None, name or "")

    def generate(self, params: GenParams, progress=None, save: bool = True, interruptible: bool = True,
                 folder: Path | None = None, stem: str = "", loras: str = "", init_image=None,
                 id_to: tuple[str, ...] = ("PNG info",), mask=None, regional: list[str] | None = None) -> Outcome:
        """Generate with the resident pipeline. LoRAs given in ``loras`` ("name:weight[:blocks],
        ..." — the UI's five LoRA slots) or as ``<lora:name:weight>`` in the prompt are added to the
        weights for this generation only. ``init_image`` (PIL) makes it img2img. ``id_to`` is
        SuperMerger's "save merged model ID to": "PNG info" writes the merge ID into the PNG
        info, "image" draws it onto the picture. ``regional``: up to three LoRAs ("name:weight",
        "" for none) of slots 1-3, restricted by the R, G, B channels of the ``mask`` image to
        regions of the picture (Additional Networks; :mod:`.pipeline.regional`); without a mask
        they are added like the others."""
        if interruptible:
            self.stop_event.clear()
        rp = self.pipeline
        recipe = rp.recipe
        extra = {}
        merge_id = self.history_id if "PNG info" in id_to else None
        if merge_id is not None:
            extra["Merge ID"] = merge_id
        if rp.vae_name:
            extra["VAE"] = rp.vae_name
        label = model_label(recipe) if recipe else rp.label
        from .pipeline.prompt import extract_lora_tags
        prompt, tags = extract_lora_tags(params.prompt)
        lora_text = ", ".join([x.strip() for x in (loras or "").split(",") if x.strip()] + tags)
        regional = [s.strip() for s in (regional or [])][:3]
        if mask is None:   # no mask: slots 1-3 are ordinary LoRAs
            lora_text = ", ".join([s for s in regional if s] + ([lora_text] if lora_text else []))
            regional = []
        backup: dict = {}
        if lora_text:      # applied for this generation only, then the merged weights come back exactly
            rp.check_ready()
            rp.add_deltas(self.lora_applier(lora_text, rp.layout(), rp.spec.arch), backup)
            extra["LoRAs"] = lora_text
        hooks, png_extra = None, {}
        if any(regional):
            rp.check_ready()
            hooks, png_extra = self._regional(params, mask, regional, backup)
            extra["LoRA mask"] = "; ".join(f"{c}: {s}" for c, s in zip("RGB", regional) if s)
        try:
            if hooks is not None:
                hooks.__enter__()
            from dataclasses import replace as _replace
            res = generate(rp, _replace(params, prompt=prompt), model_label=label,
                           model_hash=recipe.hash_a if recipe else "", extra_info=extra, progress=progress,
                           should_stop=self.should_stop if interruptible else None, init_image=init_image)
        finally:
            if hooks is not None:
                hooks.__exit__(None, None, None)
            if backup:
                rp.restore(backup)
        if "image" in id_to and self.history_id is not None:
            for im in res.images:
                im.image = draw_merge_id(im.image, self.history_id)
        files = []
        if save:
            stem = stem or time.strftime("%Y%m%d-%H%M%S")
            for i, im in enumerate(res.images):
                files.append(save_png(im.image, (folder or self.outputs / "images") / f"{stem}-{i:03}-{im.seed}.png",
                                      im.infotext, recipe.to_line() if recipe else "",
                                      merge_id if merge_id is not None else "", png_extra))
        for im in res.images:
            im.image.info["parameters"] = im.infotext
        return Outcome(f"generated {len(res.images)} image(s)", Timings(generate=res.seconds), self.history_id,
                       res, files=files)

    def _regional(self, params: GenParams, mask, regional: list[str], backup: dict):
        """(hooks for the masked LoRAs' U-Net parts, PNG text chunks recording the mask); their
        text-encoder parts are added into the weights (saved in ``backup``)."""
        import base64
        import io

        from .pipeline.regional import RegionalLoras, mask_levels, rgb_masks
        rp = self.pipeline
        p = params.with_prompt_options()
        sizes = [(p.width, p.height)] + ([p.hires_size()] if p.hires else [])
        entries = []
        for spec, channel in zip(regional, rgb_masks(mask)):
            if spec:
                applier = self.lora_applier(spec, rp.layout(), rp.spec.arch)
                entries.append((applier, mask_levels(channel, sizes)))
                rp.add_deltas(applier.only(lambda k: not k.startswith(UNET)), backup)
        buf = io.BytesIO()
        mask.convert("RGB").save(buf, format="PNG")
        return RegionalLoras(rp, entries), {"sdmw_lora_mask": base64.b64encode(buf.getvalue()).decode()}

    def save_current(self, name: str = "", options: SaveOptions | None = None, progress=None) -> Outcome:
        """Write exactly the weights the pipeline holds (LDM layout)."""
        options = options or SaveOptions()
        t0 = time.perf_counter()
        rp = self.pipeline
        recipe = rp.recipe
        fname = name or (auto_filename(recipe, options) if recipe else Path(rp.label).stem + "-copy.safetensors")
        path = self.dirs.new_file("ckpt", fname, _ext(options))
        tensors = rp.state_dict()
        meta = recipe_metadata(recipe) if recipe else {}
        saved = save_tensors(path, tensors, options, meta, progress)
        return Outcome(f"saved {saved}", Timings(save=time.perf_counter() - t0), path=saved)

    def save_recipe(self, recipe: Recipe, name: str = "", options: SaveOptions | None = None,
                    progress=None, record: bool = False, source: str = "ui") -> Outcome:
        """Merge a recipe straight to a file (e.g. a history row), without touching the pipeline.
        ``record``: a new merge (a Flux merge, which the app saves rather than generates with) gets
        its history row once the file is written."""
        options = options or SaveOptions()
        self.stop_event.clear()
        self.warmer.hand_over()
        t0 = time.perf_counter()
        path = self.dirs.new_file("ckpt", name or auto_filename(recipe, options), _ext(options))
        models, paths = self._load(recipe)
        plan = plan_for(recipe, models)
        post = None
        if recipe.loras:
            applier = self.lora_applier(recipe.loras, models["a"].tensors, plan.arch)
            post = lambda k, v: applier.apply(k, v) if k in applier.by_key else v  # noqa: E731
        saved = save_merge(plan, path, options, paths=paths, progress=progress, should_stop=self.should_stop,
                           post=post)
        took = time.perf_counter() - t0
        notes = list(plan.notes)
        hid = self.record(recipe, notes, source=source, seconds=took) if record else None
        head = f"merged #{hid} into a file: " if hid is not None else ""
        return Outcome("; ".join([f"{head}saved {saved}"] + notes), Timings(save=took), hid, path=saved, notes=notes)

    def merge_lora_files(self, text: str, method: str = "svd", same_strength: bool = False, new_rank: int = 64,
                         new_conv_rank: int | None = None, name: str = "merged-lora",
                         metadata: str = "create new", precision: str = "fp16", overwrite: bool = False,
                         clamp_quantile: float = 0.99) -> Outcome:
        """Merge LoRAs ("name:ratio, ...") into one LoRA file in the LoRA folder."""
        from lora_ops.merge_loras import merge_lora_set, merged_metadata, parse_ratio_list
        path = self._new_lora(name, overwrite)
        pairs = [(self.load_lora_file(n), r) for n, r in parse_ratio_list(text)]
        sd = merge_lora_set(pairs, method, same_strength=same_strength, new_rank=new_rank,
                            new_conv_rank=new_conv_rank, clamp_quantile=clamp_quantile)
        meta = merged_metadata(pairs, metadata, {"ss_network_module": "networks.lora", "sdmw_merged_from": text,
                                                 "sdmw_method": method}, sd)
        return self._save_lora(path, sd, meta, precision, overwrite)

    def _new_lora(self, name: str, overwrite: bool) -> Path:
        """The output file for a LoRA operation, refused before any work if it exists."""
        path = self.dirs.new_file("lora", name, ".safetensors")
        if path.exists() and not overwrite:
            raise exists_error(path.name, " in the LoRA folder")
        return path

    @staticmethod
    def _save_lora(path: Path, sd: dict, meta: dict, precision: str = "fp16", overwrite: bool = False) -> Outcome:
        from lora_ops.formats import save_lora
        path = save_lora(path, sd, meta, precision, overwrite)
        return Outcome(f"saved {path}", path=path)

    def extract_dylora(self, lora: str, rank: int, name: str = "", overwrite: bool = False) -> Outcome:
        """A fixed-rank LoRA from a DyLoRA in the LoRA folder (default name: ``<lora>-<rank>``)."""
        from lora_ops.dylora import extract_dylora_rank
        src = self.load_lora_file(lora)
        path = self._new_lora(name or f"{src.name}-{int(rank):04d}", overwrite)
        sd, meta = extract_dylora_rank(src, int(rank))
        return self._save_lora(path, sd, meta, overwrite=overwrite)

    def extract_from_loras(self, lora_b: str, lora_c: str, alpha: float, beta: float, gamma: float = 1.0,
                           rank: int = 64, name: str = "extracted-features", overwrite: bool = False) -> Outcome:
        """SuperMerger's extract on two LoRAs, written to the LoRA folder."""
        from lora_ops.extract import extract_from_loras
        path = self._new_lora(name, overwrite)
        if not lora_b or not lora_c:
            raise MergeError("choose LoRA B and LoRA C")
        if self.dirs.resolve("lora", lora_b) == self.dirs.resolve("lora", lora_c):
            raise MergeError("LoRA B and LoRA C are the same file: choose two different LoRAs")
        sd = extract_from_loras(self.load_lora_file(lora_b), self.load_lora_file(lora_c), alpha, beta, gamma, rank)
        meta = {"ss_network_module": "networks.lora",
                "sdmw_extract": f"{lora_b} / {lora_c}: alpha {alpha:g}, beta {beta:g}, gamma {gamma:g}"}
        return self._save_lora(path, sd, meta, overwrite=overwrite)

    def extract_lora(self, model_a: str, model_b: str, alpha: float = 1.0, beta: float = 1.0, dim: int = 128,
                     conv_dim: int | None = None, name: str = "extracted-lora", progress=None,
                     overwrite: bool = False, conv_in_out: bool = False) -> Outcome:
        """A LoRA approximating α·A − β·B, written to the LoRA folder."""
        from lora_ops.extract import extract_lora
        from .arch import check_same_arch, detect_arch
        path = self._new_lora(name, overwrite)
        if not model_a or not model_b:
            raise MergeError("choose model A (the fine-tune) and model B (its base)")
        pa, pb = self.dirs.resolve("ckpt", model_a), self.dirs.resolve("ckpt", model_b)
        if pa == pb:
            raise MergeError("model A and model B are the same file: their difference is zero, there is nothing "
                             "to extract")
        a = self.cache.get(pa)
        b = self.cache.get(pb, pinned=(pa,))
        arch = check_same_arch({a.name: detect_arch(a.tensors, a.name), b.name: detect_arch(b.tensors, b.name)})
        self.stop_event.clear()
        sd, meta = extract_lora(a.tensors, b.tensors, arch, dim, conv_dim, alpha, beta,
                                should_stop=self.should_stop, progress=progress, conv_in_out=conv_in_out)
        return self._save_lora(path, sd, meta, overwrite=overwrite)

    def unload(self) -> str:
        t5 = self.pipeline.t5_tokenizer
        self.pipeline = ResidentPipeline(self.pipeline.device, self.pipeline.dtype, self.pipeline.storage)
        self.pipeline.t5_tokenizer = t5
        return "pipeline unloaded"

    def flux_generation_problem(self, recipe: Recipe) -> str | None:
        """Why a Flux merge cannot be shown in the pipeline (then it is merged into a file), or None."""
        from .files.checkpoint_io import header_entries, read_safetensors_header
        from .flux_layout import CLIP_PREFIX
        if not self.pipeline.t5_tokenizer:
            return "generating with Flux needs the T5 tokenizer (start the app with --t5-tokenizer DIR)"
        path = self.dirs.resolve("ckpt", recipe.model_a)
        if path.suffix.lower() == ".safetensors":
            _, entries = header_entries(read_safetensors_header(path)[0], path.name)
            if not any(e.key.startswith(CLIP_PREFIX) for e in entries):
                return f"{recipe.model_a} is a transformer-only Flux file (no CLIP-L, T5 or VAE to generate with)"
        return None

    def clear_cache(self) -> str:
        self.warmer.cancel()
        return f"cleared {self.cache.clear()} cached model(s)"


def _ext(options: SaveOptions) -> str:
    return ".safetensors" if options.fmt == "safetensors" else ".ckpt"
