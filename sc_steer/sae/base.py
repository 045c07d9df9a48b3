"""The SAE interface shared by every architecture, and its files in the SAELens v6 layout.

    f     = act(W_enc^T (x - b_dec) + b_enc)        encode
    x_hat = W_dec^T f + b_dec                        decode

Weights are stored as SAELens does: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` (+ ``threshold [d_sae]`` for JumpReLU-style inference). Saved SAEs take raw model
activations: the normalisation used while training is folded into the weights (see ``fold_input_scale``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ScSteerError
from ..files import atomic_write, atomic_write_text, make_dir, to_json
from .batch import WHOLE, WholeBatch

ARCHITECTURES: dict[str, type[SAE]] = {}


@dataclass
class StepInputs:
    """What a training step hands an SAE's ``train_forward`` and ``loss`` besides the batch: the loss
    coefficients of this site's config, the sparsity warm-up, the dead latents AuxK trains, and the
    whole batch's quantities (``sae/batch.py``). Each architecture reads the fields it uses."""

    sparsity_scale: float = 1.0          # the sparsity penalty's warm-up factor, 0..1
    l1_coeff: float = 0.0                # ReLU + L1
    l0_coeff: float = 0.0                # JumpReLU
    aux_coeff: float = 0.0               # AuxK (TopK, BatchTopK); 0: no AuxK
    batchtopk_l1: float = 0.0            # BatchTopK's L1 on the kept activations
    k_aux: int = 0                       # AuxK: latents per token, at most
    dead: torch.Tensor | None = None     # [d_sae] bool: latents that have not fired for the dead window
    n_dead: int = 0                      # ``dead.sum()`` read on the host: it sizes AuxK's selection
    batch: WholeBatch = WHOLE            # the whole batch, in one process or split over ranks

    @property
    def n_aux(self) -> int:
        """How many dead latents AuxK uses this step (0: no AuxK)."""
        return min(self.k_aux, self.n_dead) if self.aux_coeff > 0 else 0


@dataclass
class TrainOut:
    """What one training forward pass produces. ``f`` is the dense code when the architecture makes one;
    ``counts`` is how many tokens of the batch each latent fired on."""

    x_hat: torch.Tensor
    pre: torch.Tensor
    counts: torch.Tensor
    f: torch.Tensor | None = None
    aux: torch.Tensor | None = None    # AuxK's reconstruction of the residual (TopK, BatchTopK)


CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"


