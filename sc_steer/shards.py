"""The files of an activation collection: shards and manifests, and the buffer and background writer
that fill them while the model runs.

A shard holds ``act.{site}`` ``[n, d]`` per site and the tokens' ``tokens``, ``doc``, ``row`` and
``pos``; it is written to a temporary file and renamed, and only then listed in the manifest (itself
replaced atomically), so a killed collection keeps every finished shard. Under torchrun, rank r of N
writes ``shards/rank{r}-of-{N}_shard_*.safetensors`` listed in ``manifest.rank{r}-of-{N}.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import TokenBatch
from .devices import host_buffer
from .files import atomic_write, atomic_write_text, to_json

FORMAT = "sc-steer.activations/1"
MANIFEST = "manifest.json"
META_KEYS = ("tokens", "doc", "row", "pos")


def manifest_name(manifest: dict) -> str:
    """``manifest.json``, or a rank's own ``manifest.rank{r}-of-{N}.json`` under torchrun."""
    r = manifest.get("rank")
    return MANIFEST if r is None else f"manifest.rank{r['rank']}-of-{r['world']}.json"


def shard_prefix(manifest: dict) -> str:
    r = manifest.get("rank")
    return "shard_" if r is None else f"rank{r['rank']}-of-{r['world']}_shard_"


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / manifest_name(manifest), to_json(manifest, indent=1))


def shard_capacity(shard_tokens: int, shard_bytes: int, widths: dict[str, int], dtype: torch.dtype) -> int:
    """Tokens after which a shard is cut (at the end of that batch): ``shard_tokens``, or fewer where a
    shard of all sites would pass ``shard_bytes``. A pure function of the config, so resumes cut alike."""
    per_token = sum(widths.values()) * torch.empty((), dtype=dtype).element_size()
    return max(1, min(shard_tokens, shard_bytes // per_token))


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

    def add(self, batch: TokenBatch, where: torch.Tensor, acts: dict[str, torch.Tensor]) -> None:
        """The batch's text tokens: ``where`` their flat indices in the batch (on the host), ``acts`` each
        site's rows at them ``[len(where), d]`` (on the model's device)."""
        m = len(where)
        for s, a in acts.items():
            rows = a.to(self.acts[str(s)].dtype)
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
    name = f"{shard_prefix(manifest)}{len(manifest['shards']):05d}.safetensors"
    atomic_write(out / "shards" / name,
                 lambda p: write_safetensors(p, tensors, {"format": FORMAT, "rows_end": str(shard.rows_end)}))
    manifest["shards"].append({"file": name, "n_tokens": shard.n, "rows_end": shard.rows_end,
                               "norm_sums": shard.norm_floats})
    write_manifest(out, manifest)


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
