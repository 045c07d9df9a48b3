"""Where tensors live, decided in one place: the model's device decides, SAEs follow the model.

* ``resolve_device`` / ``resolve_dtype`` turn the user's ``--device`` / ``--dtype`` into torch objects,
  with one-line errors for devices this machine does not have.
* ``follow_model`` moves SAEs onto the model's device (in place, like ``nn.Module.to``) and keeps
  their own dtype: an fp32 SAE on a bf16 model computes in fp32 (``SAE.pre_acts`` casts its input)
  and every caller casts what it writes back into the model to the model's dtype.

Every function that takes a model and SAEs calls ``follow_model`` first, so SAEs loaded on the CPU
(the default of ``load_sae``) work on a model on the GPU.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch

from .errors import ScSteerError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

T = TypeVar("T")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` (or any device type torch knows), checked against this machine."""
    if spec is None or spec == "":
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ScSteerError(f"--device {spec!r}: expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ScSteerError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}"
                               f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'}); "
                               "use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ScSteerError(f"--device {spec}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                               f"(cuda:0{f'-cuda:{n - 1}' if n > 1 else ''})")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ScSteerError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(spec: str | torch.dtype) -> torch.dtype | str:
    """float32, float16, bfloat16 (a torch dtype), or "auto" (the checkpoint's own)."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise ScSteerError(f"--dtype {spec}: expected one of {', '.join(DTYPES)} or auto")
        return spec
    if spec == "auto":
        return "auto"
    if spec not in DTYPES:
        raise ScSteerError(f"--dtype {spec!r}: expected one of {', '.join(DTYPES)} or auto")
    return DTYPES[spec]


def follow_model(saes: T, model) -> T:
    """Move one SAE, or a dict / tuple of them, onto the device of ``model`` (an ``LM``, or anything with
    a ``device``), dtype kept; returns its argument.

    A remote (NDIF) model lives on the meta device here: its SAEs stay where they are.
    """
    dev = model.device
    if dev.type == "meta":
        return saes
    items = saes.values() if isinstance(saes, Mapping) else saes if isinstance(saes, (tuple, list)) else [saes]
    for sae in items:
        if sae is not None and sae.W_enc.device != dev:
            sae.to(dev)
    return saes


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait for the GPU's queued work: on CUDA it is
    staged in pinned memory and copied asynchronously (a plain ``.to`` synchronises the stream)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, for_device: torch.device) -> torch.Tensor:
    """An empty host tensor that ``for_device`` copies into: pinned for CUDA (fast asynchronous copies;
    torch's caching host allocator reuses freed blocks, so repeated shards pin no new memory)."""
    return torch.empty(shape, dtype=dtype, pin_memory=for_device.type == "cuda")


def release_host_memory(collect: bool = False) -> None:
    """Hand the host memory freed since the last call back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere), first collecting garbage cycles when ``collect`` (between stages: a finished
    training's batch source, held in a cycle, was 0.7 GB of the demo). glibc keeps freed blocks for
    reuse; the sizes a training step allocates leave them scattered, and on the demo they held about
    0.5 GB more than the job itself."""
    global _TRIM
    if collect:
        gc.collect()
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


@contextmanager
def host_memory_returned(every: float = 0.2) -> Iterator[None]:
    """While the block runs, a background thread calls ``release_host_memory`` every ``every`` seconds
    (inside steps too: between steps is too late, the blocks pile up within one). Nested blocks share
    the outermost one's thread."""
    global _TRIMMERS
    _TRIMMERS += 1
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every):
            release_host_memory()

    thread = threading.Thread(target=loop, daemon=True, name="release-host-memory") if _TRIMMERS == 1 else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        _TRIMMERS -= 1
        done.set()
        if thread:
            thread.join()
        release_host_memory()


_TRIMMERS = 0


def memory_of(device: torch.device) -> int | None:
    """The memory of ``device`` in bytes (the host's RAM for the CPU), or None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(n_bytes: float, what: str, device: torch.device | str = "cpu") -> None:
    """A one-line error, before anything is allocated or written, where ``what`` would need more memory than
    ``device`` has at all (a typo such as ``--expansion 10000`` or ``--top-n 10**9``, not a tight fit)."""
    device = torch.device(device)
    total = memory_of(device)
    if total is not None and n_bytes > total:
        raise ScSteerError(f"{what} would need {n_bytes / 2 ** 30:,.1f} GiB, more than the "
                           f"{total / 2 ** 30:,.1f} GiB of memory of {device}")
