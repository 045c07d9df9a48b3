"""Evaluate SAEs on held-out text: sparsity, reconstruction, and what splicing them in costs the model.

Per site, over real text tokens only (BOS and padding excluded):

* L0  = mean number of active latents per token;
* FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (variance about the MEAN), explained variance = 1 - FVU;
* dead fraction = latents that never fired in the window; dense fraction = latents firing on > 10% of tokens;
* CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean), where "spliced" replaces the site's
  activation by the SAE reconstruction and "zero" by zeros, at text positions (BOS is left intact);
  KL(clean || spliced) per scored position.

A prediction is scored when its target is a real text token.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from . import rundir, validate
from .data import iter_batches, iter_documents, iter_rows, pad_token_id
from .devices import check_fits, follow_model
from .errors import ScSteerError
from .files import atomic_write_text, make_dir, to_json
from .models import LM, rewrap, unwrap
from .sae import SAE


def _replace(env, fn) -> None:
    """Inside a trace: set a module's output to fn(hidden), keeping any tuple structure."""
    out = env.output
    new = fn(unwrap(out))
    env.output = rewrap(out, new)


def _ce(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0][scored]


def evaluate_saes(lm: LM, saes: dict[str, SAE], data: str, *, ctx: int = 256, batch_size: int = 8,
                  max_tokens: int = 50_000, dense_threshold: float = 0.1, progress: bool = True) -> dict[str, dict]:
    """Metrics per site (see the module docstring) over up to ``max_tokens`` text tokens of ``data``."""
    import nnsight

    validate.integer("--max-tokens", max_tokens, 1)
    validate.integer("--batch-size", batch_size, 1)
    validate.integer("context length", ctx, 2)
    lm.check_positions(ctx)
    check_fits(batch_size * ctx * (int(lm.config.vocab_size) * 4 * 3 + lm.d_model * (lm.n_layers + 1) * 4),
               f"evaluating batches of {batch_size:,} rows of {ctx:,} tokens", lm.device)
    sites = {str(s): s for s in lm.sites(list(saes))}
    follow_model(saes, lm)
    for name, site in sites.items():
        lm.check_sae(site, saes[name])
    ordered = sorted(sites.values(), key=lambda s: s.order)
    dev = lm.device
    acc = {name: {"n": 0, "sq_err": 0.0, "sum_x": torch.zeros(lm.width(s), dtype=torch.float64), "sum_sq": 0.0,
                  "l0": 0.0, "fires": torch.zeros(saes[name].cfg.d_sae, dtype=torch.float64),
                  "ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0} for name, s in sites.items()}
    ce_clean, n_scored, n_tokens = 0.0, 0, 0
    rows = iter_rows(iter_documents(data), lm.tokenizer, ctx)
    bar = tqdm(total=max_tokens, unit="tok", desc="eval", disable=not progress)
    for b in iter_batches(rows, batch_size, ctx, pad_token_id(lm.tokenizer)):
        ids, keep = b.input_ids.to(dev), b.keep.to(dev)
        inputs = {"input_ids": ids, "attention_mask": b.attention_mask.to(dev)}
        scored = keep[:, 1:]
        with torch.no_grad():
            hs: list[torch.Tensor] = []  # filled inside the trace: only saved values and outer objects leave it
            with lm.trace(inputs):
                for s in ordered:
                    hs.append(nnsight.save(lm.site_value(s)))
                clean_logits = nnsight.save(lm.nn.output.logits)
            clean_logp = torch.log_softmax(clean_logits[:, :-1].float(), -1)[scored]
            ce_clean += float(_ce(clean_logits, ids, scored).sum())
            for site, h in zip(ordered, hs):
                name, sae, a = str(site), saes[str(site)], acc[str(site)]
                x = h[keep].float()
                f = sae.encode(x)
                x_hat = sae.reconstruct(x, f)
                a["n"] += len(x)
                a["sq_err"] += float((x_hat - x).pow(2).sum())
                a["sum_x"] += x.double().sum(0).cpu()
                a["sum_sq"] += float(x.double().pow(2).sum())
                a["l0"] += float((f > 0).sum())
                a["fires"] += (f > 0).sum(0).double().cpu()
                recon = torch.zeros_like(h)
                recon[keep] = x_hat.to(h.dtype)
                env = lm.envoy(site)
                with lm.trace(inputs):
                    _replace(env, lambda hid, recon=recon: torch.where(keep[..., None], recon, hid))
                    spliced = nnsight.save(lm.nn.output.logits)
                with lm.trace(inputs):
                    _replace(env, lambda hid: torch.where(keep[..., None], torch.zeros_like(hid), hid))
                    zeroed = nnsight.save(lm.nn.output.logits)
                a["ce_spliced"] += float(_ce(spliced, ids, scored).sum())
                a["ce_zero"] += float(_ce(zeroed, ids, scored).sum())
                sp_logp = torch.log_softmax(spliced[:, :-1].float(), -1)[scored]
                a["kl"] += float((clean_logp.exp() * (clean_logp - sp_logp)).sum())
        n_scored += int(scored.sum())
        n_tokens += int(keep.sum())
        bar.update(int(keep.sum()))
        if n_tokens >= max_tokens:
            break
    bar.close()
    if n_tokens == 0 or n_scored == 0:
        raise ScSteerError(f"data {data!r} gave no tokens to evaluate on")
    results = {}
    ce_clean /= n_scored
    for name, a in acc.items():
        n = a["n"]
        total_var = a["sum_sq"] - float((a["sum_x"] ** 2).sum()) / n
        fvu = a["sq_err"] / total_var
        ce_s, ce_z = a["ce_spliced"] / n_scored, a["ce_zero"] / n_scored
        freq = a["fires"] / n
        results[name] = {
            "n_tokens": n, "l0": a["l0"] / n, "fvu": fvu, "explained_variance": 1 - fvu,
            "dead_frac": float((a["fires"] == 0).double().mean()),
            "dense_frac": float((freq > dense_threshold).double().mean()),
            "ce_clean": ce_clean, "ce_spliced": ce_s, "ce_zero": ce_z,
            "ce_recovered": (ce_z - ce_s) / (ce_z - ce_clean) if ce_z != ce_clean else float("nan"),
            "kl": a["kl"] / n_scored, "d_sae": saes[name].cfg.d_sae, "architecture": saes[name].cfg.architecture,
        }
    return results


def markdown_table(results: dict[str, dict]) -> str:
    head = ("| site | arch | d_sae | L0 | FVU | explained var. | dead | dense | CE clean | CE spliced | CE zero "
            "| CE recovered | KL |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {s} | {r['architecture']} | {r['d_sae']} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['explained_variance']:.3f} "
        f"| {100 * r['dead_frac']:.1f}% | {100 * r['dense_frac']:.1f}% | {r['ce_clean']:.3f} | {r['ce_spliced']:.3f} "
        f"| {r['ce_zero']:.3f} | {100 * r['ce_recovered']:.1f}% | {r['kl']:.4f} |\n" for s, r in results.items())
    return head + rows


def write_results(results: dict[str, dict], out: str | Path, meta: dict | None = None) -> tuple[Path, Path]:
    """``eval.json`` and ``eval.md`` in ``out`` (atomic writes)."""
    out = Path(out)
    make_dir(out)
    paths = (out / rundir.EVAL_JSON, out / rundir.EVAL_MD)
    texts = (to_json({"meta": meta or {}, "sites": results}, indent=1),
             f"# SAE evaluation\n\n{json.dumps(meta or {})}\n\n" + markdown_table(results))
    for p, t in zip(paths, texts):
        atomic_write_text(p, t)
    return paths
