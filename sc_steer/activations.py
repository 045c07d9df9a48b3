"""Collect activations at many sites in one nnsight pass per batch, to resumable safetensors shards.

Layout of a collection folder::

    manifest.json                 config, model fingerprint, per-site width and mean norm, shard list
    shards/shard_00000.safetensors  "act.{site}" [n, d] per site, plus "tokens", "doc", "row", "pos" [n]

Only real text tokens are stored (no BOS, separators or padding). A shard is written to a temporary
file and renamed, and only then listed in the manifest (also replaced atomically), so a killed run
keeps every finished shard; rerunning the same command redoes only the partial one. Shards are cut
at batch boundaries, so a resumed run produces exactly the shards an uninterrupted run would.

Under torchrun (N processes) batch j of the row stream goes to rank j mod N: every rank tokenizes
the whole stream (cheap; it counts tokens, so ``max_tokens`` ends the collection on the same batch as
one process would) and runs the model on its own batches only. Rank r writes
``shards/rank{r}-of-{N}_shard_*.safetensors`` listed in ``manifest.rank{r}-of-{N}.json``, resumable on
its own; at the end rank 0 merges them into ``manifest.json``. The merged collection holds the same
tokens, with the same activations, as a one-process collection (shards ordered by rank, not by row).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .data import TokenBatch, data_fingerprint, iter_batches, iter_documents, iter_rows, pad_token_id, prefetch
from . import validate
from .devices import DTYPES, host_buffer, to_device
from .distributed import LOCAL, Dist
from .errors import ScSteerError
from .files import atomic_write, atomic_write_text, check_folder, make_dir
from .models import LM
from .sites import Site

FORMAT = "sc-steer.activations/1"
META_KEYS = ("tokens", "doc", "row", "pos")


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


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
    check_folder(out)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise ScSteerError(f"output folder {str(out)!r} has an unreadable manifest.json") from None
        keys = ("format", "config", "model", "dataset")
        differs = [k for k in keys if old.get(k) != header[k]]
        if differs:
            raise ScSteerError(f"output folder {str(out)!r} holds a different run (its {', '.join(differs)} "
                               "differ); choose another --out or delete that folder")
        if old.get("status") != "complete" and old.get("ranks", 1) != header.get("ranks", 1):
            raise ScSteerError(f"output folder {str(out)!r} holds a collection started with {old.get('ranks', 1)} "
                               f"process(es); resume it with the same number (this run has {header.get('ranks', 1)})")
        return old
    if out.exists() and any(out.iterdir()):
        raise ScSteerError(f"output folder {str(out)!r} is not empty and holds no sc-steer manifest")
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
        write_json_atomic(out / "manifest.json", main)
    dist.barrier("preparing the output folder")
    manifest = main if not dist.active else _rank_manifest(out, header, dist)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    done = {s["file"] for s in manifest["shards"]}
    prefix = _shard_prefix(manifest)
    for f in shard_dir.iterdir():  # a partial shard from a killed run (of this rank)
        if f.name not in done and (prefix in f.name if dist.active else True):
            f.unlink()
    if manifest["status"] != "complete":
        _collect_batches(lm, sites, docs, cfg, store_dtype, out, manifest, dist, progress)
    if not dist.active:
        if not manifest["shards"]:
            raise ScSteerError(f"data {data!r} produced no tokens to collect")
        _finish(manifest, lm, sites)
        write_json_atomic(out / "manifest.json", manifest)
        return manifest
    manifest["status"] = "complete"
    write_json_atomic(out / _manifest_name(manifest), manifest)
    dist.barrier("waiting for every rank to finish collecting")
    dist.main_first(lambda: _merge(out, main, sites, lm), "merging the ranks' manifests")
    return json.loads((out / "manifest.json").read_text())


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
    cap = shard_capacity(cfg, widths, store_dtype)
    writer = ShardWriter(out, manifest)
    shard = None
    try:
        for batch in batches:
            first = int(batch.row[0])
            if first // cfg.batch_size % dist.world == dist.rank and first >= resume_row:
                if shard is None:
                    shard = ShardBuffer(widths, cap + cfg.batch_size * cfg.ctx, store_dtype, lm.device)
                shard.add(batch, run_sites(lm, batch, sites))
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


def _manifest_name(manifest: dict) -> str:
    r = manifest.get("rank")
    return "manifest.json" if r is None else f"manifest.rank{r['rank']}-of-{r['world']}.json"


def _shard_prefix(manifest: dict) -> str:
    r = manifest.get("rank")
    return "shard_" if r is None else f"rank{r['rank']}-of-{r['world']}_shard_"


def _rank_manifest(out: Path, header: dict, dist: Dist) -> dict:
    """This rank's own progress: reloaded when it matches the run, else started afresh."""
    fresh = {**header, "rank": {"rank": dist.rank, "world": dist.world}, "status": "running", "shards": []}
    path = out / _manifest_name(fresh)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old and all(old.get(k) == v for k, v in fresh.items() if k not in ("status", "shards")):
            return old
    write_json_atomic(path, fresh)
    return fresh


