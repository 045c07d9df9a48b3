"""Steerability of every feature of a site: its output score (after Arad et al. 2025).

Add the feature's decoder row (x ``coeff``) at every text position of a few neutral prompts and read
the next-token distribution after the last one: the output score is how much probability the
feature's own logit-lens tokens (its ``LENS_K`` most promoted) gain, averaged over the prompts,

    score_i = mean_prompts( sum_{v in lens_i} p_steered(v) - sum_{v in lens_i} p_unsteered(v) ).

A feature whose direction, pushed, makes the model say what the direction says is one steering can
use; one that only reads (its row writes nothing the model then says) scores near 0. The coefficient
is ``scale`` x the site's mean residual norm over the prompts' tokens, so that sites of different
norms are pushed alike. Features are done ``batch`` at a time: one forward pass of ``batch`` x prompts
rows, each row with its own feature's direction, only the last position's logits computed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import rundir
from ..devices import follow_model
from ..errors import ScSteerError
from ..files import atomic_write_text, read_json, to_json
from ..interpret.lens import lens_topk
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .forced import position_ids
from .generate import bos_positions, left_pad
from .scores import LENS_K

SCALE = 0.3


def _last_logits(lm: LM, inputs: dict) -> torch.Tensor:
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
          "position_ids": position_ids(inputs["attention_mask"])}
    try:
        return lm.hf(**kw, logits_to_keep=1).logits[:, -1].float()
    except TypeError:   # a model class without logits_to_keep
        return lm.hf(**kw).logits[:, -1].float()


@torch.no_grad()
def output_scores(lm: LM, sae: SAE, site: str, prompts: list[str], *, scale: float = SCALE, k: int = LENS_K,
                  batch: int = 64, features: list[int] | None = None, progress: bool = True) -> dict:
    """``{"scores": [d_sae floats] (or one per ``features``), "coeff": ..., ...}`` as the module says."""
    follow_model(sae, lm)
    s = Site.parse(site, lm.n_layers)
    if s.kind == "mlp_act":
        raise ScSteerError(f"steerability at {site}: an mlp_act feature has no logit lens of its own; "
                           "use a residual-basis site")
    lm.check_sae(s, sae)
    if not prompts:
        raise ScSteerError("steerability: give at least one prompt")
    tok = lm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    inputs = left_pad(lm, [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts])
    P = len(prompts)
    text = inputs["attention_mask"].bool() & ~bos_positions(lm, inputs["input_ids"])   # [P, T]
    seen = {}

    def grab(site_: Site, h: torch.Tensor, _call: int) -> None:
        seen["h"] = h

    with lm.edited(grab, [s]):
        p0 = torch.softmax(_last_logits(lm, inputs), -1)                     # [P, V]
    coeff = scale * float(seen["h"].float().norm(dim=-1)[text].mean())
    ids = list(range(sae.cfg.d_sae)) if features is None else list(features)
    W = sae.W_dec.detach().float()
    lens = lens_topk(lm, W[ids], k)[0].to(lm.device)                         # [n, k]
    scores = torch.empty(len(ids))
    for lo in tqdm(range(0, len(ids), batch), desc=f"steerability {site}", disable=not progress):
        chunk = torch.tensor(ids[lo:lo + batch], device=W.device)
        n = len(chunk)
        rep = {key: v.repeat(n, 1) for key, v in inputs.items()}
        push = (coeff * W[chunk]).repeat_interleave(P, 0)[:, None, :]        # [n*P, 1, d]
        where = text.repeat(n, 1)[..., None]

        def add(site_: Site, h: torch.Tensor, _call: int, push=push, where=where) -> torch.Tensor:
            return (h.float() + push.to(h.device) * where).to(h.dtype)

        with lm.edited(add, [s]):
            p1 = torch.softmax(_last_logits(lm, rep), -1).view(n, P, -1)       # [n, P, V]
        idx = lens[lo:lo + n][:, None, :].expand(n, P, k)
        gain = p1.gather(-1, idx).sum(-1) - p0[None].expand(n, P, -1).gather(-1, idx).sum(-1)
        scores[lo:lo + n] = gain.mean(1).cpu()
    return {"site": site, "scores": [float(x) for x in scores], "features": ids if features is not None else None,
            "coeff": coeff, "scale": scale, "lens_k": k, "prompts": list(prompts)}


def steerability_path(run: str | Path, site: str) -> Path:
    """Beside the site's interpretation records: ``features/<site>.steerability.json``."""
    return rundir.records_path(run, site).with_suffix(".steerability.json")


def write_steerability(run: str | Path, result: dict) -> Path:

    path = steerability_path(run, result["site"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, to_json(result))


def read_steerability(run: str | Path, site: str) -> dict | None:
    path = steerability_path(run, site)
    return read_json(path, "steerability file") if path.exists() else None
