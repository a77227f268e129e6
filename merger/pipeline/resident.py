"""The resident Diffusers pipeline and the in-place swap of merged weights into it.

The pipeline is built once per architecture from offline configs (``pipeline_config``) with
uninitialised storage, then every merge streams its tensors straight into the parameters:
where dtype and device agree the merge arithmetic writes into the parameter's own memory, so
no second full copy of the model ever exists. A merge that is stopped or fails part-way leaves
the pipeline marked *incomplete* (generation refuses, the UI says so) until the next merge.

Storage precision: computing in fp32 (the CPU default), a component whose merged weights are
all fp16 (or all bf16) keeps them in that precision and is upcast layer by layer for each
forward pass (``weight_storage``). The values are exactly the merge's, so images are
bit-identical to an fp32 pipeline loaded from the saved merge, with half the resident memory
and half the bytes each merge writes.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from ..arch import ARCH_NAMES, detect_arch
from ..files.checkpoint_io import Checkpoint
from ..engine import MergePlan, check_inputs, iter_merge
from ..errors import MergeError
from .keymap import VAE as VAE_PREFIX, Target, component_of, targets_for
from ..ldm_layout import sized_layout, sized_params
from .pipeline_config import clip_tokenizer, pipeline_folder
from ..engine.kernels.fp8 import copy_into
from ..engine.tensor_ops import ReusableBuffer
from .weight_storage import store_low_precision


def default_device() -> tuple[str, torch.dtype]:
    """CUDA in fp16 when present, else CPU in fp32."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


@dataclass(frozen=True)
class Spec:
    """What pipeline a checkpoint needs: architecture, sizes, prediction type."""
    arch: str
    size: str                 # "full" or "tiny"
    in_channels: int = 4
    prediction_type: str = "epsilon"
    storage: tuple[tuple[str, str], ...] = ()   # (component, dtype name) stored below the compute dtype

    @property
    def stored(self) -> dict[str, torch.dtype]:
        """component -> dtype its weights are held in, for those held below the compute dtype."""
        return {c: getattr(torch, name) for c, name in self.storage}

    def params(self) -> dict:
        p = sized_params(self.arch, self.size)
        if self.arch != "flux":
            p["unet"] = {**p["unet"], "in_channels": self.in_channels}
        return p


def spec_for(tensors, name: str = "checkpoint", prediction_type: str | None = None) -> Spec:
    arch = detect_arch(tensors, name)
    if arch == "flux":
        return _flux_spec(tensors, name)
    probe = "model.diffusion_model.time_embed.0.weight"
    if probe not in tensors:
        raise MergeError(f"{name} has no {probe}: not a complete checkpoint")
    for size in ("full", "tiny"):
        want = sized_layout(arch, size)[probe]
        if tuple(tensors[probe].shape) == want:
            cin = tensors["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
            return Spec(arch, size, int(cin), prediction_type or ("auto" if arch == "sd2" else "epsilon"))
    raise MergeError(f"{name}: {ARCH_NAMES[arch]} model with unexpected sizes "
                     f"({probe} is {list(tensors[probe].shape)})")


def _flux_spec(tensors, name: str) -> Spec:
    from ..flux_layout import CLIP_PREFIX, T5_PREFIX
    probe = "model.diffusion_model.img_in.weight"
    if probe not in tensors:
        raise MergeError(f"{name} has no {probe}: not a complete Flux.1 transformer")
    if not any(k.startswith((CLIP_PREFIX, T5_PREFIX)) for k in tensors):
        raise MergeError(f"{name} is a transformer-only Flux.1 file: generating needs CLIP-L, T5 and the VAE too, "
                         f"which only all-in-one checkpoints (ComfyUI layout) carry; merge it into a file instead "
                         f"(tick 'save model')")
    for size in ("full", "tiny"):
        if tuple(tensors[probe].shape) == sized_layout("flux", size)[probe]:
            return Spec("flux", size, 64, "flow")
    raise MergeError(f"{name}: Flux.1 model with unexpected sizes ({probe} is {list(tensors[probe].shape)})")


REDUCED = (torch.float16, torch.bfloat16)
# Layers kept in the compute dtype under low-precision storage: each component's first parameter
# (diffusers and transformers report a model's dtype as its first parameter's and cast inputs to
# it), and the text encoders' embeddings.
KEEP_IN_COMPUTE = {"unet": (r"^conv_in$",), "vae": (r"^encoder\.conv_in$",),
                   "text_encoder": ("embeddings",), "text_encoder_2": ("embeddings",)}


def storage_dtypes(dtypes: Mapping[str, torch.dtype], arch: str,
                   compute: torch.dtype) -> tuple[tuple[str, str], ...]:
    """``(component, dtype name)`` for each component whose floating-point weights (``dtypes``:
    LDM key -> dtype of the merge result) are all fp16, or all bf16, while computing in fp32:
    such a component is stored in that precision. Anything else is stored in ``compute``."""
    if compute != torch.float32:
        return ()
    seen: dict[str, set[torch.dtype]] = {}
    for key, dt in dtypes.items():
        comp = component_of(key, arch) if dt.is_floating_point else None
        if comp is not None:
            seen.setdefault(comp, set()).add(dt)
    return tuple(sorted((c, str(next(iter(d))).removeprefix("torch.")) for c, d in seen.items()
                        if len(d) == 1 and next(iter(d)) in REDUCED))


@torch.no_grad()
def detect_v_prediction(unet) -> bool:
    """A1111's test for SD2 v-parameterisation: at t=999, an epsilon model's output minus its
    input averages above -1 for a constant input of 0.5, a v model's far below."""
    p = next(unet.parameters())
    x = torch.ones((1, unet.config.in_channels, 8, 8), device=p.device, dtype=unet.dtype) / 2
    ctx = torch.ones((1, 2, unet.config.cross_attention_dim), device=p.device, dtype=unet.dtype) / 2
    out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=ctx).sample
    return (out[:, :4].float() - x[:, :4].float()).mean().item() < -1