def _merge(out: Path, main: dict, sites: list[Site], lm: LM) -> None:
    """Rank 0: the ranks' shards listed in one manifest.json, in rank order, marked complete."""
    world = main["ranks"]
    parts = [json.loads((out / _manifest_name({"rank": {"rank": r, "world": world}})).read_text()) for r in range(world)]
    merged = {**main, "shards": [s for p in parts for s in p["shards"]]}
    if not merged["shards"]:
        raise ScSteerError(f"data {main['dataset']['spec']!r} produced no tokens to collect")
    _finish(merged, lm, sites)
    write_json_atomic(out / "manifest.json", merged)


def shard_capacity(cfg: CollectConfig, widths: dict[str, int], dtype: torch.dtype) -> int:
    """Tokens after which a shard is cut (at the end of that batch): ``shard_tokens``, or fewer where a
    shard of all sites would pass ``shard_bytes``. A pure function of the config, so resumes cut alike."""
    per_token = sum(widths.values()) * torch.empty((), dtype=dtype).element_size()
    return max(1, min(cfg.shard_tokens, cfg.shard_bytes // per_token))


class ShardBuffer:
    """One shard being filled: each batch's kept tokens are gathered on the model's device and copied
    once, asynchronously, into preallocated (pinned, on CUDA) host tensors; norm sums stay on the device.
    Nothing here waits for the GPU: ``close`` marks the shard's last copy, and the writer thread waits
    for that mark (``ready``) before it reads the host tensors."""

    def __init__(self, widths: dict[str, int], capacity: int, dtype: torch.dtype, device: torch.device):
        self.device = device
        self.acts = {s: host_buffer((capacity, d), dtype, device) for s, d in widths.items()}
        self.slot = {s: i for i, s in enumerate(widths)}  # site -> its entry in norm_sums
        self.norm_sums = torch.zeros(len(widths), dtype=torch.float64, device=device)
        self.meta: dict[str, list[torch.Tensor]] = {k: [] for k in META_KEYS}
        self.n, self.rows_end = 0, 0
        self._done = None

    def add(self, batch: TokenBatch, acts: dict[Site, torch.Tensor]) -> None:
        where = text_rows(batch)
        m = len(where)
        for s, a in acts.items():
            rows = kept(a, where).to(self.acts[str(s)].dtype)
            self.norm_sums[self.slot[str(s)]] += rows.double().norm(dim=-1).sum()
            # on CUDA an event (``close``) marks when the copy has landed; other devices copy before returning
            self.acts[str(s)][self.n:self.n + m].copy_(rows, non_blocking=self.device.type == "cuda")
        for key, val in (("tokens", batch.input_ids), ("doc", batch.doc), ("pos", batch.pos),
                         ("row", batch.row[:, None].expand_as(batch.input_ids))):
            self.meta[key].append(val.reshape(-1)[where].to(torch.int64 if key == "row" else torch.int32))
        self.n += m
        self.rows_end = int(batch.row[-1]) + 1

    def close(self) -> None:
        """Queue the norm sums' copy to the host and mark the end of this shard's copies."""
        self._norms_host = host_buffer(tuple(self.norm_sums.shape), torch.float64, self.device)
        self._norms_host.copy_(self.norm_sums, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(self.device))

    def ready(self) -> None:
        """Wait until every queued copy into this shard has landed; then the host tensors are final."""
        if self._done is not None:
            self._done.synchronize()
        self.norm_floats = dict(zip(self.acts, self._norms_host.tolist()))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"act.{s}": t[:self.n] for s, t in self.acts.items()}
        return out | {k: torch.cat(v) for k, v in self.meta.items()}


class ShardWriter:
    """Writes shards on a background thread, in order, while the model runs the next batches. A shard is
    listed in the manifest only after its file is complete; at most one waits in the queue."""

    def __init__(self, out: Path, manifest: dict):
        import queue
        import threading

        self.out, self.manifest = out, manifest
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sc-steer-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (shard := self.queue.get()) is not None:
            if self.error is None:
                try:
                    _write_shard(self.out, self.manifest, shard)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, shard: ShardBuffer) -> None:
        self._check()
        shard.close()
        self.queue.put(shard)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()


