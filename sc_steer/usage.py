"""What a job used: its wall time, its peak resident memory, and the disk its folder takes.

A stage's peak is exact when the stage raised the process's high-water mark (``VmHWM``); otherwise
it is the largest resident size a sampler saw (every ``SAMPLE_EVERY`` seconds) during the stage, a
lower bound. The high-water mark itself is never reset, so the whole process's peak (what
``/usr/bin/time -v`` reports) stays true.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
SAMPLE_EVERY = 0.05


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, KiB elsewhere


def rss_bytes() -> int:
    """The process's resident memory now (0 where /proc is missing)."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def disk_bytes(folder: str | Path) -> int:
    """Bytes the files under ``folder`` take on disk (allocated blocks, as ``du`` counts them)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:   # removed while we walked (a temp file renamed into place)
                continue
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


class Stage:
    """Times a block and reads its peak memory: ``with Stage() as s: ...`` then ``s.seconds``, ``s.peak``
    and ``s.peak_exact`` (whether the block set the process's high-water mark)."""

    def __enter__(self):
        self._before = peak_rss_bytes()
        self._seen = rss_bytes()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_EVERY):
            self._seen = max(self._seen, rss_bytes())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self._done.set()
        self._sampler.join()
        after = peak_rss_bytes()
        self.peak_exact = after > self._before
        self.peak = after if self.peak_exact else max(self._seen, rss_bytes())


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