def _tied_parameters(module) -> list[tuple[tuple, list[tuple]]]:
    """The parameters that several modules hold (tied weights: T5's ``encoder.embed_tokens``
    is its ``shared`` embedding), as ((first module, name), [(other module, name), ...]).
    ``to_empty`` replaces each holder's parameter with its own new storage, so a checkpoint that
    names the weight once (``shared.weight``) would leave the other copy uninitialised: the
    Flux T5 encoder embedded its tokens with whatever memory it was given (zeros in a fresh
    process, garbage or NaN later)."""
    users: dict[int, list[tuple]] = {}
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((mod, name))
    return [(found[0], found[1:]) for found in users.values() if len(found) > 1]


def empty_module(make, device: str, dtype: torch.dtype, storage: torch.dtype | None = None,
                 keep: tuple[str, ...] = ()):
    """A module built on the meta device, then given uninitialised storage (the weights come
    from a checkpoint); non-persistent ``position_ids`` buffers are filled in. With ``storage``,
    its Linear/Conv/Embedding layers (but those whose names match a ``keep`` pattern) are stored
    in that dtype and cast to ``dtype`` around each forward pass."""
    with torch.device("meta"):
        module = make()
    # torch's own ``to``: diffusers' override only adds a console warning per build (about
    # modules it would keep in float32; none here) and casts the same
    module = torch.nn.Module.to(module, dtype=dtype)
    if storage is not None and storage != dtype:
        store_low_precision(module, storage, dtype, keep)
    tied = _tied_parameters(module)
    module = module.to_empty(device=device)
    for (owner, name), others in tied:
        for mod, other in others:              # to_empty gave each user its own storage: re-tie
            mod._parameters[other] = owner._parameters[name]
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
    return module.eval().requires_grad_(False)


