"""Train one SAE per site in one run: shared batches, per-site optimisers, checkpoints, resume.

Per step, per site: x is scaled by ``s = sqrt(d_in) / mean_norm``; loss -> backward -> remove the
gradient parallel to each decoder row -> clip -> Adam -> renormalise decoder rows. On save, ``s`` is
folded into the weights so the files take raw activations. Batches come from a ``BatchSource``
(``sae/sources.py``), the per-site state and its checkpoint from ``sae/state.py``, the log and
curves from ``sae/trainlog.py``.

Under torchrun (``sc_steer/distributed.py``) a run is split in one of two ways:

* ``parallel="layers"``: each rank trains its share of the sites (site i on rank i mod N), with its
  own checkpoint and log; the SAE files are those of a one-process run with the same seed (each
  site's initialisation is drawn from (seed, site), and every rank reads the same batches).
* ``parallel="data"``: every rank trains every SAE on its slice of each global batch; gradients,
  firing counts and the batch-wide parts of the losses (``sae/batch.py``) are summed over ranks, so
  the weights follow the one-process run on the same global batches, up to float rounding. Rank 0
  writes the checkpoint and log.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import shutil
import signal
import uuid
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from ..devices import host_memory_returned, resolve_device
from ..distributed import LOCAL, Dist, row_range, share, wait_for_ranks
from ..errors import ScSteerError
from ..files import atomic_write_text, make_dir, to_json
from ..rundir import CURVES, SAES, TRAIN_LOG
from .base import ARCHITECTURES, SAE, SAEConfig, StepInputs, make_sae
from .batch import WHOLE, ShardedBatch
from .config import SAETrainConfig, TrainConfig
from .optim import clip_gradients, lr_factor, make_optimizer
from .resample import duplicates, resample
from .sources import BatchSource, tensor_source
from .state import (
    SiteState,
    checkpoint_name,
    load_checkpoint,
    record_firing,
    save_checkpoint,
)
from .trainlog import merge_logs, plot_training_curves, rank_log_name, trim_log


def site_seed(seed: int, site: str) -> int:
    """The seed of one site's initialisation: the same whichever other sites (or ranks) share the run."""
    return (seed * 1_000_003 + zlib.crc32(site.encode())) % (1 << 63)


PARALLEL_MODES = ("layers", "data")


