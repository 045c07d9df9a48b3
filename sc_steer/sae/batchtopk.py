"""BatchTopK: while training, keep the top ``k * batch`` activations over the whole batch.

The number of active latents then varies per token (mean k). For inference, a single threshold
turns it into a per-token JumpReLU, so encoding one token does not depend on the rest of the batch.
While training the threshold is an EMA of the smallest activation kept in each batch (it lags the
weights on short runs); at the end of a run ``calibrate`` sets it from batches drawn after the last
step so that the inference L0 is k. Saved for SAELens as "jumprelu" with the threshold repeated per
latent.

Loss = FVU + AuxK (as TopK) + ``batchtopk_l1`` * (mean over tokens of the sum of the kept
activations) / (sqrt(k) * RMS norm of the inputs about their mean), ramped up over the sparsity
warm-up. The divisor is the L1 of k equal features making up a token of RMS norm, so the term is
about 1 whatever k and the units. Why the L1 term: the batch-wide cut has to fill k * batch slots,
so it falls into the band of weak interference activations (a latent whose encoder leans on another
feature's direction). On the samples of a rare feature those weak activations are kept, and the rare
latent's decoder row learns to cancel them instead of pointing along its feature. A small L1 makes a
weak activation cost more than it buys (what it does to recovery and to the demo's SAEs:
``bench/toy_recovery_results.md``). With unit decoder rows it is the norm-weighted L1.
"""
from __future__ import annotations

import math

import torch

from . import sparse
from .base import SAE, StepInputs, TrainOut
from .batch import WHOLE, WholeBatch
from .topk import dead_topk, fvu_and_auxk


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    uses_k = True
    uses_auxk = True
    has_threshold = True
    calibrates = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated
        self.ema = 0.99

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.clamp_min(0)).to(pre.dtype)

    def train_encode(self, pre: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        batch = inputs.batch
        return batch.keep_top(torch.relu(pre), self.cfg.k * batch.rows(pre.shape[0]))

    def train_forward(self, x: torch.Tensor, inputs: StepInputs) -> TrainOut:
        out = super().train_forward(x, inputs)
        n_aux = inputs.n_aux
        if n_aux:
            idx = dead_topk(out.pre, inputs.dead, n_aux)
            vals = torch.relu(out.pre.gather(1, idx)) * inputs.dead[idx]
            decode = sparse.autograd_decode if sparse.kernels(x.device) == "autograd" else sparse.decode
            out.aux = decode(idx, vals, self.W_dec)
        return out

    @torch.no_grad()
    def after_step(self, out, inputs: StepInputs) -> None:
        """EMA of the smallest kept activation, on the device (no host sync); a batch with none kept
        leaves the threshold as it was."""
        f = out.f
        m = inputs.batch.smallest(torch.where(f > 0, f, torch.full_like(f, float("inf"))).min().float())
        new = torch.where(self.threshold < 0, m, self.ema * self.threshold + (1 - self.ema) * m)
        self.threshold.copy_(torch.where(torch.isfinite(m), new, self.threshold))

    @torch.no_grad()
    def calibrate(self, xs: list[torch.Tensor], batch: WholeBatch = WHOLE) -> None:
        """Threshold = mean over the batches ``xs`` of the (k * batch)-th largest activation of each:
        the value BatchTopK itself would have cut at, so inference keeps k latents per token on average."""
        cuts = [batch.cut(torch.relu(self.pre_acts(x)), self.cfg.k * batch.rows(x.shape[0])) for x in xs]
        self.threshold.copy_(torch.stack(cuts).mean())

    def loss(self, x, out, inputs):
        batch = inputs.batch
        energy = batch.centered_energy(x)
        total, parts = fvu_and_auxk(x, out.x_hat, out.aux, inputs.aux_coeff, batch, energy)
        coeff = inputs.batchtopk_l1 * inputs.sparsity_scale
        if coeff > 0:
            rms = (energy / batch.rows(x.shape[0])).sqrt().clamp_min(1e-8)
            l1 = batch.mean_rows(out.f.sum(-1)) / (rms * math.sqrt(self.cfg.k))
            total = total + coeff * l1
            parts["l1"] = l1.detach()
        return total, parts

    def thresholds(self):
        return [self.threshold]

    def state_for_saving(self):
        state = super().state_for_saving()
        state["threshold"] = self.threshold.clamp_min(0).expand(self.cfg.d_sae).float().contiguous().cpu()
        return state

    def load_state(self, tensors):
        super().load_state(tensors)
        with torch.no_grad():
            self.threshold.copy_(tensors["threshold"].float().max())
