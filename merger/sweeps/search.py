"""Guided merge search: an optimizer proposes merges, images are judged, the optimizer learns.

The optimizer is Optuna's (TPE by default; GP, CMA-ES or random selectable). Studies live in one
SQLite file under the data folder (``search.db``, Optuna's RDB storage), so a search survives a
restart and resumes where it stopped. Each trial is a merge: the searched parameters
(:class:`SearchSpace`: α and/or β of chosen MBW blocks, a global α/β, calcmode, a method's
density/drop) applied to a base recipe, merged into the resident pipeline (incremental re-merge:
only the keys whose ratios changed are recomputed), recorded as a history row (source
"search"), and rendered for every prompt × seed of the search.

Objectives: ``like`` and ``scorer`` (:mod:`.objectives`) give each trial a number to maximise;
``eye`` asks the user: each round shows a batch of candidates, the user picks the best, and
optuna-dashboard's preferential study (its ``PreferentialGPSampler``: a GP over the compared
pairs, botorch) proposes the next batch from those preferences.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from ..blocks import block_ids, expand_blocks
from ..errors import MergeError, MergeStopped
from ..pipeline.generate import GenParams
from ..files.paths import data_dir
from ..recipe import Recipe

SAMPLERS = ("tpe", "gp", "cmaes", "random")
OBJECTIVES = ("eye", "like", "scorer")


@dataclass
class SearchSpace:
    """What a search varies. ``blocks``: MBW block IDs (ranges like ``IN00-IN11`` allowed) whose
    α (``block_alpha``) and/or β (``block_beta``) are searched; ``global_alpha``/``global_beta``
    search one α/β for all blocks instead; ``calcmodes`` (2+) a calcmode; ``density``/``drop`` a
    method's parameter. Each range is [lo, hi]."""
    blocks: list[str] = field(default_factory=list)
    block_alpha: bool = True
    block_beta: bool = False
    global_alpha: bool = False
    global_beta: bool = False
    alpha: tuple[float, float] = (0.0, 1.0)
    beta: tuple[float, float] = (0.0, 1.0)
    calcmodes: list[str] = field(default_factory=list)
    density: tuple[float, float] | None = None
    drop: tuple[float, float] | None = None

    def block_list(self, arch: str) -> list[str]:
        ids = block_ids(arch)
        out: list[str] = []
        for tok in self.blocks:
            neg, blocks = expand_blocks(tok, arch)
            out += [b for b in ids if b not in blocks] if neg else blocks
        return [b for b in ids if b in out]          # architecture order, each once

    def param_names(self, arch: str) -> list[str]:
        names = []
        blocks = self.block_list(arch)
        for which, per_block, glob in (("alpha", self.block_alpha, self.global_alpha),
                                       ("beta", self.block_beta, self.global_beta)):
            if per_block and blocks:
                names += [f"{which} {b}" for b in blocks]
            elif glob:
                names.append(which)
        if len(self.calcmodes) > 1:
            names.append("calcmode")
        names += [n for n in ("density", "drop") if getattr(self, n) is not None]
        return names

    def check(self, recipe: Recipe, arch: str) -> None:
        """Refuse a space that searches nothing, or what the merge does not use, before any trial."""
        from ..engine.calcmodes import get_calcmode
        if not self.param_names(arch):
            raise MergeError("nothing to search: choose blocks (with α and/or β), a global α/β, calcmodes "
                             "or a method parameter")
        uses_beta = recipe.uses_beta() or any(get_calcmode(c).uses_beta for c in self.calcmodes)
        if (self.block_beta and self.blocks or self.global_beta) and not uses_beta:
            what = f"method {recipe.method}" if recipe.method else f"{recipe.mode} with calcmode {recipe.calcmode}"
            raise MergeError(f"{what} does not use β: searching β would change nothing")
        for name in ("alpha", "beta", "density", "drop"):
            rng = getattr(self, name)
            if rng is None:
                continue
            lo, hi = rng
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise MergeError(f"{name} range must be two finite numbers, low < high; got {lo:g}, {hi:g}")
        for name in ("density", "drop"):
            rng = getattr(self, name)
            if rng is None:
                continue
            if not recipe.method:
                raise MergeError(f"{name} belongs to the merge methods; choose a method to search it")
            from ..engine.methods import get_method
            if name not in get_method(recipe.method).reads:
                raise MergeError(f"method {recipe.method} does not use {name}")
            if not (0 <= rng[0] and rng[1] <= 1):
                raise MergeError(f"{name} range must lie within 0 … 1, got {rng[0]:g} … {rng[1]:g}")
        if recipe.method and (self.block_beta and self.blocks or self.global_beta):
            from ..engine.methods import get_method
            second = get_method(recipe.method).second
            if not (0 <= self.beta[0] and self.beta[1] <= 1):
                raise MergeError(f"β sets {second} for method {recipe.method}: its range must lie within 0 … 1")
        for c in self.calcmodes:
            cm = get_calcmode(c)
            if recipe.mode not in cm.modes:
                raise MergeError(f"calcmode {c!r} does not work with {recipe.mode}")
        if self.calcmodes and recipe.method:
            raise MergeError("a method's merge has no calcmode to search")
        bad = [b for b in self.blocks if not b.strip()]
        if bad:
            raise MergeError("empty block name in the searched blocks")