def import_pipeline_modules() -> None:
    """Import now the modules that building an SD1/SD2/SDXL pipeline and generating with it load.
    ``import diffusers`` defers its modules to their first use: at the app's first merge the U-Net
    and VAE classes alone took 2.5-3.4 s of imports on 2 cores. The app runs this on a background
    thread at start (``app.py``); ``tests/pipeline_imports_probe.py`` checks that a build and a
    generation afterwards import nothing more."""
    import diffusers
    import transformers

    from .generate import SAMPLERS
    for name in ("AutoencoderKL", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel"):
        getattr(diffusers, name)                           # a lazy module's attribute: imports it
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        getattr(transformers, name)
    for cls_name, _ in SAMPLERS.values():
        getattr(diffusers, cls_name)._get_compatibles()      # from_config imports these too


def _build_components(spec: Spec, device: str, dtype: torch.dtype, t5_tokenizer=None):
    if spec.arch == "flux":
        from .flux_pipeline import build_flux
        return build_flux(spec.params(), device, dtype, t5_tokenizer, empty_module)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    pred = "epsilon" if spec.prediction_type == "auto" else spec.prediction_type
    folder = pipeline_folder(spec.arch, spec.params(), pred)

    def empty(component, make):
        return empty_module(make, device, dtype, spec.stored.get(component), KEEP_IN_COMPUTE[component])

    parts = {
        "unet": empty("unet", lambda: UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(folder / "unet"))),
        "vae": empty("vae", lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))),
        "text_encoder": empty("text_encoder", lambda: CLIPTextModel(
            CLIPTextConfig.from_pretrained(folder / "text_encoder"))),
        "tokenizer": clip_tokenizer(folder / "tokenizer"),
        "scheduler": EulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
    }
    if spec.arch == "sdxl":
        parts["text_encoder_2"] = empty("text_encoder_2", lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
        parts["tokenizer_2"] = clip_tokenizer(folder / "tokenizer_2")
        return StableDiffusionXLPipeline(**parts), folder
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False), folder


@dataclass
class SwapStats:
    keys: int = 0
    in_place: int = 0
    copied: int = 0
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # optional parts no model had (see write)


