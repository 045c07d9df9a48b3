"""The demo SAEs on text of another genre: Ambrose Bierce's *The Devil's Dictionary* (1881-1906).

    apt-get install -y dict-devil
    python bench/other_genre.py --run runs/demo [--out /tmp/devil.jsonl]

The demo model and its SAEs saw the King James Bible, Shakespeare and WordNet glosses; Bierce's
satirical definitions, anecdotes and verse in American English of 1900 appear in none of them. The
text is in the public domain (copyright expired; Debian's ``dict-devil`` says so in its copyright
file). Writes one JSON line per 10 entries, then runs ``sc-steer eval`` on it and on the demo's own
held-out slice and prints both tables side by side.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

DICT = Path("/usr/share/dictd/devil.dict.dz")
INDEX = Path("/usr/share/dictd/devil.index")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def devils_dictionary(out: Path, per_doc: int = 10) -> int:
    """Write the dictionary's entries (not its database headers) as JSON lines; returns the count."""
    if not DICT.exists():
        sys.exit(f"{DICT} is missing: apt-get install -y dict-devil")
    raw = gzip.decompress(DICT.read_bytes())   # dictzip is gzip with an index in the header
    entries = []
    for line in INDEX.read_text().splitlines():
        word, off, length = line.split("\t")
        if word.startswith("00database"):
            continue
        text = raw[_b64(off):_b64(off) + _b64(length)].decode("utf-8").strip()
        entries.append(" ".join(text.split()))
    docs = [{"doc": i // per_doc, "source": "devils-dictionary", "text": "\n".join(entries[i:i + per_doc])}
            for i in range(0, len(entries), per_doc)]
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return len(entries)


def eval_table(run: str, data: str, max_tokens: int) -> dict:
    subprocess.run(["sc-steer", "eval", "--run", run, "--data", data, "--max-tokens", str(max_tokens)],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(run) / "eval.json").read_text())["sites"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default="/tmp/devils_dictionary.jsonl")
    ap.add_argument("--max-tokens", type=int, default=50_000)
    args = ap.parse_args()
    n = devils_dictionary(Path(args.out))
    print(f"{n} entries -> {args.out}", file=sys.stderr)
    other = eval_table(args.run, args.out, args.max_tokens)
    home = eval_table(args.run, "demo:heldout", args.max_tokens)   # leaves eval.json as the demo wrote it
    print("| site | L0 | FVU held-out | FVU other genre | CE recovered held-out | CE recovered other genre "
          "| dead | dense |")
    print("|---|---|---|---|---|---|---|---|")
    for site in home:
        h, o = home[site], other[site]
        print(f"| {site} | {h['l0']:.1f} | {h['fvu']:.3f} | {o['fvu']:.3f} | {h['ce_recovered']:.1%} "
              f"| {o['ce_recovered']:.1%} | {h['dead_frac']:.2%} | {h['dense_frac']:.2%} |")


if __name__ == "__main__":
    main()