def suggest(trial, space: SearchSpace, arch: str) -> dict:
    """The trial's parameter values (Optuna ``suggest_*`` with the space's ranges)."""
    params = {}
    for name in space.param_names(arch):
        if name == "calcmode":
            params[name] = trial.suggest_categorical("calcmode", list(space.calcmodes))
        else:
            lo, hi = getattr(space, name.split()[0])
            params[name] = trial.suggest_float(name, lo, hi)
    return params


def recipe_for(params: dict, base: Recipe, arch: str) -> Recipe:
    """``base`` with a trial's parameters: per-block values go into the MBW vectors (blocks not
    searched keep the base's vector or scalar), a global α/β replaces the scalar."""
    ids = block_ids(arch)
    changes: dict = {}
    for which in ("alpha", "beta"):
        per_block = {k.split()[1]: v for k, v in params.items() if k.startswith(which + " ")}
        if per_block:
            vec = getattr(base, f"mbw_{which}")
            scalar = base.alpha if which == "alpha" else base.second_value()
            vec = list(vec) if vec is not None and len(vec) == len(ids) else [scalar] * len(ids)
            changes[f"mbw_{which}"] = [round(per_block.get(b, v), 6) for b, v in zip(ids, vec)]
        elif which in params:
            field_name = which
            if which == "beta" and base.method:          # a method's β is its density or drop
                from ..engine.methods import get_method
                field_name = get_method(base.method).second
            changes[field_name] = round(params[which], 6)
            changes[f"mbw_{which}"] = None
    for name in ("calcmode", "density", "drop"):
        if name in params:
            changes[name] = params[name] if name == "calcmode" else round(params[name], 6)
    return replace(base, **changes)


@dataclass
class SearchSpec:
    """A whole search, serialisable: the base recipe (models, mode/method…), the space, how
    each trial is rendered (``gen`` settings for each prompt × seed) and judged."""
    recipe: Recipe
    space: SearchSpace
    gen: object                                  # GenParams (size, steps, sampler, CFG …)
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    seeds: list[int] = field(default_factory=lambda: [1])
    objective: str = "eye"
    sampler: str = "tpe"
    trials: int = 30
    batch: int = 4
    study: str = ""
    seed: int = 0
    references: list = field(default_factory=list)   # PIL images ("like")
    clip_dir: str | None = None
    aesthetic: str | None = None
    imagereward: str | None = None               # an ImageReward folder (the scorer adds its reward)

    def signature(self) -> str:
        """What a study's trials depend on; resuming a study with another one is refused."""
        r = self.recipe
        key = {"models": [r.model_a, r.hash_a, r.model_b if r.uses_b() else "", r.hash_b if r.uses_b() else "",
                          r.model_c if r.uses_c() else "", *r.models, *r.model_hashes],
               "mode": r.method or r.mode, "space": asdict(self.space), "objective": self.objective,
               "prompts": self.prompts, "seeds": self.seeds}
        if self.objective == "scorer" and self.imagereward:   # the score is another sum: not comparable
            key["scorer"] = ["clip"] * bool(self.clip_dir) + ["aesthetic"] * bool(self.aesthetic) + ["imagereward"]
        return json.dumps(key, sort_keys=True)

    def study_name(self) -> str:
        if self.study:
            return self.study
        digest = hashlib.sha1(self.signature().encode()).hexdigest()[:8]
        return f"{self.recipe.model_a.rsplit('.', 1)[0]}-{self.objective}-{digest}"


@dataclass
class Trial:
    number: int
    params: dict
    recipe: Recipe
    merge_id: int | None
    images: list
    score: float | None = None