def _write_shard(out: Path, manifest: dict, shard: ShardBuffer) -> None:
    shard.ready()
    tensors = shard.tensors()
    name = f"{_shard_prefix(manifest)}{len(manifest['shards']):05d}.safetensors"
    atomic_write(out / "shards" / name,
                 lambda p: write_safetensors(p, tensors, {"format": FORMAT, "rows_end": str(shard.rows_end)}))
    manifest["shards"].append({"file": name, "n_tokens": shard.n, "rows_end": shard.rows_end,
                               "norm_sums": shard.norm_floats})
    write_json_atomic(out / _manifest_name(manifest), manifest)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data), written
    straight from the tensors' memory: no intermediate copy of the data, as ``save_file`` makes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


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

    from . import __version__

    return {"sc_steer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "nnsight": getattr(nnsight, "__version__", "unknown")}


class ActivationStore:
    """Read a finished collection: whole sites, token metadata, or shuffled streaming batches."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise ScSteerError(f"{str(self.path)!r} is not an activation collection (no manifest.json)")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ScSteerError(f"{str(self.path)!r}: unknown format {self.manifest.get('format')!r}")
        if self.manifest.get("status") != "complete":
            raise ScSteerError(f"collection {str(self.path)!r} is unfinished; rerun the collect command to resume it")
        self.sites = list(self.manifest["sites"])
        self.n_tokens = int(self.manifest["n_tokens"])
        self.shards = [self.path / "shards" / s["file"] for s in self.manifest["shards"]]

    def check_batch_size(self, batch_size: int) -> None:
        """Full batches need at least ``batch_size`` tokens in the collection."""
        if self.n_tokens < batch_size:
            raise ScSteerError(f"the collection {str(self.path)!r} holds {self.n_tokens:,} tokens, fewer than one "
                               f"batch of {batch_size:,}: collect more tokens or use a smaller --batch-size")

    def _check_site(self, site: str | Site) -> str:
        name = str(site)
        if name not in self.manifest["sites"]:
            raise ScSteerError(f"site {name!r} was not collected in {str(self.path)!r} (have: {', '.join(self.sites)})")
        return name

    def d(self, site: str | Site) -> int:
        return int(self.manifest["sites"][self._check_site(site)]["d"])

    def mean_norm(self, site: str | Site) -> float:
        return float(self.manifest["sites"][self._check_site(site)]["mean_norm"])

    def _read(self, shard: Path, keys: list[str]) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(shard), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:  # noqa: BLE001 - truncated or corrupt file
            raise ScSteerError(f"shard {str(shard)!r} is unreadable ({str(e).splitlines()[0]}); "
                               "delete it and its manifest entry, then rerun collect") from None

    def load(self, site: str | Site, max_tokens: int | None = None) -> torch.Tensor:
        """All stored activations of one site, ``[n, d]``, in collection order."""
        key = f"act.{self._check_site(site)}"
        parts, n = [], 0
        for shard in self.shards:
            parts.append(self._read(shard, [key])[key])
            n += len(parts[-1])
            if max_tokens is not None and n >= max_tokens:
                break
        return torch.cat(parts)[:max_tokens]

    def metadata(self) -> dict[str, torch.Tensor]:
        """``tokens``, ``doc``, ``row`` and ``pos`` of every stored token, in collection order."""
        parts = [self._read(s, list(META_KEYS)) for s in self.shards]
        return {k: torch.cat([p[k] for p in parts]) for k in META_KEYS}

    def batches(self, sites: list[str] | str, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                buffer_tokens: int = 1 << 18, epochs: int = 1, dtype: torch.dtype = torch.float32,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Stream ``{site: [batch, d]}`` over the collection, all sites aligned on the same tokens.

        Shuffling is two-level (shard order, then a buffer of ``buffer_tokens`` tokens), so memory
        stays bounded; every token is yielded exactly once per epoch.
        """
        names = [self._check_site(s) for s in ([sites] if isinstance(sites, str) else sites)]
        keys = [f"act.{s}" for s in names]
        if batch_size < 1:
            raise ScSteerError(f"batch size {batch_size!r}: expected an integer >= 1")
        if drop_last:  # with fewer tokens than a batch every epoch would yield nothing, forever
            self.check_batch_size(batch_size)
        for epoch in range(epochs):
            rng = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shards), generator=rng).tolist() if shuffle else range(len(self.shards))
            pool: dict[str, torch.Tensor] | None = None
            for i in order:
                part = self._read(self.shards[i], keys)
                pool = part if pool is None else {k: torch.cat([pool[k], part[k]]) for k in keys}
                if len(pool[keys[0]]) < buffer_tokens:
                    continue
                if shuffle:
                    perm = torch.randperm(len(pool[keys[0]]), generator=rng)
                    pool = {k: v[perm] for k, v in pool.items()}
                full = len(pool[keys[0]]) // batch_size * batch_size
                for j in range(0, full, batch_size):
                    yield {s: pool[k][j:j + batch_size].to(dtype) for s, k in zip(names, keys)}
                pool = {k: v[full:] for k, v in pool.items()}
            if pool is not None and len(pool[keys[0]]):
                if shuffle:
                    perm = torch.randperm(len(pool[keys[0]]), generator=rng)
                    pool = {k: v[perm] for k, v in pool.items()}
                n = len(pool[keys[0]])
                stop = n // batch_size * batch_size if drop_last else n
                for j in range(0, stop, batch_size):
                    yield {s: pool[k][j:j + batch_size].to(dtype) for s, k in zip(names, keys)}
