"""Several processes, one job: torch.distributed set up from ``torchrun``'s environment.

``torchrun --nproc_per_node N $(which sc-steer) train ...`` starts N copies of the CLI with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous address in the environment; ``from_env`` joins them into
one process group (NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``; gloo on CPU). A plain run is
``LOCAL``: rank 0 of 1, every collective a no-op.

Every collective has a timeout (``SC_STEER_DIST_TIMEOUT`` seconds, default 1800) and is wrapped so that a
rank that died or stopped answering makes the others stop with one clear line instead of hanging or
printing a backend traceback.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import ScSteerError

T = TypeVar("T")
TIMEOUT_ENV = "SC_STEER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world``; ``LOCAL`` when there is one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # DistBackendError, DistNetworkError and gloo/NCCL timeouts are RuntimeErrors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". This is typically")[0][:300]
            raise ScSteerError(f"{what} failed on {self}: another rank stopped or is not answering ({first}); "
                               "see that rank's output. Finished files and checkpoints are kept: rerun the same "
                               "command (train: with --resume) to continue") from None

    def barrier(self, what: str) -> None:
        """Wait for every rank (gloo: the ranks that fail to arrive are named)."""
        if not self.active:
            return
        import torch.distributed as dist

        with self._collective(what):
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=_timeout(), wait_all_ranks=True)
            else:
                dist.barrier()

    def all_reduce_(self, t: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        """In place: the sum (or max / min) of ``t`` over ranks, identical on every rank."""
        if self.active:
            import torch.distributed as dist

            with self._collective(what):
                dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                       "min": dist.ReduceOp.MIN}[op])
        return t

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all ranks), in rank order."""
        if not self.active:
            return [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        with self._collective(what):
            dist.all_gather(out, t.contiguous())
        return out

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` (picklable), on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        with self._collective(what):
            dist.broadcast_object_list(box, src=0, device=_object_device())
        return box[0]

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        with self._collective(what):
            dist.all_gather_object(out, obj)
        return out

    def main_first(self, fn: Callable[[], T], what: str) -> T | None:
        """Run ``fn`` on rank 0 only (e.g. checks and writes of shared files) and hand its result (picklable)
        to every rank, or raise rank 0's error on every rank, so that no rank waits for one that gave up."""
        error, result = None, None
        if self.is_main:
            try:
                result = fn()
            except ScSteerError as e:
                error = str(e)
        error, result = self.broadcast_object((error, result), what)
        if error is not None:
            raise ScSteerError(error if self.is_main else f"{error} (reported by rank 0)")
        return result

    def agree(self, value: Any, what: str) -> None:
        """Stop with a clear error where ranks were started with different settings."""
        values = self.gather_objects(value, what)
        if any(v != values[0] for v in values):
            raise ScSteerError(f"{what}: the ranks disagree ({', '.join(f'rank {i}: {v}' for i, v in enumerate(values))}); "
                               "start every rank with the same command")


LOCAL = Dist()


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ScSteerError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if not seconds > 0:
        raise ScSteerError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


def _object_device() -> torch.device | None:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def launched() -> bool:
    """Whether this process was started by torchrun (or by hand with its variables) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def from_env(device: str | torch.device = "cpu") -> tuple[Dist, torch.device]:
    """Join the job torchrun started (once per process) and return this rank's ``Dist`` and device.

    With one process: ``LOCAL`` and ``device`` unchanged. With several: NCCL and ``cuda:LOCAL_RANK``
    where ``device`` is CUDA (give ``--device cuda``: each rank takes its own GPU), gloo on CPU."""
    from .devices import resolve_device

    if not launched():
        return LOCAL, resolve_device(device)
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ScSteerError("WORLD_SIZE is set but RANK is missing or not a number: start sc-steer with torchrun "
                           "(e.g. torchrun --nproc_per_node 2 $(which sc-steer) train ...)") from None
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        if dev.index is not None and world > 1:
            raise ScSteerError(f"--device {device}: under torchrun give --device cuda; each rank takes "
                               "cuda:LOCAL_RANK")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= n:
            raise ScSteerError(f"{Dist(rank, world, local_rank)}: needs cuda:{local_rank} but this machine has "
                               f"{n} CUDA device{'s' if n != 1 else ''}; start at most {n} processes per node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = resolve_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=_timeout(),
                                    **({"device_id": dev} if backend == "nccl" else {}))
        except (RuntimeError, ValueError) as e:
            raise ScSteerError(f"rank {rank} of {world}: could not join the other ranks "
                               f"({(str(e).strip().splitlines() or ['?'])[0][:300]}); check MASTER_ADDR / "
                               "--rdzv-endpoint and that every node runs the same torchrun command") from None
    return Dist(rank, world, local_rank), dev


def shutdown(finished: bool = True) -> None:
    """Leave the process group (at exit of the CLI), so the backend does not warn of a leak.

    A rank that finished waits at a barrier first: the last collective (rank 0 broadcasting a result)
    can return on the sender before the receiver has read it, and a gloo group torn down under a
    message still in flight aborts the process. After an error the other ranks may never arrive, so
    there is no barrier then."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            try:
                dist.barrier()
            except RuntimeError:
                pass   # a rank that already left: nothing more to wait for
        dist.destroy_process_group()


def wait_for_ranks(d: Dist, done: Callable[[int], Path], heartbeat: Callable[[int], Path], what: str,
                   poll_s: float = 0.5) -> None:
    """Wait until every rank's ``done(r)`` file exists. Ranks with unequal shares of the work finish far
    apart, so no collective timeout bounds this wait; instead a rank whose ``heartbeat(r)`` file (its
    log) has not changed for the timeout, and that is not done, is taken to have stopped."""
    import time

    limit = _timeout().total_seconds()
    while True:
        waiting = [r for r in range(d.world) if not done(r).exists()]
        if not waiting:
            return
        now = time.time()
        for r in waiting:
            beat = heartbeat(r)
            last = beat.stat().st_mtime if beat.exists() else None
            if last is not None and now - last > limit:
                raise ScSteerError(f"{what} failed on {d}: rank {r} has written nothing to {beat.name} for "
                                   f"{now - last:.0f} s ({TIMEOUT_ENV}={limit:g}) and has not finished; it "
                                   "probably stopped: see its output. Checkpoints are kept: rerun with --resume")
        time.sleep(poll_s)


def share(items: list[T], d: Dist) -> list[T]:
    """This rank's items when ``items`` are dealt out in turn (rank r takes items r, r + world, ...)."""
    return items[d.rank::d.world]


def row_range(n: int, d: Dist) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of ``n`` rows (sizes differ by at most one)."""
    return n * d.rank // d.world, n * (d.rank + 1) // d.world
