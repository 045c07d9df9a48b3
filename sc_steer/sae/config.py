"""Training configuration: defaults, per-site overrides, TOML/YAML files, and strict validation."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ScSteerError
from .base import ARCHITECTURES


@dataclass
class SAETrainConfig:
    """Hyperparameters of one SAE (one site). Any of them can be overridden per site."""

    architecture: str = "topk"
    expansion: int = 8                 # d_sae = expansion * d_in, unless d_sae is given
    d_sae: int | None = None
    k: int | None = 32                 # TopK / BatchTopK
    l1_coeff: float = 5.0              # ReLU + L1
    l0_coeff: float = 0.2              # JumpReLU
    jumprelu_threshold: float = 1.0    # JumpReLU: initial threshold (in normalised units, |x| ~ sqrt(d_in))
    jumprelu_bandwidth: float = 0.5    # JumpReLU: width of the straight-through kernel
    aux_coeff: float = 1 / 32          # AuxK (TopK / BatchTopK)
    k_aux: int | None = None           # default d_in // 2
    lr: float | None = None            # default 2e-4 / sqrt(d_sae / 2**14)
    sparsity_warmup: float = 0.05      # fraction of steps over which lambda ramps up
    b_dec_init: str = "geometric_median"
    tied_init: bool = True             # W_enc = W_dec^T at initialisation

    def resolved_d_sae(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in

    def resolved_lr(self, d_in: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.resolved_d_sae(d_in) / 2 ** 14)

    def check(self, where: str = "sae") -> None:
        if self.architecture not in ARCHITECTURES:
            raise ScSteerError(f"{where}.architecture {self.architecture!r}: expected one of "
                               f"{', '.join(sorted(ARCHITECTURES))}")
        if self.d_sae is not None and (not isinstance(self.d_sae, int) or self.d_sae < 1):
            raise ScSteerError(f"{where}.d_sae {self.d_sae!r}: expected an integer >= 1")
        if not isinstance(self.expansion, int) or self.expansion < 1:
            raise ScSteerError(f"{where}.expansion {self.expansion!r}: expected an integer >= 1")
        if ARCHITECTURES[self.architecture].needs_k and (not isinstance(self.k, int) or self.k < 1):
            raise ScSteerError(f"{where}.k {self.k!r}: {self.architecture} needs an integer k >= 1")
        for name in ("jumprelu_threshold", "jumprelu_bandwidth"):
            if not getattr(self, name) > 0:
                raise ScSteerError(f"{where}.{name} {getattr(self, name)!r}: expected a positive number")
        for name in ("l1_coeff", "l0_coeff", "aux_coeff"):
            if getattr(self, name) < 0:
                raise ScSteerError(f"{where}.{name} {getattr(self, name)!r}: expected a value >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ScSteerError(f"{where}.lr {self.lr!r}: expected a positive number")
        if not 0 <= self.sparsity_warmup <= 1:
            raise ScSteerError(f"{where}.sparsity_warmup {self.sparsity_warmup!r}: expected a fraction in [0, 1]")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ScSteerError(f"{where}.b_dec_init {self.b_dec_init!r}: expected geometric_median, mean or zeros")


@dataclass
class TrainConfig:
    """A multi-site training run: shared schedule and data settings, per-site SAE hyperparameters."""

    sites: list[str] = field(default_factory=lambda: ["resid_post.*"])
    batch_size: int = 4096
    tokens: int = 2_000_000            # training tokens seen by each SAE
    seed: int = 0
    lr_warmup: float = 0.05            # fraction of steps (at most 1,000 steps)
    lr_decay: float = 0.2              # final fraction of steps with linear decay to 0
    grad_clip: float = 1.0
    dead_tokens: int | None = None     # a latent is dead after this many tokens without firing
    checkpoint_every: int = 200        # steps
    log_every: int = 10                # steps
    autocast: bool = False             # bf16 autocast for the SAE matmuls (GPU); weights stay fp32
    sae: SAETrainConfig = field(default_factory=SAETrainConfig)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-site overrides of `sae`

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def resolved_dead_tokens(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else min(10_000_000, max(self.tokens // 5, 1))

    def for_site(self, site: str) -> SAETrainConfig:
        over = self.layers.get(site, {})
        return replace(self.sae, **over)

    def check(self) -> None:
        for name in ("batch_size", "tokens", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ScSteerError(f"{name} {v!r}: expected an integer >= 1")
        if self.tokens < self.batch_size:
            raise ScSteerError(f"tokens {self.tokens} is less than one batch ({self.batch_size})")
        for name in ("lr_warmup", "lr_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ScSteerError(f"{name} {getattr(self, name)!r}: expected a fraction in [0, 1)")
        self.sae.check()
        for site, over in self.layers.items():
            unknown = set(over) - {f.name for f in fields(SAETrainConfig)}
            if unknown:
                raise ScSteerError(f"unknown key(s) in layers.{site}: {', '.join(sorted(unknown))}")
            self.for_site(site).check(f"layers.{site}")

    def to_dict(self) -> dict:
        return asdict(self)


def config_from_dict(d: dict, where: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts; unknown keys are errors naming the key."""
    top = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - top
    if unknown:
        raise ScSteerError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(top))})")
    d = dict(d)
    sae = d.pop("sae", {}) or {}
    if not isinstance(sae, dict):
        raise ScSteerError(f"{where}: 'sae' must be a table of SAE hyperparameters")
    sae_known = {f.name for f in fields(SAETrainConfig)}
    bad = set(sae) - sae_known
    if bad:
        raise ScSteerError(f"unknown key(s) in {where} [sae]: {', '.join(sorted(bad))} "
                           f"(known: {', '.join(sorted(sae_known))})")
    if isinstance(d.get("sites"), str):
        d["sites"] = [s.strip() for s in d["sites"].split(",")]
    cfg = TrainConfig(**d, sae=SAETrainConfig(**sae))
    cfg.check()
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` training config."""
    path = Path(path)
    if not path.exists():
        raise ScSteerError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            d = json.loads(text)
        else:
            raise ScSteerError(f"config file {str(path)!r}: expected .toml, .yaml, .yml or .json")
    except ScSteerError:
        raise
    except Exception as e:  # noqa: BLE001 - parser errors of three libraries
        raise ScSteerError(f"config file {str(path)!r} does not parse: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ScSteerError(f"config file {str(path)!r}: expected a table of settings at the top level")
    return config_from_dict(d, where=str(path))