class Trainer:
    """Owns the SAEs of one run (this rank's share of them under ``parallel="layers"``); ``run()`` trains
    to the end (or until SIGTERM/SIGINT) and saves. ``source`` yields this rank's sites, whole batches."""

    def __init__(self, cfg: TrainConfig, source: BatchSource, out: str | Path, site_info: dict[str, dict],
                 meta: dict | None = None, device: str | torch.device = "cpu", progress: bool = True,
                 dist: Dist = LOCAL, parallel: str | None = None):
        cfg.check()
        if parallel is not None and parallel not in PARALLEL_MODES:
            raise ScSteerError(f"--parallel {parallel!r}: expected layers or data")
        self.cfg, self.source, self.out = cfg, source, Path(out)
        self.site_info, self.meta = site_info, meta or {}
        self.device, self.dist = resolve_device(device), dist
        self.parallel = parallel if dist.active else None
        self.progress = progress and dist.is_main
        self.all_sites = list(site_info)
        self.sites = share(self.all_sites, dist) if self.parallel == "layers" else self.all_sites
        self.data_parallel = self.parallel == "data"
        self.batch = ShardedBatch(dist, cfg.batch_size) if self.data_parallel else WHOLE   # whole-batch sums
        self.rows = row_range(cfg.batch_size, dist) if self.data_parallel else (0, cfg.batch_size)
        self.writes_shared = dist.is_main or self.parallel == "layers"   # checkpoint and log of its own
        self.states: dict[str, SiteState] = {}
        self.step = 0
        self._stop = False
        self.staging: Path | None = None   # where save() gathers the SAEs; chosen by rank 0 in run()

    @property
    def checkpoint_path(self) -> Path:
        return self.out / checkpoint_name(self.dist, self.parallel)

    @property
    def log_path(self) -> Path:
        return self._rank_log(self.dist.rank) if self.parallel == "layers" else self.out / TRAIN_LOG

    def _rank_log(self, rank: int) -> Path:
        return self.out / rank_log_name(rank, self.dist.world)

    def _done_marker(self, rank: int) -> Path:
        return self.out / f".done.rank{rank}-of-{self.dist.world}"

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global batch (all of it unless data-parallel)."""
        lo, hi = self.rows
        return batch if not self.data_parallel else {s: t[lo:hi] for s, t in batch.items()}

    # -- set-up -----------------------------------------------------------------------------------
    def _init_states(self, first: dict[str, torch.Tensor]) -> None:
        """Fresh SAEs from the run's first batch (this rank's rows of it when data-parallel)."""
        lo, hi = self.rows
        n_init = max(0, min(hi, 8192) - lo)    # b_dec from the global batch's first 8,192 rows
        for site in self.sites:
            torch.manual_seed(site_seed(self.cfg.seed, site))
            scfg = self.cfg.for_site(site)
            d_in = int(self.site_info[site]["d"])
            if first[site].shape[-1] != d_in:
                raise ScSteerError(f"site {site}: activations have width {first[site].shape[-1]}, expected {d_in}")
            x0 = first[site].to(self.device, torch.float32)  # on the device: data-parallel sums go through NCCL
            norms = x0.norm(dim=-1)
            mean_norm = self.site_info[site].get("mean_norm") or float(
                self.batch.total(norms.sum()) / self.batch.rows(len(norms)))
            scale = math.sqrt(d_in) / max(mean_norm, 1e-12)
            sae_cfg = SAEConfig(architecture=scfg.architecture, d_in=d_in, d_sae=scfg.resolved_d_sae(d_in),
                                k=scfg.k if ARCHITECTURES[scfg.architecture].uses_k else None, site=site,
                                hook_module=self.site_info[site].get("module"), **self.meta)
            with torch.device(self.device):  # drawn where it trains: a 7B-wide SAE is slow to draw on a CPU
                sae = make_sae(sae_cfg)
            if not scfg.tied_init:
                with torch.no_grad():
                    w = torch.randn_like(sae.W_enc)
                    sae.W_enc.copy_(w / w.norm(dim=0, keepdim=True))
            sae.init_b_dec(x0[:n_init] * scale, scfg.b_dec_init, self.batch)
            sae.set_training_options(scfg, fresh=True)
            sae.to(self.device)
            opt = make_optimizer(sae, scfg.resolved_lr(d_in))
            z = torch.zeros(sae_cfg.d_sae, dtype=torch.float64, device=self.device)
            self.states[site] = SiteState(site, scfg, sae, opt, scale, z.clone(), z.clone())

    # -- one step -----------------------------------------------------------------------------------
    def _step_site(self, st: SiteState, x_raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step; returns detached 0-d tensors, read on the host only when logged (the only
        host sync per step is the dead-latent count that sizes AuxK, and only when AuxK is on)."""
        cfg = self.cfg
        x = x_raw.to(self.device).to(torch.float32) * st.scale  # moved as stored (bf16: half the bytes), then cast
        sae = st.sae
        inputs = self._step_inputs(st)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
            out = sae.train_forward(x, inputs)
        out.x_hat = out.x_hat.float()
        loss, parts = sae.loss(x, out, inputs)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.data_parallel:  # each rank's loss is its share of the global one: the gradients add up
            for p in sae.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.all_reduce_(p.grad, f"the gradient all-reduce of {st.site}")
        sae.remove_parallel_grad()
        clip_gradients(st.opt, sae.parameters(), cfg.grad_clip)
        for g in st.opt.param_groups:
            g["lr"] = st.cfg.resolved_lr(sae.cfg.d_in) * lr_factor(self.step, cfg.steps, cfg.lr_warmup, cfg.lr_decay)
        st.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            sae.after_step(out, inputs)
            counts = self.dist.all_reduce_(out.counts, "the firing counts") if self.data_parallel else out.counts
            n = self.batch.rows(x.shape[0])
            record_firing(st, counts, n)
            if st.cfg.resolved_resample() and self._resample_due():
                picked = (st.since_fired > cfg.resolved_resample_tokens()) | duplicates(sae.W_dec, st.fire_count)
                gen = torch.Generator().manual_seed(site_seed(cfg.seed, st.site) + self.step)
                st.since_fired[resample(sae, st.opt, picked, x, out.x_hat, gen, self.batch)] = 0
            stats = {"loss": loss.detach(), "l0": counts.sum() / n,
                     "dead": (st.since_fired > cfg.resolved_dead_tokens()).float().mean()}
            if "fvu" not in parts:  # TopK and BatchTopK losses already computed it
                stats["fvu"] = (out.x_hat - x).pow(2).sum() / self.batch.centered_energy(x).clamp_min(1e-12)
        return stats | parts

    def _step_inputs(self, st: SiteState) -> StepInputs:
        """This step's ``StepInputs`` for one site (reading the dead count on the host is the step's one
        sync, and only where AuxK is on)."""
        c, sae = st.cfg, st.sae
        dead = st.since_fired > self.cfg.resolved_dead_tokens()
        auxk = sae.uses_auxk and c.aux_coeff > 0
        return StepInputs(sparsity_scale=min(1.0, (self.step + 1) / max(1, c.sparsity_warmup * self.cfg.steps)),
                          l1_coeff=c.l1_coeff, l0_coeff=c.l0_coeff, aux_coeff=c.aux_coeff if auxk else 0.0,
                          batchtopk_l1=c.batchtopk_l1, k_aux=c.k_aux or sae.cfg.d_in // 2, dead=dead,
                          n_dead=int(dead.sum()) if auxk else 0, batch=self.batch)

    def _resample_due(self) -> bool:
        """Resampling rounds: every ``resample_tokens`` (so a resampled latent has that long to fire before
        it can be picked again), from the end of the first interval until the learning rate decays."""
        window = max(1, -(-self.cfg.resolved_resample_tokens() // self.cfg.batch_size))
        step = self.step + 1
        return step % window == 0 and step < int((1 - self.cfg.lr_decay) * self.cfg.steps)

    SHARED_STATS = ("l0", "dead")   # the same on every rank; the other logged values are shares of a sum

    def _read_stats(self, stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
        """Bring logged values to the host (one sync; data-parallel: summed over ranks first) and stop on a
        non-finite loss."""
        if self.data_parallel:
            keys = [(site, k) for site, s in stats.items() for k in s if k not in self.SHARED_STATS]
            summed = self.dist.all_reduce_(torch.stack([stats[site][k].float() for site, k in keys]), "the logged values")
            for (site, k), v in zip(keys, summed):
                stats[site][k] = v
        values = {site: {k: float(v) for k, v in s.items()} for site, s in stats.items()}
        for site, v in values.items():
            if not math.isfinite(v["loss"]):  # raised before run() can checkpoint this step's weights
                self._diverged(site, f"the loss is {v['loss']}")
        return values

    # -- checkpoints ------------------------------------------------------------------------------
    def _diverged(self, site: str, what: str) -> None:
        kept = (f"the last good checkpoint ({self.checkpoint_path}) is kept; --resume continues from it"
                if self.checkpoint_path.exists() else "nothing was saved")
        raise ScSteerError(f"training of {site} diverged at step {self.step}: {what} (try a lower lr); {kept}")

    def _checkpoint(self) -> None:
        for site, st in self.states.items():
            if not all(bool(torch.isfinite(p).all()) for p in st.sae.parameters()):
                self._diverged(site, "a weight is no longer finite")
        if self.writes_shared:   # data-parallel: rank 0 holds the same weights as every rank and writes them
            save_checkpoint(self.checkpoint_path, self.step, self.cfg, self.states)

    def _restore(self) -> None:
        self.step, self.states = load_checkpoint(self.checkpoint_path, self.cfg, self.sites, self.device,
                                                 "rank" if self.parallel == "layers" else "run")

    # -- the loop ---------------------------------------------------------------------------------
    def _check_checkpoints(self, resume: bool) -> None:
        """Refuse to overwrite a run's checkpoints without --resume, or to resume those of another split."""
        found = sorted(p.name for p in self.out.glob("checkpoint*.safetensors"))
        if found and not resume:
            raise ScSteerError(f"{str(self.out)!r} already holds a training checkpoint; pass --resume to "
                               "continue it or choose another --out")
        ours = {checkpoint_name(Dist(r, self.dist.world), self.parallel) for r in range(self.dist.world)}
        foreign = [f for f in found if f not in ours]
        if foreign:
            raise ScSteerError(f"--resume: {str(self.out)!r} holds {', '.join(foreign)}, checkpoints of the same run "
                               "split another way; resume it with the --parallel mode and number of processes "
                               "that wrote them")

    def run(self, resume: bool = False) -> dict[str, SAE]:
        """Train to ``cfg.steps``; returns this rank's SAEs in raw-activation units (all of them are saved
        under saes/)."""
        make_dir(self.out)
        self._check_checkpoints(resume)
        self._done_marker(self.dist.rank).unlink(missing_ok=True)
        self.staging = self.out / self.dist.broadcast_object(f".saes-{uuid.uuid4().hex[:8]}", "the start of training")
        self.dist.barrier("the start of training")   # every rank has looked before any rank writes
        if resume and self.checkpoint_path.exists():
            self._restore()
        log_path = self.log_path
        if self.writes_shared:
            trim_log(log_path, self.step)
        stream = map(self._local, self.source(self.step))
        if not self.states:
            first = next(stream)
            self._init_states(first)
            stream = itertools.chain([first], stream)
        old_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train SAEs", disable=not self.progress)
        try:
            trim = host_memory_returned() if self.device.type == "cpu" else contextlib.nullcontext()
            with open(os.devnull if not self.writes_shared else log_path, "a") as log, trim:
                while self.step < self.cfg.steps:
                    batch = next(stream)
                    stats = {site: self._step_site(self.states[site], batch[site]) for site in self.sites}
                    self.step += 1
                    bar.update(1)
                    stop = self._agreed_stop()
                    if (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps
                            or self.step % self.cfg.checkpoint_every == 0 or stop):
                        stats = self._read_stats(stats)
                    if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                        log.writelines(to_json({"step": self.step, "site": site, **s}) + "\n" for site, s in stats.items())
                        log.flush()
                        mean = {k: sum(s[k] for s in stats.values()) / len(stats) for k in ("loss", "l0", "fvu")}
                        bar.set_postfix(loss=f"{mean['loss']:.4f}", L0=f"{mean['l0']:.1f}", FVU=f"{mean['fvu']:.3f}")
                    if self.step % self.cfg.checkpoint_every == 0 or stop:
                        self._checkpoint()
                    if stop:
                        raise KeyboardInterrupt
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        self._calibrate(stream)
        self._checkpoint()
        return self.save()

    def _agreed_stop(self) -> bool:
        """Whether to stop after this step: data-parallel ranks stop together (any rank's signal stops all,
        at the same step, so their collectives stay paired), asking each other every ``log_every`` steps
        (the answer is a host sync); other runs stop on their own signal at once."""
        if not self.data_parallel:
            return self._stop
        if self.step % self.cfg.log_every and self.step != self.cfg.steps:
            return False
        flag = torch.tensor([float(self._stop)], device=self.device)
        return bool(self.dist.all_reduce_(flag, "the stop check", op="max"))

    CALIBRATION_BATCHES = 8

    def _calibrate(self, stream) -> None:
        """Hand each SAE the batches that follow the last step (deterministic: the stream is a function
        of the step), in training units, for its end-of-run calibration."""
        wanted = [st for st in self.states.values() if st.sae.calibrates]
        if not wanted:
            return
        batches = [next(stream) for _ in range(self.CALIBRATION_BATCHES)]
        for st in wanted:
            st.sae.calibrate([b[st.site].to(self.device, torch.float32) * st.scale for b in batches], self.batch)

    def _request_stop(self, signum, frame) -> None:
        self._stop = True

    def save(self) -> dict[str, SAE]:
        """Fold the input scale into copies of the SAEs and write them under ``saes/<site>/``, all sites
        replaced as one set (under ``parallel="layers"`` each rank writes its own into a shared staging
        folder and rank 0 swaps it in); this rank's copies are returned on the training device."""
        out = {}
        staging = self.staging or self.out / f".saes-{uuid.uuid4().hex[:8]}"
        for site, st in self.states.items():
            sae = copy.deepcopy(st.sae)
            sae.fold_input_scale(st.scale)
            if self.writes_shared:
                tokens = max(1, self.step * self.cfg.batch_size)
                freq = (st.fire_count.cpu() / tokens).float()
                sae.save(staging / site, log_firing_freq=torch.log10(freq.clamp_min(1e-10)))
            out[site] = sae.eval()
        if self.parallel == "layers":   # shares differ: the others may still be training, for hours
            atomic_write_text(self._done_marker(self.dist.rank), str(self.step))
            wait_for_ranks(self.dist, self._done_marker, self._rank_log, "waiting for the other ranks' SAEs")
        self.dist.barrier("saving the SAEs")
        if self.dist.is_main:
            final, old = self.out / SAES, self.out / f".saes-old-{uuid.uuid4().hex[:8]}"
            if final.exists():
                os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
            if self.parallel == "layers":
                merge_logs(self.out, self.dist.world, self.all_sites)
                for r in range(self.dist.world):
                    self._done_marker(r).unlink(missing_ok=True)
            plot_training_curves(self.out / TRAIN_LOG, self.out / CURVES)
        self.dist.barrier("the end of training")
        return out


MIN_STEPS = 4000   # train_sae's least number of steps (bench/toy_recovery_results.md says why)


def train_sae(x: torch.Tensor, architecture: str = "topk", *, d_sae: int | None = None, k: int | None = 32,
              tokens: int | None = None, batch_size: int = 1024, seed: int = 0, device: str | torch.device = "cpu",
              progress: bool = False, out: str | Path | None = None, **options) -> SAE:
    """Train one SAE on an in-memory float tensor ``[N, d]`` and return it (raw-activation units), on
    ``device`` (where it was trained; ``x`` may live anywhere).

    ``options`` are fields of ``SAETrainConfig`` (``l1_coeff``, ``lr``, ``expansion``, ...) or of
    ``TrainConfig`` (``dead_tokens``, ``lr_warmup``, ...). ``tokens`` defaults to 10 passes over ``x``
    or ``MIN_STEPS`` optimizer steps, whichever is more. Writes its files to ``out`` (a temp folder if
    None).
    """
    import tempfile
    from dataclasses import fields

    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ScSteerError("train_sae: x must be a float tensor of shape [N, d]")
    batch_size = min(batch_size, len(x))
    run_keys = {f.name for f in fields(TrainConfig)} - {"sites", "batch_size", "tokens", "seed", "sae", "per_site"}
    run_opts = {key: options.pop(key) for key in list(options) if key in run_keys}
    scfg = SAETrainConfig(architecture=architecture, d_sae=d_sae, k=k, **options)
    tokens = tokens or max(10 * len(x), MIN_STEPS * batch_size)
    cfg = TrainConfig(sites=["x"], batch_size=batch_size, tokens=tokens, seed=seed, sae=scfg,
                      **{"checkpoint_every": 1 << 30, **run_opts})
    cfg.check()
    cfg.check_widths({"x": x.shape[1]}, resolve_device(device))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tensor_source({"x": x}, batch_size, seed), out or tmp,
                          {"x": {"d": x.shape[1], "mean_norm": float(x.float().norm(dim=-1).mean())}},
                          device=device, progress=progress)
        return trainer.run()["x"]
