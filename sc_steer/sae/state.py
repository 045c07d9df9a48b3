"""What training one site holds (SAE, optimiser, input scale, firing counters) and its checkpoint file.

A checkpoint is one safetensors file for a whole run (one per rank under ``parallel="layers"``): per
site the SAE's weights, Adam's moments and step counts, the dead-latent counters, and in its metadata
the run's step, config and each SAE's shape. Restoring it gives states equal to the saved ones, so a
resumed run continues bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..distributed import Dist
from ..errors import ScSteerError
from ..files import atomic_write
from ..rundir import CHECKPOINT
from .base import SAE, SAEConfig, make_sae
from .config import SAETrainConfig, TrainConfig, stored_config
from .optim import make_optimizer


@dataclass
class SiteState:
    site: str
    cfg: SAETrainConfig
    sae: SAE
    opt: torch.optim.Adam
    scale: float                   # inputs are multiplied by it: sqrt(d_in) / their mean norm
    since_fired: torch.Tensor      # tokens since each latent last fired
    fire_count: torch.Tensor       # firings over the whole run (for sparsity.safetensors)


def record_firing(st: SiteState, counts: torch.Tensor, n_tokens: int) -> None:
    """Dead-latent bookkeeping after a batch of ``n_tokens``: a latent that fired at least once starts
    counting again from zero; the others age by the batch. ``fire_count`` feeds sparsity.safetensors."""
    st.since_fired += n_tokens
    st.since_fired.masked_fill_(counts > 0, 0)
    st.fire_count += counts


def checkpoint_name(dist: Dist, parallel: str | None) -> str:
    """One checkpoint per rank when the sites are split over ranks; otherwise one for the run."""
    return f"checkpoint.rank{dist.rank}-of-{dist.world}.safetensors" if parallel == "layers" and dist.active \
        else CHECKPOINT


def save_checkpoint(path: Path, step: int, cfg: TrainConfig, states: dict[str, SiteState]) -> None:
    """Write the states at ``step`` atomically (a kill leaves the previous checkpoint whole)."""
    tensors, meta = {}, {"step": step, "config": cfg.to_dict(), "sites": {}}
    for site, st in states.items():
        for k, v in st.sae.state_dict().items():
            tensors[f"{site}/sae/{k}"] = v.detach().cpu().contiguous()
        adam_steps = {}
        for pname, p in st.sae.named_parameters():
            s = st.opt.state.get(p)
            if s:
                tensors[f"{site}/adam/{pname}/exp_avg"] = s["exp_avg"].cpu().contiguous()
                tensors[f"{site}/adam/{pname}/exp_avg_sq"] = s["exp_avg_sq"].cpu().contiguous()
                adam_steps[pname] = float(s["step"])
        tensors[f"{site}/since_fired"] = st.since_fired.cpu()
        tensors[f"{site}/fire_count"] = st.fire_count.cpu()
        meta["sites"][site] = {"scale": st.scale, "adam_steps": adam_steps, "sae_cfg": asdict(st.sae.cfg)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"sc_steer": json.dumps(meta)}))


def load_checkpoint(path: Path, cfg: TrainConfig, sites: list[str], device: torch.device,
                    whose: str = "run") -> tuple[int, dict[str, SiteState]]:
    """The step and the states of a checkpoint written by this same config for these same ``sites``
    (``whose``: "run", or "rank" when the sites are this rank's share), on ``device``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["sc_steer"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ScSteerError(f"checkpoint {str(path)!r} is unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict) or not {"step", "config", "sites"} <= set(meta) or not isinstance(meta["sites"], dict):
        raise ScSteerError(f"checkpoint {str(path)!r} was not written by sc-steer train (its metadata lacks the "
                           "step, config or sites); start a new --out, or pass --force")
    old, new = stored_config(meta["config"]), stored_config(cfg.to_dict())
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ScSteerError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}; "
                           "use the original config or start a new --out")
    if sorted(meta["sites"]) != sorted(sites):
        raise ScSteerError(f"--resume: checkpoint {str(path)!r} holds the sites {', '.join(meta['sites'])}, "
                           f"this {whose} trains {', '.join(sites)}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ScSteerError(f"checkpoint {str(path)!r}: {bad[0]} holds NaN or infinite values; it cannot be resumed "
                           "(start a new --out, or pass --force)")
    states = {}
    for site, info in meta["sites"].items():
        scfg = cfg.for_site(site)
        sae = make_sae(SAEConfig(**info["sae_cfg"])).to(device)
        sae.set_training_options(scfg, fresh=False)
        sae.load_state_dict({k.split("/sae/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{site}/sae/")})
        opt = make_optimizer(sae, scfg.resolved_lr(sae.cfg.d_in))
        fused = bool(opt.defaults.get("fused"))
        for pname, p in sae.named_parameters():
            if pname in info["adam_steps"]:  # fused Adam keeps its step count on the parameter's device
                step = torch.tensor(info["adam_steps"][pname], dtype=torch.float32,
                                    device=p.device if fused else "cpu")
                opt.state[p] = {"step": step,
                                "exp_avg": tensors[f"{site}/adam/{pname}/exp_avg"].to(device),
                                "exp_avg_sq": tensors[f"{site}/adam/{pname}/exp_avg_sq"].to(device)}
        states[site] = SiteState(site, scfg, sae, opt, info["scale"], tensors[f"{site}/since_fired"].to(device),
                                 tensors[f"{site}/fire_count"].to(device))
    return meta["step"], states