def make_sampler(name: str, seed: int):
    import optuna
    if name not in SAMPLERS:
        raise MergeError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def storage_url(path=None) -> str:
    path = path or data_dir() / "search.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class Search:
    """One search on a workstation: ``run`` for the value objectives, ``candidates`` +
    ``prefer`` rounds for the eye."""

    def __init__(self, ws, spec: SearchSpec, storage: str | None = None):
        import optuna
        from ..arch import detect_arch_of_file
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if spec.objective not in OBJECTIVES:
            raise MergeError(f"unknown objective {spec.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        spec.recipe.check()
        if not spec.prompts or not spec.seeds:
            raise MergeError("a search needs at least one prompt and one seed")
        if spec.trials < 1 or spec.batch < 2 and spec.objective == "eye":
            raise MergeError("a search needs at least 1 trial (and the eye a batch of 2 or more)")
        self.ws, self.spec = ws, spec
        self.arch = detect_arch_of_file(ws.dirs.resolve("ckpt", spec.recipe.model_a))
        spec.space.check(spec.recipe, self.arch)
        for p in spec.prompts:
            replace(spec.gen, prompt=p).with_prompt_options().check()
        self.objective = None
        if spec.objective != "eye":
            from .objectives import make_objective
            self.objective = make_objective(spec.objective, references=spec.references, clip_dir=spec.clip_dir,
                                            aesthetic=spec.aesthetic, imagereward=spec.imagereward
                                            ).to(ws.pipeline.device)
        self.storage = storage or storage_url()
        name = spec.study_name()
        try:
            if spec.objective == "eye":
                from optuna_dashboard.preferential import create_study
                from optuna_dashboard.preferential.samplers.gp import PreferentialGPSampler
                self.study = create_study(n_generate=spec.batch, study_name=name, storage=self.storage,
                                          sampler=PreferentialGPSampler(seed=spec.seed), load_if_exists=True)
            else:
                self.study = optuna.create_study(study_name=name, storage=self.storage, direction="maximize",
                                                 sampler=make_sampler(spec.sampler, spec.seed), load_if_exists=True)
        except Exception as e:  # noqa: BLE001 - storage and study errors as one line
            raise MergeError(f"could not open search study {name!r}: {str(e).splitlines()[0][:200]}") from None
        sig = self.study.user_attrs.get("signature")
        if sig is None:
            self.study.set_user_attr("signature", spec.signature())
        elif sig != spec.signature():
            raise MergeError(f"study {name!r} was made for other models or search settings; choose another study "
                             f"name to start a new search (nothing of the old one is lost)")
        self._images: dict[int, Trial] = {}
        self.stopped = False
        if spec.objective != "eye":
            self._fail_stale()

    # ------------------------------------------------------------------ common
    def _fail_stale(self) -> None:
        """Trials left RUNNING by a killed process are marked failed (their results never came)."""
        import optuna
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    def _gens(self) -> list[GenParams]:
        return [replace(self.spec.gen, prompt=p, seed=s, batch_count=1, batch_size=1)
                for p in self.spec.prompts for s in self.spec.seeds]

    def render(self, number: int, params: dict) -> Trial:
        """Merge a trial's recipe into the pipeline (a history row) and generate its images."""
        recipe = recipe_for(params, self.spec.recipe, self.arch)
        out = self.ws.merge(recipe, source="search", interruptible=False)
        images = [self.ws.generate(g, save=False, interruptible=False).result.images[0].image for g in self._gens()]
        return Trial(number, params, recipe, out.history_id, images)

    def render_all(self, items: list[tuple[int, dict]], should_stop: Callable[[], bool] | None = None):
        """Render ``(number, params)`` trials, yielding each Trial in order: here one after the
        other, or on the workstation's worker pool (``ws.pool``) all at once, each recorded in
        the history here as its images arrive."""
        pool = getattr(self.ws, "pool", None)
        if pool is None:
            for number, params in items:
                yield self.render(number, params)
            return
        from .dispatch import Task
        gens = [asdict(g) for g in self._gens()]
        recipes = [recipe_for(params, self.spec.recipe, self.arch) for _, params in items]
        vae = getattr(self.ws.pipeline, "vae_name", "") or None
        tasks = [Task(r.to_line(), gens, pool.files_for(r, gens, vae)) for r in recipes]
        for i, out in pool.ordered(tasks, should_stop, vae):
            if out is not None:
                hid = self.ws.record(recipes[i], out.notes, source="search", seconds=out.merge_seconds)
                yield Trial(items[i][0], items[i][1], recipes[i], hid, [im.image for im in out.images])

    def finished(self) -> list:
        import optuna
        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    # ------------------------------------------------------------------ value objectives
    def step(self) -> Trial:
        return self._batch(1)[0]

    def _batch(self, k: int, should_stop: Callable[[], bool] | None = None) -> list[Trial]:
        """Ask ``k`` trials, render them (in parallel on a worker pool), score and tell each."""
        import optuna
        asked = [self.study.ask() for _ in range(k)]
        items = [(t.number, suggest(t, self.spec.space, self.arch)) for t in asked]
        by_number = {t.number: t for t in asked}
        done = []
        try:
            for t in self.render_all(items, should_stop):
                t.score = self.objective(t.images, [p for p in self.spec.prompts for _ in self.spec.seeds])
                trial = by_number.pop(t.number)
                if t.merge_id is not None:
                    trial.set_user_attr("merge_id", t.merge_id)
                self.study.tell(trial, t.score)
                done.append(t)
        except MergeStopped:                   # Stop on a worker pool: the finished trials count
            self.stopped = True
        finally:
            for trial in by_number.values():   # not rendered (an error, or Stop): failed, not left RUNNING
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return done

    def run(self, n: int | None = None, progress: Callable | None = None,
            should_stop: Callable[[], bool] | None = None) -> list[Trial]:
        """Run up to ``n`` more trials (default: until the spec's budget is used); Stop ends
        after the current trial (with a worker pool: the current batch's finished trials are
        kept, the others cancelled). With a pool, trials are asked in batches of one per worker."""
        if self.objective is None:
            raise MergeError("the eye objective runs in rounds: candidates() then prefer()")
        todo = max(0, self.spec.trials - len(self.finished()) if n is None else n)
        pool = getattr(self.ws, "pool", None)
        width = len(pool.actors) if pool is not None else 1
        out: list[Trial] = []
        self.stopped = False
        while len(out) < todo and not self.stopped:
            if should_stop is not None and should_stop():
                break
            for t in self._batch(min(width, todo - len(out)), should_stop):
                out.append(t)
                if progress:
                    progress(len(out), todo, t)
        return out

    def best(self) -> Trial | None:
        """The best finished trial (for the eye: the current favourite), re-rendered."""
        if self.objective is None:
            best = self.study.best_trials
            if not best:
                return None
            t = best[-1]
            return self._images.get(t.number) or Trial(t.number, t.params, recipe_for(t.params, self.spec.recipe,
                                                                                     self.arch), None, [])
        if not self.finished():
            return None
        t = self.study.best_trial
        return Trial(t.number, t.params, recipe_for(t.params, self.spec.recipe, self.arch),
                     t.user_attrs.get("merge_id"), [], t.value)

    def scores(self) -> list[tuple[int, float]]:
        return [(t.number, t.value) for t in self.finished()]

    def importances(self) -> dict[str, float]:
        """Optuna's parameter importances (fANOVA) once there are a few finished trials."""
        import optuna
        if self.objective is None or len(self.finished()) < 4 or len(self.finished()[0].params) < 2:
            return {}
        return optuna.importance.get_param_importances(self.study)

    # ------------------------------------------------------------------ the eye
    def _active(self) -> list:
        from optuna_dashboard.preferential._system_attrs import get_preferences, get_skipped_trial_ids
        import optuna
        attrs = self.study._study._storage.get_study_system_attrs(self.study._study._study_id)
        worse = {w for _, w in get_preferences(attrs)}
        skipped = set(get_skipped_trial_ids(attrs))
        return [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                        optuna.trial.TrialState.RUNNING))
                if t.number not in worse and t._trial_id not in skipped]

    def candidates(self, progress: Callable | None = None) -> list[Trial]:
        """This round's batch: the favourite so far and new proposals, each rendered (a
        restarted search re-renders the batch it was showing)."""
        while self.study.should_generate():
            trial = self.study.ask()
            suggest(trial, self.spec.space, self.arch)
        batch = sorted(self._active(), key=lambda t: t.number)
        todo = [(t.number, t.params) for t in batch if t.number not in self._images]
        for i, t in enumerate(self.render_all(todo)):
            self._images[t.number] = t
            if progress:
                progress(len(batch) - len(todo) + i + 1, len(batch), t)
        return [self._images[t.number] for t in batch]

    def prefer(self, best: int, ranking: list[int] | None = None) -> None:
        """The user's verdict on the current batch: trial ``best`` beats the others; with
        ``ranking`` (trial numbers, best first) each ranked trial beats every one after it
        and every unranked one (which are not compared among themselves)."""
        active = {t.number: t for t in self._active()}
        ranked = list(dict.fromkeys([best] + list(ranking or [])))
        for n in ranked:
            if n not in active:
                raise MergeError(f"trial {n} is not in the current batch")
        rest = [n for n in sorted(active) if n not in ranked]
        for i, n in enumerate(ranked):
            worse = [active[m] for m in ranked[i + 1:] + rest]
            if worse:
                self.study.report_preference(better_trials=active[n], worse_trials=worse)
        for n in ranked[1:] + rest:
            self._images.pop(n, None)
