"""Train one SAE per site in one run: shared batches, per-site optimisers, checkpoints, resume.

Batches come from a ``BatchSource``: an activation store on disk, an in-memory tensor, or the model
itself (no disk cache). Every source is a pure function of (seed, step), so ``resume`` replays the
stream up to the checkpoint and the run ends where an uninterrupted one would.

Per step, per site: x is scaled by ``s = sqrt(d_in) / mean_norm``; loss -> backward -> remove the
gradient parallel to each decoder row -> clip -> Adam -> renormalise decoder rows. On save, ``s`` is
folded into the weights so the files take raw activations.

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

import copy
import itertools
import json
import math
import os
import shutil
import signal
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..devices import resolve_device
from ..distributed import LOCAL, Dist, row_range, share, wait_for_ranks
from ..errors import ScSteerError
from ..files import atomic_write, atomic_write_text, make_dir
from . import batch as batches
from .base import SAE, SAEConfig, make_sae
from .config import SAETrainConfig, TrainConfig
from .resample import duplicates, resample

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.jsonl"

BatchSource = Callable[[int], Iterator[dict[str, torch.Tensor]]]  # start_step -> batches from there on


def tensor_source(tensors: dict[str, torch.Tensor], batch_size: int, seed: int) -> BatchSource:
    """In-memory activations; a fresh permutation each epoch, drawn from (seed, epoch)."""
    n = len(next(iter(tensors.values())))
    if n < batch_size:
        raise ScSteerError(f"only {n} activations for a batch size of {batch_size}")
    per_epoch = n // batch_size

    def stream(start: int) -> Iterator[dict[str, torch.Tensor]]:
        step = start
        while True:
            epoch, i = divmod(step, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            idx = perm[i * batch_size:(i + 1) * batch_size]
            yield {s: t[idx] for s, t in tensors.items()}
            step += 1

    return stream


def store_source(store, sites: list[str], batch_size: int, seed: int) -> BatchSource:
    """Shuffled batches streamed from an ActivationStore (bounded memory); resume skips ahead."""
    def stream(start: int) -> Iterator[dict[str, torch.Tensor]]:
        batches = store.batches(sites, batch_size, seed=seed, epochs=1 << 40, drop_last=True)
        return itertools.islice(batches, start, None)

    return stream


def model_source(lm, sites: list, data: str, batch_size: int, seed: int, ctx: int = 256, rows_per_pass: int = 16,
                 buffer_tokens: int = 1 << 17, buffer_bytes: int = 8 << 30, run_sites_of: list | None = None
                 ) -> BatchSource:
    """Activations straight from the model (no disk cache), shuffled in a host buffer of ``buffer_tokens``
    tokens per site, fewer where all sites together would pass ``buffer_bytes`` (kept and handed out in
    the model's dtype: the trainer casts on its device). ``run_sites_of`` is the whole run's sites where
    ``sites`` is one rank's share: the buffer is sized for the run, so every rank draws the same tokens."""
    from ..activations import kept, run_sites, text_rows
    from ..data import iter_batches, iter_documents, iter_rows, pad_token_id
    from ..devices import host_buffer

    per_token = sum(lm.width(s) for s in (run_sites_of or sites)) * torch.empty((), dtype=lm.dtype).element_size()
    buffer_tokens = max(2 * batch_size, min(buffer_tokens, buffer_bytes // per_token))

    def token_batches():
        epoch = 0
        while True:
            rows = iter_rows(iter_documents(data), lm.tokenizer, ctx)
            kept = 0
            for b in iter_batches(rows, rows_per_pass, ctx, pad_token_id(lm.tokenizer)):
                kept += int(b.keep.sum())
                yield epoch, b
            if kept == 0:  # another pass would find nothing either: fail instead of looping forever
                raise ScSteerError(f"data {data!r} has no text tokens to train on")
            epoch += 1

    def generate() -> Iterator[dict[str, torch.Tensor]]:
        # A shuffle buffer of slots in one host tensor per site, allocated once: a pass's rows go into free
        # slots, a batch is gathered from random live slots and its slots are freed. ``live`` lists the
        # live slots in pool order (the remainder of the last shuffle, then the rows added since), so the
        # batches are those of shuffling a concatenated pool, without copying the pool at each refill.
        # Copies between the GPU and the host go through pinned tensors (staging for a pass's rows, and each
        # batch): pageable copies ran at ~1 GB/s at 7B width (the H100 profile), pinned ones at the bus's rate.
        cap = buffer_tokens + rows_per_pass * ctx
        buf: dict[str, torch.Tensor] = {}
        staging: dict[str, torch.Tensor] = {}
        live = torch.zeros(0, dtype=torch.int64)
        free = torch.arange(cap)
        gen = torch.Generator().manual_seed(seed)
        for _, b in token_batches():
            acts = run_sites(lm, b, sites)
            where = text_rows(b)
            slots, free = free[:len(where)], free[len(where):]
            for s in sites:
                rows = kept(acts[s], where)
                if str(s) not in buf:
                    buf[str(s)] = torch.empty(cap, rows.shape[1], dtype=rows.dtype)
                    staging[str(s)] = host_buffer((rows_per_pass * ctx, rows.shape[1]), rows.dtype, rows.device)
                stage = staging[str(s)][:len(where)]
                stage.copy_(rows)                      # blocking: the rows are on the host when it returns
                buf[str(s)].index_copy_(0, slots, stage)
            live = torch.cat([live, slots])
            n = len(live)
            if n < buffer_tokens:
                continue
            order = live[torch.randperm(n, generator=gen)]
            i = 0
            while n - i >= buffer_tokens // 2 + batch_size:
                idx = order[i:i + batch_size]
                batch = {s: torch.index_select(v, 0, idx, out=host_buffer((len(idx), v.shape[1]), v.dtype, lm.device))
                         for s, v in buf.items()}
                yield batch  # the model's dtype: cast on the device
                i += batch_size
            live, free = order[i:], torch.cat([free, order[:i]])

    return lambda start: itertools.islice(generate(), start, None)


@dataclass
class SiteState:
    site: str
    cfg: SAETrainConfig
    sae: SAE
    opt: torch.optim.Adam
    scale: float
    since_fired: torch.Tensor      # tokens since each latent last fired
    fire_count: torch.Tensor       # firings over the whole run (for sparsity.safetensors)


def record_firing(st: SiteState, counts: torch.Tensor, n_tokens: int) -> None:
    """Dead-latent bookkeeping after a batch of ``n_tokens``: a latent that fired at least once starts
    counting again from zero; the others age by the batch. ``fire_count`` feeds sparsity.safetensors."""
    st.since_fired += n_tokens
    st.since_fired.masked_fill_(counts > 0, 0)
    st.fire_count += counts


def make_optimizer(sae: SAE, lr: float) -> torch.optim.Adam:
    """Adam; on CUDA the fused kernel (one pass over parameters, gradients and moments)."""
    fused = sae.W_dec.device.type == "cuda"
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused or None)


def clip_gradients(opt: torch.optim.Optimizer, params, max_norm: float) -> None:
    """Scale the gradients so their total norm is at most ``max_norm`` (as ``clip_grad_norm_``). With fused
    Adam the scaling happens inside the optimiser's own pass over the gradients (its ``grad_scale``, by
    which it divides each gradient; the same hook ``GradScaler`` uses): one read and one write of every
    gradient fewer, and no host sync."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if opt.defaults.get("fused"):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        opt.grad_scale = ((norm + 1e-6) / max_norm).clamp_min(1.0).float()
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def site_seed(seed: int, site: str) -> int:
    """The seed of one site's initialisation: the same whichever other sites (or ranks) share the run."""
    return (seed * 1_000_003 + zlib.crc32(site.encode())) % (1 << 63)


def lr_factor(step: int, steps: int, warmup: float, decay: float) -> float:
    """Linear warm-up (<= 1,000 steps), constant, then linear decay to zero over the last ``decay``."""
    w = min(1000, max(1, int(warmup * steps)))
    if step < w:
        return (step + 1) / w
    d0 = int((1 - decay) * steps)
    if decay > 0 and step >= d0:
        return max(0.0, (steps - step) / max(1, steps - d0))
    return 1.0


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
        self.batch = batches.Sharded(dist, cfg.batch_size) if self.data_parallel else batches.LOCAL
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
        return self._rank_log(self.dist.rank) if self.parallel == "layers" else self.out / LOG

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
                                k=scfg.k if scfg.architecture in ("topk", "batchtopk") else None, site=site,
                                hook_module=self.site_info[site].get("module"), **self.meta)
            with torch.device(self.device):  # drawn where it trains: a 7B-wide SAE is slow to draw on a CPU
                sae = make_sae(sae_cfg)
            if not scfg.tied_init:
                with torch.no_grad():
                    w = torch.randn_like(sae.W_enc)
                    sae.W_enc.copy_(w / w.norm(dim=0, keepdim=True))
            sae.init_b_dec(x0[:n_init] * scale, scfg.b_dec_init, self.batch if self.data_parallel else None)
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
        dead = st.since_fired > cfg.resolved_dead_tokens()
        uses_dead = sae.needs_k and st.cfg.aux_coeff > 0
        ctx = {"sparsity_scale": min(1.0, (self.step + 1) / max(1, st.cfg.sparsity_warmup * cfg.steps)),
               "l1_coeff": st.cfg.l1_coeff, "l0_coeff": st.cfg.l0_coeff, "aux_coeff": st.cfg.aux_coeff,
               "batchtopk_l1": st.cfg.batchtopk_l1, "k_aux": st.cfg.k_aux or sae.cfg.d_in // 2, "dead": dead,
               "n_dead": int(dead.sum()) if uses_dead else 0, "batch": self.batch}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
            out = sae.train_forward(x, ctx)
        out.x_hat = out.x_hat.float()
        loss, parts = sae.loss(x, out, ctx)
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
            sae.after_step(out, ctx)
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
        tensors, meta = {}, {"step": self.step, "config": self.cfg.to_dict(), "sites": {}}
        for site, st in self.states.items():
            if not all(bool(torch.isfinite(p).all()) for p in st.sae.parameters()):
                self._diverged(site, "a weight is no longer finite")
            if not self.writes_shared:  # data-parallel: rank 0 holds the same weights and writes them
                continue
            for k, v in st.sae.state_dict().items():
                tensors[f"{site}/sae/{k}"] = v.detach().cpu().contiguous()
            names = dict(st.sae.named_parameters())
            adam_steps = {}
            for pname, p in names.items():
                s = st.opt.state.get(p)
                if s:
                    tensors[f"{site}/adam/{pname}/exp_avg"] = s["exp_avg"].cpu().contiguous()
                    tensors[f"{site}/adam/{pname}/exp_avg_sq"] = s["exp_avg_sq"].cpu().contiguous()
                    adam_steps[pname] = float(s["step"])
            tensors[f"{site}/since_fired"] = st.since_fired.cpu()
            tensors[f"{site}/fire_count"] = st.fire_count.cpu()
            meta["sites"][site] = {"scale": st.scale, "adam_steps": adam_steps, "sae_cfg": st.sae.cfg.__dict__}
        if self.writes_shared:
            atomic_write(self.checkpoint_path,
                         lambda p: save_file(tensors, str(p), metadata={"sc_steer": json.dumps(meta)}))

    def _restore(self) -> None:
        path = self.checkpoint_path
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["sc_steer"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise ScSteerError(f"checkpoint {str(path)!r} is unreadable ({str(e).splitlines()[0]})") from None
        if meta["config"] != json.loads(json.dumps(self.cfg.to_dict())):
            old, new = meta["config"], json.loads(json.dumps(self.cfg.to_dict()))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ScSteerError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}; "
                               "use the original config or start a new --out")
        self.step = meta["step"]
        if sorted(meta["sites"]) != sorted(self.sites):
            raise ScSteerError(f"--resume: checkpoint {str(path)!r} holds the sites {', '.join(meta['sites'])}, "
                               f"this {'rank' if self.parallel == 'layers' else 'run'} trains {', '.join(self.sites)}")
        for site, info in meta["sites"].items():
            scfg = self.cfg.for_site(site)
            sae = make_sae(SAEConfig(**info["sae_cfg"])).to(self.device)
            sae.set_training_options(scfg, fresh=False)
            sae.load_state_dict({k.split("/sae/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{site}/sae/")})
            opt = make_optimizer(sae, scfg.resolved_lr(sae.cfg.d_in))
            fused = bool(opt.defaults.get("fused"))
            for pname, p in sae.named_parameters():
                if pname in info["adam_steps"]:  # fused Adam keeps its step count on the parameter's device
                    step = torch.tensor(info["adam_steps"][pname], dtype=torch.float32,
                                        device=p.device if fused else "cpu")
                    opt.state[p] = {"step": step,
                                    "exp_avg": tensors[f"{site}/adam/{pname}/exp_avg"].to(self.device),
                                    "exp_avg_sq": tensors[f"{site}/adam/{pname}/exp_avg_sq"].to(self.device)}
            self.states[site] = SiteState(site, scfg, sae, opt, info["scale"],
                                          tensors[f"{site}/since_fired"].to(self.device),
                                          tensors[f"{site}/fire_count"].to(self.device))

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
        if log_path.exists() and self.writes_shared:  # drop lines written after the checkpoint (and a torn last one)
            kept = [ln for ln in log_path.read_text().splitlines() if _log_step(ln) <= self.step]
            atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))
        stream = map(self._local, self.source(self.step))
        if not self.states:
            first = next(stream)
            self._init_states(first)
            stream = itertools.chain([first], stream)
        old_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train SAEs", disable=not self.progress)
        try:
            with open(os.devnull if not self.writes_shared else log_path, "a") as log:
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
                        for site, s in stats.items():
                            log.write(json.dumps({"step": self.step, "site": site, **s}) + "\n")
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
            final, old = self.out / "saes", self.out / f".saes-old-{uuid.uuid4().hex[:8]}"
            if final.exists():
                os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
            if self.parallel == "layers":
                merge_logs(self.out, self.dist.world, self.all_sites)
                for r in range(self.dist.world):
                    self._done_marker(r).unlink(missing_ok=True)
            plot_training_curves(self.out / LOG, self.out / "training_curves.png")
        self.dist.barrier("the end of training")
        return out


