"""A complete, serialisable description of one merge."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from .errors import MergeError

MODES = ("weight_sum", "add_difference", "triple_sum", "sum_twice")
MODE_LABELS = {"weight_sum": "Weight sum", "add_difference": "Add difference",
               "triple_sum": "Triple sum", "sum_twice": "Sum twice"}
MODE_FORMULAS = {"weight_sum": "(1-α)A + αB", "add_difference": "A + α(B-C)",
                 "triple_sum": "(1-α-β)A + αB + βC", "sum_twice": "(1-β)((1-α)A + αB) + βC"}
MODES_WITH_C = ("add_difference", "triple_sum", "sum_twice")
MODES_WITH_BETA = ("triple_sum", "sum_twice")
INEX = ("off", "include", "exclude")
FORMAT_VERSION = 1


@dataclass
class Recipe:
    """Everything needed to repeat a merge. Models are named by file name and short hash;
    ``mbw_alpha``/``mbw_beta`` (26 or 20 floats, BASE first) replace ``alpha``/``beta``."""
    model_a: str
    model_b: str = ""
    model_c: str = ""
    hash_a: str = ""
    hash_b: str = ""
    hash_c: str = ""
    mode: str = "weight_sum"
    calcmode: str = "normal"
    alpha: float = 0.5
    beta: float = 0.25
    mbw_alpha: list[float] | None = None
    mbw_beta: list[float] | None = None
    elemental: str = ""
    inex: str = "off"
    inex_blocks: list[str] = field(default_factory=list)
    inex_elements: list[str] = field(default_factory=list)
    adjust: list[float] | None = None
    gamma: float = 1.0
    seed: int = -1
    loras: str = ""                 # LoRAs merged on top: "name:ratio[:blocks], ..."
    ema: bool = False               # merge each model's EMA U-Net (model_ema.*) instead of its U-Net
    # N-model methods (merger.engine.methods): model_a is the BASE, ``models`` the fine-tunes
    method: str = ""                # "" = the merge mode above; else ties, dare_linear, ...
    models: list[str] = field(default_factory=list)
    model_hashes: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    density: float | None = None    # None: the method's default (filled in on creation)
    drop: float | None = None
    sign: str = "sum"               # TIES sign election: "sum" (paper) or "count" (sd-mecha)
    della_eps: float = 0.1
    stock: str = "tensor"           # model_stock cosine: "tensor" (paper) or "row" (sd-mecha)
    version: int = FORMAT_VERSION

    def __post_init__(self):
        """A method recipe gets concrete values for everything that changes its result: the
        method's default density/drop and, for random methods, a seed (so the row repeats)."""
        if self.method:
            from .engine.methods import REGISTRY
            m = REGISTRY.get(self.method)
            if m is not None:
                for name, value in m.defaults.items():
                    if getattr(self, name) is None:
                        setattr(self, name, value)
                if m.random and self.seed == -1:
                    import secrets
                    self.seed = secrets.randbelow(2**31)

    def uses_c(self) -> bool:
        return not self.method and self.mode in MODES_WITH_C

    def uses_b(self) -> bool:
        from .engine.calcmodes import get_calcmode
        return not self.method and get_calcmode(self.calcmode).needs_b

    def uses_beta(self) -> bool:
        """Whether β (or the MBW β vector) matters: the modes and calcmodes that use it, and
        methods with a second parameter (density or drop), which β's vector sets per block."""
        from .engine.calcmodes import get_calcmode
        if self.method:
            from .engine.methods import get_method
            return get_method(self.method).second is not None
        return self.mode in MODES_WITH_BETA or get_calcmode(self.calcmode).uses_beta

    def second_value(self) -> float:
        """The scalar β of this recipe: β for the modes, the density or drop of a method."""
        if self.method:
            from .engine.methods import get_method
            second = get_method(self.method).second
            return getattr(self, second) if second else 0.0
        return self.beta

    def slots(self) -> list[tuple[str, str, str]]:
        """(slot, file name, recorded hash) of each model this recipe reads: ``a`` (the BASE of
        a method), ``b`` and ``c`` where the mode uses them, ``m1``… for a method's models."""
        out = [("a", self.model_a, self.hash_a)]
        if self.uses_b() or (not self.method and self.model_b):
            out.append(("b", self.model_b, self.hash_b))
        if self.uses_c():
            out.append(("c", self.model_c, self.hash_c))
        if self.method:
            hashes = self.model_hashes + [""] * (len(self.models) - len(self.model_hashes))
            out += [(f"m{i}", n, h) for i, (n, h) in enumerate(zip(self.models, hashes), 1)]
        return [(s, n, h) for s, n, h in out if n]

    def to_line(self) -> str:
        """One line of JSON (no newlines), stable key order."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_line(cls, line: str) -> "Recipe":
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise MergeError(f"not a recipe line: {e}") from None
        if not isinstance(data, dict):
            raise MergeError("not a recipe line: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise MergeError(f"recipe has unknown fields: {', '.join(sorted(unknown))}")
        if "model_a" not in data:
            raise MergeError("recipe has no model_a")
        recipe = cls(**data)
        recipe.check()
        return recipe

    def check(self) -> None:
        """Validate everything that does not need the model files."""
        from .engine.calcmodes import get_calcmode
        if self.mode not in MODES:
            raise MergeError(f"unknown merge mode {self.mode!r}; choose one of {', '.join(MODES)}")
        cm = get_calcmode(self.calcmode)
        if self.method:
            from .engine.methods import check_method_recipe
            check_method_recipe(self)
        if self.mode not in cm.modes:
            raise MergeError(f"calcmode {cm.name!r} works only with "
                             f"{' / '.join(MODE_LABELS[m] for m in cm.modes)}, not {MODE_LABELS[self.mode]}")
        if not self.model_a:
            raise MergeError("model A is not selected")
        if self.uses_b() and not self.model_b:
            raise MergeError("model B is not selected")
        if self.uses_c() and not self.model_c:
            raise MergeError(f"{MODE_LABELS[self.mode]} needs model C")
        for name in ("alpha", "beta", "gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise MergeError(f"{name} must be a finite number, got {v!r}")
        for name in ("mbw_alpha", "mbw_beta", "adjust"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, list) or not all(
                    isinstance(x, (int, float)) and math.isfinite(x) for x in v)):
                raise MergeError(f"{name} must be a list of finite numbers")
        if self.adjust is not None and len(self.adjust) != 8:
            raise MergeError(f"adjust needs 8 values (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3), "
                             f"got {len(self.adjust)}")
        if self.inex not in INEX:
            raise MergeError(f"include/exclude must be one of {', '.join(INEX)}")
        if cm.check and not self.method:
            cm.check(self)
