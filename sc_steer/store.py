"""Read a finished activation collection: whole sites, token metadata, or shuffled streaming batches
(bounded memory: a collection larger than RAM streams through a shuffle buffer)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ScSteerError
from .files import read_json
from .shards import FORMAT, MANIFEST, META_KEYS
from .sites import Site


class ActivationStore:
    """Read a finished collection: whole sites, token metadata, or shuffled streaming batches."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.exists():
            raise ScSteerError(f"{str(self.path)!r} is not an activation collection (no {MANIFEST})")
        self.manifest = read_json(mf, "the manifest of an activation collection")
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
