"""Where training batches come from: an in-memory tensor, an activation collection on disk, or the
model itself (no disk cache).

A ``BatchSource`` maps a start step to an iterator of ``{site: [batch, d]}`` from that step on. Every
source is a pure function of (seed, step), so a resumed run replays the stream up to its checkpoint
and ends where an uninterrupted one would.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch

from ..activations import kept, run_sites, text_rows
from ..data import iter_batches, iter_documents, iter_rows, pad_token_id
from ..devices import host_buffer
from ..errors import ScSteerError

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
                 buffer_tokens: int = 1 << 17, buffer_bytes: int = 8 << 30, run_sites_of: list | None = None,
                 buffer_dtype: torch.dtype | None = None) -> BatchSource:
    """Activations straight from the model (no disk cache), shuffled in a host buffer of ``buffer_tokens``
    tokens per site, fewer where all sites together would pass ``buffer_bytes`` (kept and handed out in
    ``buffer_dtype``, by default the model's: the trainer casts on its device; bfloat16 halves the
    buffer and rounds each value by at most 2^-9 of itself). ``run_sites_of`` is the whole run's sites
    where ``sites`` is one rank's share: the buffer is sized for the run, so every rank draws the same
    tokens."""
    buffer_dtype = buffer_dtype or lm.dtype
    per_token = sum(lm.width(s) for s in (run_sites_of or sites)) * torch.empty((), dtype=buffer_dtype).element_size()
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
                    buf[str(s)] = torch.empty(cap, rows.shape[1], dtype=buffer_dtype)
                    staging[str(s)] = host_buffer((rows_per_pass * ctx, rows.shape[1]), rows.dtype, rows.device)
                stage = staging[str(s)][:len(where)]
                stage.copy_(rows)                      # blocking: the rows are on the host when it returns
                buf[str(s)].index_copy_(0, slots, stage.to(buffer_dtype))
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
