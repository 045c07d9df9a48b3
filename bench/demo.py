"""The first run as a user meets it: ``sc-steer demo`` in a fresh folder, its wall time, peak memory
and disk, per stage and in all, the quality figures, and a second call on the finished run.

    python bench/demo.py --out /tmp/bench-demo [--full] [--other-genre] [--save bench/results/demo.md]

The whole command runs under ``/usr/bin/time -v`` (wall time, maximum resident set size); the stages'
times and peaks are those the demo recorded in its ``demo.json`` (``sc_steer/usage.py``); disk is
``du`` of the run folder at the end. ``--other-genre`` adds the SAEs' FVU on text of another genre
(``bench/other_genre.py``; needs Debian's ``dict-devil``). Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"wall_s": 300, "max_rss_mib": 2048, "disk_mib": 1024, "fvu": 0.12, "l0": 32, "ce_recovered": 0.97,
           "dead_frac": 0.01, "other_fvu": 0.20}   # issue 30's bounds


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, max RSS MiB, stdout) of ``cmd`` run under /usr/bin/time -v."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = wall.groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return int(h or 0) * 3600 + int(m) * 60 + float(s), rss / 1024, r.stdout


def du_mib(path: Path) -> float:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench-demo", help="the run folder (removed first)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--other-genre", action="store_true")
    ap.add_argument("--save", help="also write the report to this file")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["sc-steer", "demo", "--out", str(out)] + (["--full"] if args.full else [])
    wall, rss, _ = timed(cmd)
    again, _, _ = timed(cmd)
    disk = du_mib(out)
    stages = json.loads((out / "demo.json").read_text())["stages"]
    ev = json.loads((out / "eval.json").read_text())
    lines = [f"# `{' '.join(cmd)}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})", "",
             "| stage | wall time | peak resident memory |", "|---|---|---|"]
    lines += [f"| {name} | {st['seconds']:.0f} s | {st['peak_rss'] / 2**20:,.0f} MiB |" for name, st in stages.items()]
    lines += [f"| **whole command** (`/usr/bin/time -v`) | **{wall:.0f} s** | **{rss:,.0f} MiB** |", "",
              f"disk: `du -sh {out}` = {disk:,.0f} MiB; the same command again on the finished run: {again:.1f} s", "",
              f"quality on {ev['meta']['max_tokens']:,} held-out tokens:", "",
              "| site | L0 | FVU | CE recovered | dead |" + (" FVU other genre |" if args.other_genre else ""),
              "|---|---|---|---|---|" + ("---|" if args.other_genre else "")]
    other = {}
    if args.other_genre:
        r = subprocess.run([sys.executable, str(Path(__file__).parent / "other_genre.py"), "--run", str(out)],
                           capture_output=True, text=True, check=True)
        for row in r.stdout.splitlines()[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            other[cells[0]] = float(cells[3])
    ok = wall <= TARGETS["wall_s"] and rss <= TARGETS["max_rss_mib"] and disk <= TARGETS["disk_mib"]
    for site, r in ev["sites"].items():
        lines.append(f"| {site} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['ce_recovered']:.1%} | {r['dead_frac']:.2%} |"
                     + (f" {other[site]:.3f} |" if other else ""))
        ok &= (r["fvu"] <= TARGETS["fvu"] and r["l0"] <= TARGETS["l0"] and r["ce_recovered"] >= TARGETS["ce_recovered"]
               and r["dead_frac"] <= TARGETS["dead_frac"] and other.get(site, 0) <= TARGETS["other_fvu"])
    lines += ["", f"within the bounds ({json.dumps(TARGETS)}): {'yes' if ok else 'NO'}"]
    report = "\n".join(lines)
    print(report)
    if args.save:
        Path(args.save).write_text(report + "\n")


if __name__ == "__main__":
    main()
