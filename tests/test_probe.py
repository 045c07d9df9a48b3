"""Sparse probing (interpret/probe.py): the unit selection and the representations against brute force,
the probe on planted and on random signals, the demo's labels, a user's JSONL, and the command."""
import json

import pytest
import torch

from sc_steer import ScSteerError, open_model
from sc_steer.cli import main
from sc_steer.interpret.probe import (balanced_accuracy, fit_logistic, labelled_texts, probe, select_units,
                                      unit_means)
from helpers import firing_sae


def test_unit_selection_equals_a_brute_force_ranking():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 30, generator=g, dtype=torch.float64)
    y = torch.rand(80, generator=g) < 0.4
    x[y, 7] += 2.0
    x[~y, 11] += 1.5                               # lower on the positives: the difference is absolute
    ref = []
    for u in range(30):
        pos = [float(x[i, u]) for i in range(80) if y[i]]
        neg = [float(x[i, u]) for i in range(80) if not y[i]]
        ref.append((abs(sum(pos) / len(pos) - sum(neg) / len(neg)), u))
    ranked = [u for _, u in sorted(ref, key=lambda r: (-r[0], r[1]))]
    for k in (1, 2, 5, 30, 50):
        assert select_units(x, y, k).tolist() == ranked[:k]
    assert ranked[:2] == [7, 11]


def test_the_probe_finds_a_planted_unit_and_stays_at_chance_on_noise():
    g = torch.Generator().manual_seed(2)
    n = 400
    labels = [["a", "b", "c"][i % 3] for i in range(n)]
    x = torch.randn(n, 40, generator=g, dtype=torch.float64)
    for i, lab in enumerate(labels):
        x[i, {"a": 3, "b": 9, "c": 17}[lab]] += 4.0   # one unit per label
    acc = probe(x, labels, (1, 5), seed=0)
    assert acc["1"] > 0.97 and acc["5"] > 0.97
    noise = probe(torch.randn(n, 40, generator=g, dtype=torch.float64), labels, (1, 5), seed=0)
    assert 0.35 < noise["1"] < 0.65 and 0.35 < noise["5"] < 0.65
    w = fit_logistic(torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=torch.float64),
                     torch.tensor([False, False, True, True]))
    assert w[0] > 0 and abs(float(w[1])) < 1e-6                # symmetric data: no bias, positive slope
    assert balanced_accuracy(torch.tensor([True, False, False, False]), torch.tensor([True, True, False, False])) == 0.75


def test_unit_means_equal_forward_hooks(tiny_model_dirs):
    lm = open_model(str(tiny_model_dirs["llama"]))
    sae = firing_sae()
    texts = ["In the beginning God created", "To be, or not to be", "a"]
    means = unit_means(lm, {"resid_post.1": sae}, texts, ctx=16, batch_size=2, progress=False)
    assert set(means) == {"sae/resid_post.1", "resid/resid_post.1", "mlp/mlp_act.1"}
    got = {}
    hook = lm.hf.model.layers[1].register_forward_hook(lambda m, i, o: got.__setitem__("h", o))
    for t, row_f, row_r in zip(texts, means["sae/resid_post.1"], means["resid/resid_post.1"]):
        ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(t, add_special_tokens=False)["input_ids"][:15]
        with torch.no_grad():
            lm.hf(input_ids=torch.tensor([ids]))
        h = got["h"][0, 1:]
        torch.testing.assert_close(row_r, h.double().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(row_f, sae.encode(h).double().mean(0), rtol=1e-4, atol=1e-5)
    hook.remove()


def test_labels_of_the_demo_corpus_and_of_a_users_file(tmp_path):
    pos = labelled_texts("demo:heldout", "pos", max_per_label=50)
    assert {lab for _, lab in pos} == {"noun", "verb", "adjective", "adverb"}
    assert not any(f"({lab})" in t for t, lab in pos)          # the marker is not in the text the model reads
    src = labelled_texts("demo:heldout", "source", max_per_label=20, seed=3)
    assert sorted({lab for _, lab in src}) == ["kjv", "shakespeare", "wordnet"] and len(src) == 60
    assert labelled_texts("demo:heldout", "source", max_per_label=20, seed=3) == src
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"body": f"text {i}", "tag": i % 2}) + "\n" for i in range(10)))
    assert sorted(labelled_texts(str(f), "tag", "body")) == sorted((f"text {i}", str(i % 2)) for i in range(10))
    for args, msg in [(("demo:heldout", "genre"), "carries source, pos"), ((str(f), "tag"), "text field 'text'"),
                      ((str(f), "nope", "body"), "label field 'nope'"), ((str(tmp_path / "x.txt"), "tag"), ".jsonl")]:
        with pytest.raises(ScSteerError, match=msg):
            labelled_texts(*args)
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": "t", "label": "x"}) + "\n" for _ in range(9)))
    with pytest.raises(ScSteerError, match="at least two labels"):
        labelled_texts(str(tmp_path / "one.jsonl"), "label")


def test_the_probe_command_writes_every_label_it_was_given(tiny_model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    firing_sae().save(run / "saes" / "resid_post.1")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps({"text": w * (i % 5 + 1), "kind": k}) + "\n"
                         for i in range(40) for w, k in (("In the beginning ", "bible"), ("To be, or not ", "play"))))
    assert main(["probe", "--run", str(run), "--data", str(f), "--label", "kind", "--no-neurons"]) == 0
    assert main(["probe", "--run", str(run), "--data", "demo:heldout", "--label", "pos", "--max-per-label", "20"]) == 0
    probes = json.loads((run / "probe.json").read_text())
    assert set(probes) == {"kind", "pos"} and probes["kind"]["labels"] == {"bible": 40, "play": 40}
    assert set(probes["kind"]["sets"]) == {"sae/resid_post.1"}
    assert len(probes["pos"]["sets"]) == 3 and list(probes["pos"]["sets"]["sae/resid_post.1"]["accuracy"]) == \
        ["1", "2", "5", "20"]
    assert probes["kind"]["sets"]["sae/resid_post.1"]["accuracy"]["20"] > 0.9   # the two texts differ in every token
    md = (run / "probe.md").read_text()
    assert "## kind" in md and "## pos" in md