@dataclass
class SAEConfig:
    """Shape and provenance of one SAE. Training hyperparameters live in ``sae.train.TrainConfig``."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None               # TopK / BatchTopK: active latents per token
    site: str | None = None            # sc-steer site, e.g. "resid_post.2"
    hook_module: str | None = None     # the nnsight / torch module path of the site
    model_name: str | None = None
    context_size: int | None = None
    prepend_bos: bool = True
    dataset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ScSteerError(f"unknown SAE architecture {self.architecture!r}: expected one of "
                               f"{', '.join(sorted(ARCHITECTURES))}")
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ScSteerError(f"{name} {v!r}: expected an integer >= 1")
        if ARCHITECTURES[self.architecture].uses_k:
            if not isinstance(self.k, int) or self.k < 1:
                raise ScSteerError(f"k {self.k!r}: {self.architecture} needs an integer k >= 1")
            if self.k > self.d_sae:
                raise ScSteerError(f"k {self.k} is larger than d_sae {self.d_sae}")

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        """The config of a saved SAE (cfg.json's ``sc_steer`` block); keys it does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class SAE(nn.Module):
    """Base class: parameters, encode/decode, decoder-norm constraint, folding and saving."""

    # what an architecture is and can do, asked of the class (never of its name)
    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str]  # its name in SAELens's cfg.json
    uses_k: ClassVar[bool] = False       # a fixed number of active latents per token (cfg.k)
    uses_auxk: ClassVar[bool] = False    # dead latents trained by AuxK
    has_threshold: ClassVar[bool] = False  # a ``threshold`` tensor in its files
    calibrates: ClassVar[bool] = False   # wants end-of-run batches (``calibrate``)
    trainable: ClassVar[bool] = True     # sc-steer trains it (else: loaded from other tools' files only)
    resamples: ClassVar[bool] = True     # dead and duplicated latents re-initialised by default (sae/resample.py)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "architecture" in cls.__dict__:
            ARCHITECTURES[cls.architecture] = cls

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        w = torch.randn(d_sae, d_in)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("W_skip", None)     # [d_in, d_in]: a linear skip connection (sparsify)

    # -- the maps ------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc``, written so that b_dec's gradient costs a vector-matrix product
        instead of a second [batch, d_in] x [d_in, d_sae] matmul. One ``addmm``: under autocast the bias
        is added in the GEMM and the ``[batch, d_sae]`` result stays bf16 (a separate fp32 bias add
        would promote it, doubling the bytes of every later pass over it)."""
        flat = x.reshape(-1, x.shape[-1]).to(self.W_enc.dtype)
        pre = torch.addmm(self.b_enc - self.b_dec @ self.W_enc, flat, self.W_enc)
        return pre.reshape(*x.shape[:-1], pre.shape[-1])

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Inference-time activation function (per token, deterministic)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
        """``x_hat``: the decoded features (``f``, or encoded from ``x``), plus ``x W_skip^T`` where the
        SAE has a skip connection. Feature edits act on ``f`` and ``W_dec`` alone; the skip term is
        part of the reconstruction, not of any feature."""
        x_hat = self.decode(self.encode(x) if f is None else f)
        if self.W_skip is not None:
            x_hat = x_hat + x.to(self.W_skip.dtype) @ self.W_skip.T
        return x_hat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    # -- training hooks (overridden per architecture) --------------------------------------------
    def train_encode(self, pre: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Training-time activation; differs from ``activate`` for BatchTopK and JumpReLU (gradients)."""
        return self.activate(pre)

    def train_forward(self, x: torch.Tensor, inputs: StepInputs) -> TrainOut:
        """One training forward pass. The default is dense; TopK overrides it with a sparse one."""
        pre = self.pre_acts(x)
        f = self.train_encode(pre, inputs)
        return TrainOut(x_hat=self.decode(f), pre=pre, counts=torch.count_nonzero(f.detach(), dim=0), f=f)

    def loss(self, x: torch.Tensor, out: TrainOut, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts (detached 0-d tensors: read on the host only when logged)."""
        raise NotImplementedError

    def set_training_options(self, scfg: Any, fresh: bool) -> None:
        """Architecture-specific training settings from ``SAETrainConfig`` (``fresh``: not a resume)."""

    def after_step(self, out: TrainOut, inputs: StepInputs) -> None:
        """Per-step state updates that are not gradients (e.g. BatchTopK's threshold EMA)."""

    def calibrate(self, xs: list[torch.Tensor], batch: WholeBatch = WHOLE) -> None:
        """End-of-run adjustment from batches ``xs`` (in training units) the last step did not see, with
        ``batch`` (``sae/batch.py``) joining slices in data-parallel runs; most architectures need none
        (BatchTopK sets its inference threshold here)."""

    # -- constraints -----------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each (unit) decoder row, so a step cannot grow its norm."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=-1)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str = "geometric_median", batch: WholeBatch = WHOLE) -> None:
        """b_dec from a sample of inputs (``batch``, from ``sae/batch.py``, joins a sample split over ranks)."""
        if method == "mean":
            self.b_dec.copy_(batch.total(sample.sum(0)) / batch.total(sample.new_tensor(float(len(sample)))))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(sample.float(), batch=batch))
        elif method != "zeros":
            raise ScSteerError(f"b_dec init {method!r}: expected geometric_median, mean or zeros")

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Make an SAE trained on ``s * x`` take raw ``x``, with feature values in raw units.

        ReLU-like activations are positively homogeneous, so dividing every bias (and threshold) by
        ``s`` gives ``f_raw = f / s`` and ``x_hat_raw = x_hat / s`` while decoder rows stay unit norm.
        """
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        for t in self.thresholds():
            t.div_(s)

    def thresholds(self) -> list[torch.Tensor]:
        """Tensors in activation units that must be rescaled with the input."""
        return []

    # -- files -----------------------------------------------------------------------------------
    def state_for_saving(self) -> dict[str, torch.Tensor]:
        keys = ("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if self.W_skip is not None else ())
        return {k: self._save_tensor(k) for k in keys}

    def _save_tensor(self, key: str) -> torch.Tensor:
        return getattr(self, key).detach().float().contiguous().cpu()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self, k).copy_(tensors[k])
        if "W_skip" in tensors:
            self.W_skip = tensors["W_skip"].detach().float().to(self.W_dec.device).contiguous()

    def saelens_cfg(self) -> dict:
        c = self.cfg
        cfg = {"architecture": self.saelens_architecture, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none",
               "metadata": {"model_name": c.model_name, "hook_name": c.hook_module, "context_size": c.context_size,
                            "prepend_bos": c.prepend_bos, "dataset_path": c.dataset,
                            "exclude_special_tokens": True, "sae_lens_version": "6.0.0",
                            "sae_lens_training_version": "6.0.0"},
               "sc_steer": asdict(c)}
        if c.k is not None and self.uses_k and not self.has_threshold:   # SAELens's topk: a k, no threshold
            cfg["k"] = c.k
        return cfg

    def save(self, path: str | Path, log_firing_freq: torch.Tensor | None = None) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``) atomically."""
        path = Path(path)
        make_dir(path, "SAE folder")
        atomic_write(path / WEIGHTS_FILE, lambda p: save_file(self.state_for_saving(), str(p)))
        if log_firing_freq is not None:
            atomic_write(path / SPARSITY_FILE, lambda p: save_file({"sparsity": log_firing_freq.float().cpu()}, str(p)))
        atomic_write_text(path / CFG_FILE, to_json(self.saelens_cfg(), indent=1))
        return path

    def extra_repr(self) -> str:
        return f"{self.architecture}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, k={self.cfg.k}"


def make_sae(cfg: SAEConfig) -> SAE:
    return ARCHITECTURES[cfg.architecture](cfg)


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6, batch: WholeBatch = WHOLE) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x.

    With a ``ShardedBatch`` (``sae/batch.py``), x is this rank's part of the points: each iteration's
    two sums are taken over all ranks, so every rank reaches the median of the union."""
    total = batch.total
    y = total(x.sum(0)) / total(x.new_tensor(float(len(x))))
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = total((w[:, None] * x).sum(0)) / total(w.sum())
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y
