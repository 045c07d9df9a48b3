"""TopK SAE: keep the k largest pre-activations (after ReLU), zero the rest; AuxK revives dead latents.

Loss = FVU + aux_coeff * AuxK. FVU is normalised by the batch's variance about its mean, AuxK by
the residual's: AuxK reconstructs the main model's residual error ``e = x - x_hat`` (detached) from
the top ``k_aux`` pre-activations of latents that have not fired for a while, decoded WITHOUT the
decoder bias, and its loss is ``||e_hat - e||^2 / ||e - mean(e)||^2``.

On CUDA with Triton, training is sparse end to end (``sae/sparse.py``): the dense pre-activations are
computed without autograd, the top-k (and AuxK) entries are selected, and the gradients flow through
those entries only, so besides the encoder's forward matmul every product costs batch * k * d_in
instead of batch * d_sae * d_in. Elsewhere the decoder alone is sparse (``embedding_bag``) and the
encoder's backward is the dense autograd matmul, which is faster there. Inference
(``encode``/``decode``) stays dense and simple.
"""
from __future__ import annotations

import torch

from . import sparse
from .base import SAE, StepInputs, TrainOut
from .batch import WHOLE, WholeBatch


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


def dead_topk(pre: torch.Tensor, dead: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest pre-activations among dead latents, per row. On the GPU the live ones
    are masked out (no host sync). On the CPU (where reading a count costs no sync) the dead columns are
    gathered first, so the top-k scans only them (4-10x faster when few are dead). Where fewer than
    ``k`` latents are dead the remaining indices point at live latents, which callers zero by
    ``dead[idx]``."""
    with torch.no_grad():
        if pre.device.type != "cpu":
            return pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1, sorted=False).indices
        cols = dead.nonzero().squeeze(1)
        top = cols[pre.index_select(1, cols).topk(min(k, len(cols)), dim=-1, sorted=False).indices]
        if len(cols) < k:
            live = int((~dead).nonzero()[0])
            top = torch.cat([top, top.new_full((len(top), k - len(cols)), live)], dim=1)
        return top


def fvu_and_auxk(x, x_hat, e_hat, aux_coeff: float, batch: WholeBatch = WHOLE,
                 energy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shared by TopK and BatchTopK; ``e_hat`` is the AuxK reconstruction (None: no AuxK this step);
    ``batch`` computes the whole batch's variances (``sae/batch.py``); ``energy`` is
    ``batch.centered_energy(x)`` where the caller needs it too (data-parallel: one all-reduce, not two)."""
    total_var = (batch.centered_energy(x) if energy is None else energy).clamp_min(1e-8)
    fvu = (x_hat - x).pow(2).sum() / total_var
    if e_hat is None:
        return fvu, {"fvu": fvu.detach()}
    e = (x - x_hat).detach()   # normalised by the residual's own energy, not the input's: as FVU falls,
    auxk = (e_hat.float() - e).pow(2).sum() / batch.centered_energy(e).clamp_min(1e-8)  # it keeps its pull
    return fvu + aux_coeff * auxk, {"fvu": fvu.detach(), "auxk": auxk.detach()}


class TopKSAE(SAE):
    architecture = "topk"
    saelens_architecture = "topk"
    uses_k = True
    uses_auxk = True
    resamples = False   # AuxK revives its dead latents (resampling on top: bench/toy_recovery_results.md)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu(pre, self.cfg.k)

    def train_forward(self, x: torch.Tensor, inputs: StepInputs) -> TrainOut:
        k, n_aux = self.cfg.k, inputs.n_aux
        path = sparse.kernels(x.device)
        if path == "autograd":
            pre = self.pre_acts(x)
            W_lp = None
        else:
            pre, W_lp = sparse.low_precision_pre_acts(x, self.W_enc, self.b_enc, self.b_dec)
        with torch.no_grad():
            idx = pre.topk(k, dim=-1, sorted=False).indices
            if n_aux:
                idx = torch.cat([idx, dead_topk(pre, inputs.dead, n_aux)], dim=1)
        if path == "autograd":
            sel, decode = pre.gather(1, idx), sparse.autograd_decode
        else:
            sel, decode = sparse.select(pre, idx, x, self.W_enc, self.b_enc, self.b_dec, W_lp), sparse.decode
        vals = torch.relu(sel[:, :k])
        x_hat = decode(idx[:, :k], vals, self.W_dec) + self.b_dec
        e_hat = None
        if n_aux:
            aux_idx = idx[:, k:]
            aux_vals = torch.relu(sel[:, k:]) * inputs.dead[aux_idx]  # fewer dead than n_aux: drop the rest
            e_hat = decode(aux_idx, aux_vals, self.W_dec)
        with torch.no_grad():
            counts = torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=x.device)
            counts.scatter_add_(0, idx[:, :k].reshape(-1), (vals > 0).reshape(-1).long())
        return TrainOut(x_hat=x_hat, pre=pre, counts=counts, aux=e_hat)

    def loss(self, x, out, inputs):
        return fvu_and_auxk(x, out.x_hat, out.aux, inputs.aux_coeff, inputs.batch)
