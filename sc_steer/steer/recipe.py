"""A steering recipe: interventions (site, feature or raw vector, mode, coefficient, positions), checked
against a model and its SAEs, and saved as JSON that ``sc-steer steer --recipe`` and the playground
replay."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import validate
from ..errors import ScSteerError
from ..files import atomic_write_text, parse_json
from ..models import LM
from ..sae import SAE
from ..sites import Site

# mode -> (what its coefficient is, or None where it takes none; what it does), the formulas: sc_steer/edits.py
MODE_DOCS = {
    "add": ("COEFF", "add COEFF x the feature's unit decoder direction"),
    "remove": (None, "error-preserving ablation of the feature, recomputed at every step"),
    "clamp": ("VALUE", "set the feature to VALUE"),
    "scale": ("FACTOR", "multiply the feature by FACTOR"),
}
MODES = tuple(MODE_DOCS)
MAX_COEFF = 1e4   # |coefficient| beyond this only overflows the residual stream
POSITIONS = ("all", "prompt", "generated", "last")


@dataclass
class Intervention:
    site: str
    feature: int | None = None
    mode: str = "add"
    coeff: float = 1.0
    positions: str = "all"
    vector: list | None = None      # raw direction [d] or ActAdd sequence [L, d] instead of a feature
    include_bos: bool = False       # also edit the BOS position (left alone by default)

    def check(self, lm: LM, saes: dict[str, SAE]) -> None:
        validate.text("intervention site", self.site)
        width = lm.width(Site.parse(self.site, lm.n_layers))
        validate.choice("intervention mode", self.mode, MODES)
        validate.choice("positions", self.positions, POSITIONS)
        validate.number(f"coefficient ({self.mode} at {self.site})", self.coeff, -MAX_COEFF, MAX_COEFF)
        validate.boolean("include_bos", self.include_bos)
        if (self.feature is None) == (self.vector is None):
            raise ScSteerError(f"intervention at {self.site}: give exactly one of feature= or vector=")
        if self.vector is not None:
            try:
                v = torch.as_tensor(self.vector, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ScSteerError(f"vector at {self.site}: expected a list of numbers (or a list of such lists)") from None
            if v.dim() not in (1, 2) or v.shape[-1] != width or not len(v):
                raise ScSteerError(f"vector at {self.site}: expected shape [{width}] or [L, {width}], "
                                   f"got {list(v.shape)}")
            if self.mode != "add":
                raise ScSteerError("a raw vector can only be added (mode='add')")
            if not torch.isfinite(v).all():
                raise ScSteerError(f"vector at {self.site}: holds NaN or infinite values")
            return
        if self.site not in saes:
            raise ScSteerError(f"no SAE for {self.site} (have: {', '.join(saes) or 'none'})")
        lm.check_sae(Site.parse(self.site, lm.n_layers), saes[self.site])
        d_sae = saes[self.site].cfg.d_sae
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or not 0 <= self.feature < d_sae:
            raise ScSteerError(f"feature id {self.feature!r} is out of range for {self.site} (0-{d_sae - 1})")


@dataclass
class Recipe:
    interventions: list[Intervention] = field(default_factory=list)
    name: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """A recipe from its JSON: ``{"interventions": [{...}, ...], "name": "..."}``; every shape error
        is one line that says where (the values themselves are checked by ``Intervention.check``)."""
        d = parse_json(text, "recipe", dict, 'with a list "interventions"')
        if not isinstance(d.get("interventions", []), list):
            raise ScSteerError(f"recipe: \"interventions\" is {type(d['interventions']).__name__}, expected a list")
        known = set(Intervention.__dataclass_fields__)
        items = []
        for i, x in enumerate(d.get("interventions", [])):
            if not isinstance(x, dict):
                raise ScSteerError(f"recipe: intervention {i} is {type(x).__name__}, expected a JSON object")
            unknown = set(x) - known
            if unknown:
                raise ScSteerError(f"recipe: unknown intervention key(s) {', '.join(sorted(unknown))}")
            if "site" not in x:
                raise ScSteerError(f"recipe: intervention {i} names no site")
            items.append(Intervention(**x))
        name = d.get("name", "")
        if not isinstance(name, str):
            raise ScSteerError(f"recipe: name {name!r}: expected a string")
        return cls(items, name)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        if not Path(path).exists():
            raise ScSteerError(f"recipe file {str(path)!r} does not exist")
        return cls.from_json(Path(path).read_text())