def checkpoint_name(dist: Dist, parallel: str | None) -> str:
    """One checkpoint per rank when the sites are split over ranks; otherwise one for the run."""
    return f"checkpoint.rank{dist.rank}-of-{dist.world}.safetensors" if parallel == "layers" and dist.active \
        else CHECKPOINT


def rank_log_name(rank: int, world: int) -> str:
    return f"train_log.rank{rank}-of-{world}.jsonl"


def merge_logs(out: Path, world: int, sites: list[str]) -> None:
    """The ranks' logs as one, in the order a one-process run writes it (by step, then site)."""
    order = {s: i for i, s in enumerate(sites)}
    rows = []
    for r in range(world):
        path = out / rank_log_name(r, world)
        if path.exists():
            rows += [ln for ln in path.read_text().splitlines() if math.isfinite(_log_step(ln))]
    rows.sort(key=lambda ln: (_log_step(ln), order.get(json.loads(ln).get("site"), len(order))))
    atomic_write_text(out / LOG, "".join(ln + "\n" for ln in rows))


def _log_step(line: str) -> float:
    """The step of a train-log line; a line cut short by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def plot_training_curves(log_path: Path, png: Path) -> None:
    """Loss, FVU, L0 and dead fraction per site against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    if not rows:
        return
    sites = sorted({r["site"] for r in rows}, key=lambda s: (len(s), s))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for key, ax in zip(("loss", "fvu", "l0", "dead"), axes):
        for site in sites:
            pts = [(r["step"], r[key]) for r in rows if r["site"] == site]
            ax.plot(*zip(*pts), label=site, lw=1)
        ax.set_title({"loss": "training loss", "fvu": "FVU (batch)", "l0": "L0", "dead": "dead fraction"}[key])
        ax.set_xlabel("step")
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


MIN_STEPS = 4000   # bench/toy_recovery_results.md: 250 steps of 1,024 leave TopK at MMCS 0.73; 8,000 gain nothing on 4,000


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
    run_keys = {f.name for f in fields(TrainConfig)} - {"sites", "batch_size", "tokens", "seed", "sae", "layers"}
    run_opts = {key: options.pop(key) for key in list(options) if key in run_keys}
    scfg = SAETrainConfig(architecture=architecture, d_sae=d_sae, k=k, **options)
    tokens = tokens or max(10 * len(x), MIN_STEPS * batch_size)
    cfg = TrainConfig(sites=["x"], batch_size=batch_size, tokens=tokens, seed=seed, sae=scfg,
                      **{"checkpoint_every": 1 << 30, **run_opts})
    cfg.check()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tensor_source({"x": x}, batch_size, seed), out or tmp,
                          {"x": {"d": x.shape[1], "mean_norm": float(x.float().norm(dim=-1).mean())}},
                          device=device, progress=progress)
        return trainer.run()["x"]
