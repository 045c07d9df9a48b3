"""The training log of a run (``train_log.jsonl``: one JSON line per logged step and site) and the
curves drawn from it (``training_curves.png``).

Under ``parallel="layers"`` each rank writes its own log and rank 0 merges them at the end into the
order a one-process run writes. On resume, lines written after the checkpoint's step (and a line cut
short by a kill) are dropped, so the log ends where the resumed run continues.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import atomic_write, atomic_write_text
from ..rundir import TRAIN_LOG


def rank_log_name(rank: int, world: int) -> str:
    return f"train_log.rank{rank}-of-{world}.jsonl"


def line_step(line: str) -> float:
    """The step of a log line; a line cut short by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def trim_log(path: Path, step: int) -> None:
    """Keep the lines of steps up to ``step`` (the checkpoint a run resumes from)."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if line_step(ln) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def merge_logs(out: Path, world: int, sites: list[str]) -> None:
    """The ranks' logs as one, in the order a one-process run writes it (by step, then site)."""
    order = {s: i for i, s in enumerate(sites)}
    rows = []
    for r in range(world):
        path = out / rank_log_name(r, world)
        if path.exists():
            rows += [ln for ln in path.read_text().splitlines() if math.isfinite(line_step(ln))]
    rows.sort(key=lambda ln: (line_step(ln), order.get(json.loads(ln).get("site"), len(order))))
    atomic_write_text(out / TRAIN_LOG, "".join(ln + "\n" for ln in rows))


def plot_training_curves(log_path: Path, png: Path) -> None:
    """Loss, FVU, L0 and dead fraction per site against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    if not rows:
        return
    sites = sorted({r["site"] for r in rows}, key=lambda s: (len(s), s))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for key, ax in zip(("loss", "fvu", "l0", "dead"), axes):
        for site in sites:
            pts = [(r["step"], r[key]) for r in rows if r["site"] == site]
            ax.plot(*zip(*pts), label=site, lw=1)
        ax.set_title({"loss": "training loss", "fvu": "FVU (batch)", "l0": "L0", "dead": "dead fraction"}[key])
        ax.set_xlabel("step")
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