class ResidentPipeline:
    """One loaded pipeline that merges are swapped into. Thread-safe (one swap or generation
    at a time). ``dtype`` is the compute dtype; ``storage="model"`` stores fp16/bf16 merges in
    their own precision when computing in fp32 (see the module notes), ``"compute"`` stores
    everything in ``dtype``."""

    def __init__(self, device: str | None = None, dtype: torch.dtype | None = None, storage: str = "model"):
        if storage not in ("model", "compute"):
            raise ValueError(f"storage must be 'model' or 'compute', not {storage!r}")
        dev, dt = default_device()
        self.device, self.dtype, self.storage = device or dev, dtype or dt, storage
        self.pipe = None
        self.modules: dict = {}
        self.prediction_type = "epsilon"
        self.spec: Spec | None = None
        self.folder = None
        self.targets: dict[str, list[tuple[Target, torch.Tensor]]] = {}
        self.extras: dict[str, torch.Tensor] = {}   # LDM keys the pipeline has no parameter for
        self.present: set[str] = set()               # LDM keys the current weights came from
        self.vae_missing = False                      # the weights came without a VAE
        self.state = "empty"                          # empty | ok | incomplete
        self._last: tuple | None = None               # (signature, per-key ratios) of the last swap
        self._pred_source: tuple | None = None        # model A the prediction type was detected on
        self.problem = ""
        self.recipe = None
        self.label = ""
        self.builds = 0
        self.lock = threading.RLock()
        self.t5_tokenizer = None                      # Flux: the user's T5 tokenizer folder (--t5-tokenizer)

    # ------------------------------------------------------------------ building
    def ensure(self, spec: Spec) -> bool:
        """Build the pipeline for ``spec`` unless the current one fits; True if rebuilt."""
        if self.pipe is not None and self.spec == spec:
            return False
        self.pipe = None
        self.targets = {}
        self.pipe, self.folder = _build_components(spec, self.device, self.dtype, self.t5_tokenizer)
        self.modules = {n: getattr(self.pipe, n) for n in ("unet", "transformer", "vae", "text_encoder",
                                                           "text_encoder_2") if getattr(self.pipe, n, None) is not None}
        self.spec, self.builds = spec, self.builds + 1
        self.state, self.problem, self.vae_name = "incomplete", "no weights loaded yet", ""
        self._pred_source = None
        return True

    def _targets(self, key: str) -> list[tuple[Target, torch.Tensor]]:
        hit = self.targets.get(key)
        if hit is None:
            comps = self.modules
            prefixes = {n: "text_model." if hasattr(m, "text_model") else "" for n, m in comps.items()
                        if n.startswith("text")}
            widths = {n: m.config.hidden_size for n, m in comps.items() if n.startswith("text")}
            if "transformer" in comps:       # Flux: rows per q/k/v in the fused BFL tensors
                cfg = comps["transformer"].config
                widths["transformer"] = cfg.num_attention_heads * cfg.attention_head_dim
            hit = []
            for t in targets_for(key, self.spec.arch, widths, prefixes):
                try:
                    hit.append((t, comps[t.component].get_parameter(t.param)))
                except AttributeError:
                    pass  # e.g. SD2's last text layer, which diffusers does not use
            self.targets[key] = hit
        return hit

    def use_vae(self, vae: dict[str, torch.Tensor] | None, name: str = "") -> None:
        """Decode with a separate VAE (``first_stage_model.``-keyed tensors), or with the
        model's own (baked) VAE when ``vae`` is None. The merged weights are not touched."""
        from diffusers import AutoencoderKL

        from .keymap import VAE, vae_param
        with self.lock:
            if self.pipe is None:
                raise MergeError("load or merge a model first")
            if vae is None:
                self.pipe.vae, self.vae_name = self.modules["vae"], ""
                return
            ext = empty_module(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(self.folder / "vae")),
                               self.device, self.dtype)
            params = dict(ext.named_parameters())
            filled = set()
            for key, value in vae.items():
                hit = vae_param(key[len(VAE):]) if key.startswith(VAE) else None
                if hit and hit[0] in params:
                    if params[hit[0]].numel() != value.numel():
                        raise MergeError(f"VAE {name} does not fit this model ({key}: {list(value.shape)})")
                    params[hit[0]].data.copy_(value.reshape(params[hit[0]].shape))
                    filled.add(hit[0])
            if len(filled) != len(params):
                raise MergeError(f"VAE {name} is missing {len(params) - len(filled)} of {len(params)} tensors")
            self.pipe.vae, self.vae_name = ext, name

    # ------------------------------------------------------------------ swapping
    def _out_for(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        hit = self._targets(key)
        if len(hit) == 1 and hit[0][0].kind in ("copy", "reshape"):
            p = hit[0][1]
            if p.device == like.device and p.numel() == like.numel() and (
                    p.dtype == like.dtype or like.is_floating_point()):
                return p.data.view(like.shape)
        return None

    def write(self, items: Iterable[tuple[str, torch.Tensor]], out_for=None, partial: bool = False) -> SwapStats:
        stats = SwapStats()
        covered = set()
        present = set()
        for key, value in items:
            stats.keys += 1
            hit = self._targets(key)
            if not hit:
                if value.is_floating_point() or key.endswith("position_ids"):
                    self.extras[key] = value.detach().to("cpu", copy=True)
                stats.unused.append(key)
                continue
            present.add(key)
            for target, param in hit:
                covered.add(id(param))
                if out_for is not None and param.data.data_ptr() == value.data_ptr():
                    stats.in_place += 1
                    continue
                src = target.view_of(value)
                if src.numel() != param.numel():
                    raise MergeError(f"{key}: {list(src.shape)} does not fit the pipeline's "
                                     f"{target.component}.{target.param} {list(param.shape)}")
                copy_into(param.data, src.reshape(param.shape))       # float8 merges by table
                stats.copied += 1
        if not partial:
            self.vae_missing = False
            self._fill_missing(covered, stats)
            self.present = present
        return stats

    def _fill_missing(self, covered: set, stats: SwapStats) -> None:
        """Pipeline parameters no key fed. Parts of the text encoders that files may omit
        (:func:`~merger.engine.key_coverage.optional_part`) are zeroed: a part generation does
        not use stays unused, and a zeroed transformer block is the identity (its residual
        passes through), which is what skipping it means. Anything else is refused by name."""
        from ..engine.key_coverage import NEEDED, SKIPPABLE, last_layers, optional_part
        missing_ids = {id(p) for _, p in self._all_params()} - covered
        if not missing_ids:
            return
        layout = self.layout()
        last = last_layers(layout)
        keys, blocking = {}, []
        for key in layout:
            params = [p for _, p in self._targets(key) if id(p) in missing_ids]
            if not params:
                continue
            opt = optional_part(key, self.spec.arch, last)
            if opt is None or opt[0] == NEEDED:
                blocking.append((key, opt))
            else:
                keys[key] = (params, opt)
        vae = [k for k, _ in blocking if k.startswith(VAE_PREFIX)]
        if vae and len(vae) == sum(k.startswith(VAE_PREFIX) for k in layout):
            blocking = [b for b in blocking if not b[0].startswith(VAE_PREFIX)]   # no VAE at all: see check_ready
            self.vae_missing = True
            stats.notes.append("no model has a VAE: generation uses the VAE chosen in the VAE list")
        if blocking:
            what = next((o[1] for _, o in blocking if o), None)
            raise MergeError(f"the checkpoint has no weights for {len(blocking)} tensor(s) generation needs "
                             f"({', '.join(k for k, _ in blocking[:3])}{' …' if len(blocking) > 3 else ''})"
                             + (f": {what}" if what else ": it is incomplete"))
        for params, _ in keys.values():
            for p in params:
                p.data.zero_()
        for desc in dict.fromkeys(o[1] for _, o in keys.values() if o[0] == SKIPPABLE):
            stats.notes.append(f"no model has {desc}: generation skips it")

    def _all_params(self):
        for n, m in self.modules.items():
            for name, p in m.named_parameters():
                yield f"{n}.{name}", p

    def _run(self, spec: Spec, items_factory: Callable, label: str, recipe, source, partial: bool = False) -> SwapStats:
        with self.lock:
            self.ensure(spec)
            self.state, self.problem = "incomplete", f"loading {label} did not finish"
            self._last = None
            if not partial:
                self.extras = {}
            try:
                stats = items_factory()
            except BaseException as e:
                self.problem = f"the last merge ({label}) did not finish: {e}"
                raise
            if spec.arch == "flux":
                pass                          # flow matching: no prediction type to set
            elif spec.prediction_type == "auto":
                if self._pred_source != (source.path, id(source)):   # a property of model A: once per model
                    self._set_prediction("v_prediction" if detect_v_prediction(self.pipe.unet) else "epsilon")
                    self._pred_source = (source.path, id(source))
            else:
                self._set_prediction(spec.prediction_type)
                self._pred_source = None
            self.state, self.problem, self.recipe, self.label = "ok", "", recipe, label
            return stats

    def _spec(self, tensors, name: str, prediction_type: str | None, dtypes: Mapping[str, torch.dtype]) -> Spec:
        spec = spec_for(tensors, name, prediction_type)
        if self.storage == "compute" or spec.arch == "flux":      # Flux: held in the compute dtype
            return spec
        return replace(spec, storage=storage_dtypes(dtypes, spec.arch, self.dtype))

    def _set_prediction(self, kind: str) -> None:
        if self.pipe.scheduler.config.prediction_type != kind:
            self.pipe.scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config,
                                                                       prediction_type=kind)
        self.prediction_type = kind

    @staticmethod
    def _signature(plan: MergePlan, spec: Spec) -> tuple:
        """What, besides per-key ratios, decides the merged weights: the loaded model objects
        (the cache returns the same object until the file changes), mode, calcmode, gamma."""
        r = plan.recipe
        models = tuple(id(ck) for ck in (plan.a, plan.b, plan.c))
        return (spec, models, r.mode, r.calcmode, r.gamma, r.uses_c())

    def load_checkpoint(self, ck: Checkpoint, prediction_type: str | None = None) -> SwapStats:
        """Show one model as it is (no merge)."""
        spec = self._spec(ck.tensors, ck.name, prediction_type, {k: t.dtype for k, t in ck.tensors.items()})
        return self._run(spec, lambda: self.write(ck.tensors.items()), ck.name, None, ck)

    def swap(self, plan: MergePlan, progress=None, should_stop=None, prediction_type: str | None = None,
             label: str = "", incremental: bool = True) -> SwapStats:
        """Merge ``plan`` directly into the pipeline's parameters. With ``incremental``, when
        the previous swap used the same models, mode and calcmode, only the keys whose
        effective ratios (or adjust) changed are recomputed (an XYZ sweep over one block touches
        only that block)."""
        spec = self._spec(plan.a.tensors, plan.a.name, prediction_type,
                          {k: dt for k, (_, dt) in plan.output_spec().items()})
        # bad input is refused while the pipeline still holds its last merge
        check_inputs(plan, should_stop=should_stop, device=self.device, progress=progress)
        sig = self._signature(plan, spec)
        ratios = {j.key: (j.ratios, j.channels, repr(j.adjust), j.source) for j in plan.jobs}
        todo = plan
        if incremental and self.state == "ok" and self._last is not None and self._last[0] == sig:
            prev = self._last[1]
            todo = replace(plan, jobs=[j for j in plan.jobs if prev.get(j.key) != ratios[j.key]])

        def run():
            items = iter_merge(todo, out_for=self._out_for, alloc=ReusableBuffer(self.device), progress=progress,
                               should_stop=should_stop, device=self.device)
            stats = self.write(items, out_for=self._out_for, partial=todo is not plan)
            self._last = (sig, ratios)
            return stats
        return self._run(spec, run, label or plan.a.name, plan.recipe, plan.a, partial=todo is not plan)

    def targets_of(self, key: str) -> list:
        """[(Target, parameter)] an LDM key feeds in the pipeline's modules."""
        return self._targets(key)

    def module_of(self, target):
        """The Diffusers module that owns a target's parameter."""
        return self.modules[target.component].get_submodule(target.param.rsplit(".", 1)[0])

    def layout(self) -> dict:
        """LDM key -> shape of the loaded architecture."""
        return sized_layout(self.spec.arch, self.spec.size)

    def add_deltas(self, applier, backup: dict | None = None) -> int:
        """Add LoRA changes (``applier.delta(key)``, LDM layout) to the parameters in place;
        with ``backup`` the touched parameters are saved there first (to undo exactly)."""
        with self.lock:
            self._last = None          # the next merge must rewrite everything
            n = 0
            for key in applier.keys:
                d = applier.delta(key)
                for target, param in self._targets(key):
                    if backup is not None and id(param) not in backup:
                        backup[id(param)] = (param, param.detach().clone())
                    v = target.view_of(d).reshape(param.shape).to(param.device)
                    if v.dtype == param.dtype:
                        param.data.add_(v)
                    else:   # add in the delta's precision, round once (as kohya's merge does)
                        param.data.copy_(torch.add(v, param.data))
                    n += 1
            return n

    @staticmethod
    def restore(backup: dict) -> None:
        for param, saved in backup.values():
            param.data.copy_(saved)

    # ------------------------------------------------------------------ reading back
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the pipeline holds, in LDM layout (plus the keys it has no parameter
        for, kept from the last merge), for "Save current merge". Components stored in fp16/bf16
        come back wholly in that dtype (their norms, kept in fp32, hold values of it)."""
        with self.lock:
            if self.state != "ok":
                raise MergeError(f"nothing to save: {self.problem or 'no model loaded'}")
            stored = self.spec.stored
            out: dict[str, torch.Tensor] = {}
            for key, hit in self.targets.items():
                if not hit or key not in self.present:    # parts the weights did not come with
                    continue
                parts = []
                for target, param in hit:
                    v = param.detach().to("cpu", stored.get(target.component, param.dtype))
                    if target.kind in ("transpose", "halves"):
                        v = v.T if target.kind == "transpose" else target.view_of(v)   # (halves: its own inverse)
                    parts.append(v)
                out[key] = torch.cat(parts) if hit[0][0].kind == "rows" else parts[0]
            layout = self.layout()
            for key, v in list(out.items()):  # VAE attention: linear back to 1x1 conv
                want = layout.get(key)
                if want is not None and tuple(v.shape) != want and v.numel() == torch.Size(want).numel():
                    out[key] = v.reshape(want)
            out.update(self.extras)
            return out

    def check_ready(self) -> None:
        if self.state != "ok":
            raise MergeError(f"the loaded model is incomplete: {self.problem}. Merge again before generating")
        if self.vae_missing and not self.vae_name:
            raise MergeError("the model has no VAE (none of the merged files has one): choose a VAE in the VAE list "
                             "to generate")
