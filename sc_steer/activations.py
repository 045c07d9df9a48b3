"""Collect activations at many sites in one nnsight pass per batch, to resumable safetensors shards.

Layout of a collection folder (the files: ``shards.py``; reading them: ``store.py``)::

    manifest.json                 config, model fingerprint, per-site width and mean norm, shard list
    shards/shard_00000.safetensors  "act.{site}" [n, d] per site, plus "tokens", "doc", "row", "pos" [n]

Only real text tokens are stored (no BOS, separators or padding). A killed collection keeps every
finished shard; rerunning the same command redoes only the partial one. Shards are cut at batch
boundaries, so a resumed run produces exactly the shards an uninterrupted run would.

Under torchrun (N processes) batch j of the row stream goes to rank j mod N: every rank tokenizes
the whole stream (cheap; it counts tokens, so ``max_tokens`` ends the collection on the same batch as
one process would) and runs the model on its own batches only. Rank r writes
``shards/rank{r}-of-{N}_shard_*.safetensors`` listed in ``manifest.rank{r}-of-{N}.json``, resumable on
its own; at the end rank 0 merges them into ``manifest.json``. The merged collection holds the same
tokens, with the same activations, as a one-process collection (shards ordered by rank, not by row).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import validate
from .data import TokenBatch, data_fingerprint, iter_batches, iter_documents, iter_rows, pad_token_id, prefetch
from .devices import DTYPES, check_fits, to_device
from .distributed import LOCAL, Dist
from .errors import ScSteerError
from .files import make_dir, read_json
from .models import LM
from .rundir import claim_folder
from .shards import (FORMAT, MANIFEST, ShardBuffer, ShardWriter, manifest_name, shard_capacity, shard_prefix,
                     write_manifest)
from .sites import Site
from .version import __version__


def run_sites(lm: LM, batch: TokenBatch, sites: list[Site]) -> dict[Site, torch.Tensor]:
    """One forward pass through nnsight returning ``[B, T, d]`` activations at every site.

    The forward stops right after the last requested site, so later blocks and the unembedding
    are not computed.
    """
    import nnsight

    ordered = sorted(sites, key=lambda s: s.order)
    inputs = {"input_ids": to_device(batch.input_ids, lm.device),
              "attention_mask": to_device(batch.attention_mask, lm.device)}
    saved = []
    with torch.no_grad(), lm.trace(inputs) as tracer:
        for s in ordered:
            saved.append(nnsight.save(lm.site_value(s)))
        tracer.stop()
    return dict(zip(ordered, saved))


def text_rows(batch: TokenBatch) -> torch.Tensor:
    """Flat indices of the batch's text tokens (``keep``), for :func:`kept`."""
    return batch.keep.reshape(-1).nonzero().squeeze(1)


