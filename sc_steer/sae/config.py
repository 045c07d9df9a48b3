"""Training configuration: defaults, per-site overrides, TOML/YAML files, and strict validation."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .. import validate
from ..devices import check_fits
from ..errors import ScSteerError
from .base import ARCHITECTURES


@dataclass
class SAETrainConfig:
    """Hyperparameters of one SAE (one site). Any of them can be overridden per site."""

    architecture: str = "topk"
    expansion: int = 8                 # d_sae = expansion * d_in, unless d_sae is given
    d_sae: int | None = None
    k: int | None = 32                 # TopK / BatchTopK
    l1_coeff: float = 1.0              # ReLU + L1; bench/toy_recovery_results.md (with resampling)
    l0_coeff: float = 0.4              # JumpReLU; bench/toy_recovery_results.md
    jumprelu_threshold: float = 1.0    # JumpReLU: initial threshold (in normalised units, |x| ~ sqrt(d_in))
    jumprelu_bandwidth: float = 0.5    # JumpReLU: width of the straight-through kernel
    aux_coeff: float = 1 / 8           # AuxK (TopK / BatchTopK); bench/toy_recovery_results.md
    batchtopk_l1: float = 0.1          # BatchTopK: L1 on the kept activations (sae/batchtopk.py)
    k_aux: int | None = None           # default d_in // 2
    lr: float | None = None            # default 4e-4 / sqrt(d_sae / 2**14)
    sparsity_warmup: float = 0.05      # fraction of steps over which lambda ramps up
    b_dec_init: str = "geometric_median"
    tied_init: bool = True             # W_enc = W_dec^T at initialisation
    resample: bool | None = None       # re-initialise dead and duplicated latents (sae/resample.py);
                                       # None: the architecture's default (off for TopK only)

    def resolved_d_sae(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in

    def resolved_lr(self, d_in: int) -> float:
        # twice sparsify's 2e-4 / sqrt(n / 2^14) (the comparison: bench/toy_recovery_results.md)
        return self.lr if self.lr is not None else 4e-4 / math.sqrt(self.resolved_d_sae(d_in) / 2 ** 14)

    def resolved_resample(self) -> bool:
        return self.resample if self.resample is not None else ARCHITECTURES[self.architecture].resamples

    def check(self, where: str = "sae") -> None:
        v = validate
        v.choice(f"{where}.architecture", self.architecture, sorted(a for a, c in ARCHITECTURES.items() if c.trainable))
        v.integer(f"{where}.expansion", self.expansion, 1)
        if self.d_sae is not None:
            v.integer(f"{where}.d_sae", self.d_sae, 1)
        if ARCHITECTURES[self.architecture].uses_k or self.k is not None:
            v.integer(f"{where}.k", self.k, 1)
        if self.k_aux is not None:
            v.integer(f"{where}.k_aux", self.k_aux, 1)
        for name in ("jumprelu_threshold", "jumprelu_bandwidth"):
            v.number(f"{where}.{name}", getattr(self, name), 0, lo_open=True)
        for name in ("l1_coeff", "l0_coeff", "aux_coeff", "batchtopk_l1"):
            v.number(f"{where}.{name}", getattr(self, name), 0)
        if self.lr is not None:
            v.number(f"{where}.lr", self.lr, 0, lo_open=True)
        v.number(f"{where}.sparsity_warmup", self.sparsity_warmup, 0, 1)
        v.choice(f"{where}.b_dec_init", self.b_dec_init, ("geometric_median", "mean", "zeros"))
        v.boolean(f"{where}.tied_init", self.tied_init)
        if self.resample is not None:
            v.boolean(f"{where}.resample", self.resample)


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
    dead_tokens: int | None = None     # a latent is dead (AuxK trains it) after this many tokens without firing
    resample_tokens: int | None = None # resampling rounds this many tokens apart, of latents silent as long
    checkpoint_every: int = 200        # steps
    log_every: int = 10                # steps
    autocast: bool = False             # bf16 autocast for the SAE matmuls (GPU); weights stay fp32
    sae: SAETrainConfig = field(default_factory=SAETrainConfig)
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides of `sae`, by site name

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def resolved_dead_tokens(self) -> int:
        """A latent is dead after a thousandth of the run (at most 10 M tokens) without firing; the
        measurements behind the share are in bench/toy_recovery_results.md."""
        return self.dead_tokens if self.dead_tokens is not None else self._share_of_run(1000)

    def resolved_resample_tokens(self) -> int:
        """Resampling rounds a two-hundredth of the run apart (at most 10 M tokens)."""
        return self.resample_tokens if self.resample_tokens is not None else self._share_of_run(200)

    def _share_of_run(self, parts: int) -> int:
        """``tokens / parts``, at least 1 and at most 10 M tokens."""
        return min(10_000_000, max(self.tokens // parts, 1))

    def for_site(self, site: str) -> SAETrainConfig:
        over = self.per_site.get(site, {}) if isinstance(self.per_site, dict) else {}
        return replace(self.sae, **over)

    def check(self, per_site_key: str = "per_site") -> None:
        """Every field against its type and range; ``per_site_key`` is the name the user gave the
        per-site table (messages name it as written)."""
        v = validate
        v.strings("sites", self.sites)
        for name in ("batch_size", "tokens", "checkpoint_every", "log_every"):
            v.integer(name, getattr(self, name), 1)
        v.seed("seed", self.seed)
        if self.tokens < self.batch_size:
            raise ScSteerError(f"tokens {self.tokens} is less than one batch ({self.batch_size})")
        for name in ("lr_warmup", "lr_decay"):
            v.number(name, getattr(self, name), 0, 1, hi_open=True)
        v.number("grad_clip", self.grad_clip, 0, lo_open=True)
        for name in ("dead_tokens", "resample_tokens"):
            if getattr(self, name) is not None:
                v.integer(name, getattr(self, name), 1)
        v.boolean("autocast", self.autocast)
        self.sae.check()
        v.table(per_site_key, self.per_site)
        for site, over in self.per_site.items():
            v.table(f"{per_site_key}.{site}", over)
            unknown = set(over) - {f.name for f in fields(SAETrainConfig)}
            if unknown:
                raise ScSteerError(f"unknown key(s) in {per_site_key}.{site}: {', '.join(sorted(unknown))}")
            self.for_site(site).check(f"{per_site_key}.{site}")

    def check_widths(self, widths: dict[str, int], device: str | torch.device = "cpu") -> None:
        """Each site's SAE shape (d_sae from the expansion, k <= d_sae), and that the run's SAEs fit in the
        memory of ``device`` at all, before any file is written."""
        from .base import SAEConfig

        need = 0
        for site, d_in in widths.items():
            scfg = self.for_site(site)
            d_sae = scfg.resolved_d_sae(d_in)
            SAEConfig(architecture=scfg.architecture, d_in=d_in, d_sae=d_sae,
                      k=scfg.k if ARCHITECTURES[scfg.architecture].uses_k else None, site=site)
            # fp32 weights, gradients and Adam's two moments, and a few [batch, d_sae] tensors per step
            need += 4 * (4 * (2 * d_sae * d_in + d_sae + d_in) + 3 * self.batch_size * d_sae)
        check_fits(need, f"training {len(widths)} SAE(s) with batch size {self.batch_size:,}", device)

    def to_dict(self) -> dict:
        return asdict(self)


LEGACY_KEYS = {"layers": "per_site"}   # names a key had before; a config file may still use them


def config_from_dict(d: dict, where: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts; unknown keys are errors naming the key."""
    top = {f.name for f in fields(TrainConfig)}
    for old, new in LEGACY_KEYS.items():
        if old in d and new in d:
            raise ScSteerError(f"{where}: give {new} or its old name {old}, not both")
    per_site_key = next((old for old in LEGACY_KEYS if old in d), "per_site")
    d = {LEGACY_KEYS.get(k, k): v for k, v in d.items()}
    unknown = set(d) - top
    if unknown:
        raise ScSteerError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(top))})")
    sae = d.pop("sae", {}) or {}
    if not isinstance(sae, dict):
        raise ScSteerError(f"{where}: 'sae' must be a table of SAE hyperparameters")
    sae_known = {f.name for f in fields(SAETrainConfig)}
    bad = set(sae) - sae_known
    if bad:
        raise ScSteerError(f"unknown key(s) in {where} [sae]: {', '.join(sorted(bad))} "
                           f"(known: {', '.join(sorted(sae_known))})")
    if "sites" in d:
        d["sites"] = validate.strings("sites", d["sites"])
    if "per_site" in d:
        for site, over in validate.table(per_site_key, d["per_site"]).items():
            validate.table(f"{per_site_key}.{site}", over)
    cfg = TrainConfig(**d, sae=SAETrainConfig(**sae))
    cfg.check(per_site_key)
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


def stored_config(d: dict) -> dict:
    """A training config dict as any version wrote it (run.json, checkpoints), in today's key names and
    JSON types, for comparing with a config of today (``per_site`` was once called ``layers``)."""
    return {LEGACY_KEYS.get(k, k): v for k, v in json.loads(json.dumps(d)).items()}