def kept(acts: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``[n, d]``: the rows of ``acts [B, T, d]`` at the flat indices ``where``, gathered on acts' device
    (no boolean mask, so no host sync)."""
    return acts.reshape(-1, acts.shape[-1]).index_select(0, to_device(where, acts.device))


@dataclass(frozen=True)
class CollectConfig:
    """Everything that determines a collection's contents; a rerun must match it to resume."""

    data: str
    sites: tuple[str, ...]
    ctx: int = 256
    batch_size: int = 16
    max_tokens: int | None = None
    shard_tokens: int = 1 << 14     # small shards: writes overlap the forward sooner, and the last one is short
    shard_bytes: int = 1 << 28     # a shard of many wide sites is cut earlier
    store_dtype: str | None = None  # default: the model's dtype
    packing: str = "pad"
    prepend_bos: bool = True
    field: str = "text"
    split: str = "file"


def _check_config(cfg: CollectConfig) -> None:
    validate.integer("context length", cfg.ctx, 2)
    validate.integer("batch size", cfg.batch_size, 1)
    if cfg.max_tokens is not None:
        validate.integer("max tokens", cfg.max_tokens, 1)
    validate.integer("shard tokens", cfg.shard_tokens, 1)
    validate.integer("shard bytes", cfg.shard_bytes, 1)
    if cfg.store_dtype is not None:
        validate.choice("store dtype", cfg.store_dtype, DTYPES)


def _prepare_folder(out: Path, header: dict) -> dict:
    """Start a new manifest, or reload a matching unfinished one. Foreign folders are refused."""
    old = claim_folder(out, MANIFEST, {k: header[k] for k in ("format", "config", "model", "dataset")},
                       kind="collection", forceable=False)
    if old is not None:
        if old.get("status") != "complete" and old.get("ranks", 1) != header.get("ranks", 1):
            raise ScSteerError(f"output folder {str(out)!r} holds a collection started with {old.get('ranks', 1)} "
                               f"process(es); resume it with the same number (this run has {header.get('ranks', 1)})")
        return old
    make_dir(out)
    return {**header, "status": "running", "shards": []}


def collect(lm: LM, sites: list[Site] | str, data: str, out: str | Path, *, progress: bool = True,
            dist: Dist = LOCAL, **options) -> dict:
    """Collect activations for ``sites`` over the documents of ``data`` into ``out``; return the manifest.

    ``options`` are the fields of :class:`CollectConfig` (ctx, batch_size, max_tokens, ...). Rerunning
    with the same arguments after an interruption resumes; a finished folder is returned as is. Under
    torchrun ``dist`` shares the batches out over the ranks (see the module's docstring).
    """
    if isinstance(sites, str) or not all(isinstance(s, Site) for s in sites):
        sites = lm.sites(sites)
    for s in sites:
        lm.module_path(s)  # checks the layer exists
    sites = sorted(sites, key=lambda s: s.order)
    cfg = CollectConfig(data=data, sites=tuple(map(str, sites)), **options)
    _check_config(cfg)
    lm.check_positions(cfg.ctx)
    store_dtype = DTYPES[cfg.store_dtype] if cfg.store_dtype else lm.dtype
    width = sum(lm.width(s) for s in sites) + lm.d_model * (sites[-1].layer + 1)   # saved sites, hidden states
    check_fits(cfg.batch_size * cfg.ctx * width * 4 * 2, f"collecting batches of {cfg.batch_size:,} rows of "
               f"{cfg.ctx:,} tokens", lm.device)
    out = Path(out)
    docs = iter_documents(data, field=cfg.field, split=cfg.split)  # a bad source fails here, before any write
    header = {"format": FORMAT, "config": cfg.__dict__ | {"sites": list(cfg.sites)}, "model": lm.fingerprint(),
              "dataset": {"spec": data, "sha256": data_fingerprint(data)}}
    if dist.active:
        header["ranks"] = dist.world
        dist.agree(header, "the collection settings")
    main = dist.main_first(lambda: _prepare_folder(out, header), "checking the output folder")
    if main["status"] == "complete":
        return main
    if dist.is_main:
        write_manifest(out, main)
    dist.barrier("preparing the output folder")
    manifest = main if not dist.active else _rank_manifest(out, header, dist)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    done = {s["file"] for s in manifest["shards"]}
    prefix = shard_prefix(manifest)
    for f in shard_dir.iterdir():  # a partial shard from a killed run (of this rank)
        if f.name not in done and (prefix in f.name if dist.active else True):
            f.unlink()
    if manifest["status"] != "complete":
        _collect_batches(lm, sites, docs, cfg, store_dtype, out, manifest, dist, progress)
    if not dist.active:
        if not manifest["shards"]:
            raise ScSteerError(f"data {data!r} produced no tokens to collect")
        _finish(manifest, lm, sites)
        write_manifest(out, manifest)
        return manifest
    manifest["status"] = "complete"
    write_manifest(out, manifest)
    dist.barrier("waiting for every rank to finish collecting")
    dist.main_first(lambda: _merge(out, main, sites, lm), "merging the ranks' manifests")
    return read_json(out / MANIFEST, "the merged manifest")


def _collect_batches(lm: LM, sites: list[Site], docs, cfg: CollectConfig, store_dtype: torch.dtype, out: Path,
                     manifest: dict, dist: Dist, progress: bool) -> None:
    """Run the model on this rank's batches (all of them with one process) from where the manifest
    stops, writing shards, until the whole stream holds ``max_tokens``."""
    resume_row = manifest["shards"][-1]["rows_end"] if manifest["shards"] else 0
    # one process skips straight to its resume row; ranks count every batch from the start (tokenizer only)
    start_row = 0 if dist.active else resume_row
    n_tokens = 0 if dist.active else sum(s["n_tokens"] for s in manifest["shards"])
    rows = iter_rows(docs, lm.tokenizer, cfg.ctx, prepend_bos=cfg.prepend_bos, packing=cfg.packing)
    batches = prefetch(iter_batches(rows, cfg.batch_size, cfg.ctx, pad_token_id(lm.tokenizer), start_row=start_row))
    bar = tqdm(total=cfg.max_tokens, initial=n_tokens, unit="tok", desc="collect", disable=not (progress and dist.is_main))
    if cfg.max_tokens is not None and n_tokens >= cfg.max_tokens:
        batches = prefetch(())  # killed after the last shard was listed: only the manifest is left to finish
    widths = {str(s): lm.width(s) for s in sites}
    cap = shard_capacity(cfg.shard_tokens, cfg.shard_bytes, widths, store_dtype)
    writer = ShardWriter(out, manifest)
    shard = None
    try:
        for batch in batches:
            first = int(batch.row[0])
            if first // cfg.batch_size % dist.world == dist.rank and first >= resume_row:
                if shard is None:
                    shard = ShardBuffer(widths, cap + cfg.batch_size * cfg.ctx, store_dtype, lm.device)
                where = text_rows(batch)
                shard.add(batch, where, {str(s): kept(a, where) for s, a in run_sites(lm, batch, sites).items()})
            n_new = int(batch.keep.sum())
            n_tokens += n_new
            bar.update(n_new)
            reached = cfg.max_tokens is not None and n_tokens >= cfg.max_tokens
            if shard is not None and (shard.n >= cap or reached):
                writer.put(shard)
                shard = None
            if reached:
                break
        if shard is not None and shard.n:
            writer.put(shard)
    finally:
        batches.close()  # stops the tokenizing thread
        writer.close()  # waits for queued shards (also when interrupted: each is whole or absent)
        bar.close()


def _rank_manifest(out: Path, header: dict, dist: Dist) -> dict:
    """This rank's own progress: reloaded when it matches the run, else started afresh."""
    fresh = {**header, "rank": {"rank": dist.rank, "world": dist.world}, "status": "running", "shards": []}
    path = out / manifest_name(fresh)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if isinstance(old, dict) and all(old.get(k) == v for k, v in fresh.items() if k not in ("status", "shards")):
            return old
    write_manifest(out, fresh)
    return fresh


def _merge(out: Path, main: dict, sites: list[Site], lm: LM) -> None:
    """Rank 0: the ranks' shards listed in one manifest.json, in rank order, marked complete."""
    world = main["ranks"]
    parts = [read_json(out / manifest_name({"rank": {"rank": r, "world": world}}), "a rank's manifest")
             for r in range(world)]
    merged = {**main, "shards": [s for p in parts for s in p["shards"]]}
    if not merged["shards"]:
        raise ScSteerError(f"data {main['dataset']['spec']!r} produced no tokens to collect")
    _finish(merged, lm, sites)
    write_manifest(out, merged)


def _finish(manifest: dict, lm: LM, sites: list[Site]) -> None:
    """Per-site widths, modules and mean norms, token and row counts: the manifest of a finished collection."""
    n = sum(s["n_tokens"] for s in manifest["shards"])
    manifest["sites"] = {str(s): {"d": lm.width(s), "module": lm.module_path(s),
                                  "mean_norm": sum(sh["norm_sums"][str(s)] for sh in manifest["shards"]) / n}
                         for s in sites}
    manifest["n_tokens"] = n
    manifest["n_rows"] = max(s["rows_end"] for s in manifest["shards"])   # ranks' shards interleave
    manifest["dtype"] = manifest["config"]["store_dtype"] or manifest["model"]["dtype"]
    manifest["versions"] = _versions()
    manifest["status"] = "complete"


def _versions() -> dict:
    import nnsight
    import transformers

    return {"sc_steer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "nnsight": getattr(nnsight, "__version__", "unknown")}
