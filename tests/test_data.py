import gzip
import json

import pytest
import torch

from sc_steer import ScSteerError
from sc_steer.data import data_fingerprint, iter_batches, iter_documents, iter_rows


def test_sources_text_folder_jsonl_gz(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond para\n")
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "x.txt").write_text("x text")
    (sub / "y.md").write_text("y text")
    (sub / "ignored.bin").write_bytes(b"\x00")
    rows = [{"body": "one"}, {"body": "two"}, {"body": "  "}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["first doc\n\nsecond para\n"]
    assert list(iter_documents(str(tmp_path / "a.txt"), split="paragraph")) == ["first doc", "second para\n"]
    assert list(iter_documents(str(tmp_path / "a.txt"), split="line")) == ["first doc", "second para"]
    assert list(iter_documents(str(sub))) == ["x text", "y text"]
    assert list(iter_documents(str(tmp_path / "d.jsonl"), field="body")) == ["one", "two"]
    assert list(iter_documents(str(tmp_path / "d.jsonl.gz"), field="body")) == ["one", "two"]


def test_demo_corpus_ships_both_splits():
    """Passages of ~3,000 characters from the three sources in turn, none lost or cut mid-line."""
    train = iter_documents("demo")
    first, second, third = next(train), next(train), next(train)
    assert first.startswith("Ge1:1 In the beginning") and "Shakespeare" in second and "(noun)" in third
    held = list(iter_documents("demo:heldout"))
    assert 300 <= len(held) < 500 and all(len(p) < 3000 + 2000 for p in held)
    import gzip
    import json
    from sc_steer.data import DEMO_DATA
    docs = [json.loads(line)["text"] for line in gzip.open(DEMO_DATA / "heldout.jsonl.gz", "rt")]
    assert sorted(" ".join(docs).split()) == sorted(" ".join(held).split())


@pytest.mark.parametrize("setup, kwargs, message", [
    (lambda p: p.write_text(""), {}, "is empty"),
    (lambda p: p.write_text("   \n"), {}, "is empty"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"body": "x"}\n'), {"field": "text"}, "no field 'text'"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": 3}\n'), {}, "expected text"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": \n'), {}, "not valid JSON"),
    (lambda p: None, {}, "does not exist"),
])
def test_bad_sources(tmp_path, setup, kwargs, message):
    p = tmp_path / "in.txt"
    setup(p)
    target = p.with_suffix(".jsonl") if p.with_suffix(".jsonl").exists() else p
    with pytest.raises(ScSteerError, match=message):
        list(iter_documents(str(target), **kwargs))


def test_pad_rows_keep_documents_apart(tokenizer, text_docs):
    rows = list(iter_rows(text_docs, tokenizer, ctx=8))
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in text_docs]
    assert sum(len(r.ids) - 1 for r in rows) == sum(map(len, ids))
    for r in rows:
        assert r.ids[0] == tokenizer.bos_token_id and not r.keep[0] and r.doc[0] == -1
        assert len(set(r.doc[1:])) == 1 and all(r.keep[1:]) and len(r.ids) <= 8
    flat = [t for r in rows if r.doc[1] == 3 for t in r.ids[1:]]
    assert flat == ids[3]


def test_pack_rows_mix_documents_with_separators(tokenizer, text_docs):
    rows = list(iter_rows(text_docs, tokenizer, ctx=16, packing="pack"))
    assert all(len(r.ids) == 16 for r in rows[:-1])
    stream = [t for r in rows for t, k in zip(r.ids, r.keep) if k]
    assert stream == [t for d in text_docs for t in tokenizer(d, add_special_tokens=False)["input_ids"]]
    seps = [(t, k, d) for r in rows for t, k, d in zip(r.ids[1:], r.keep[1:], r.doc[1:]) if not k]
    assert seps and all(t == tokenizer.eos_token_id and d == -1 for t, _, d in seps)


def test_batches_pad_right_and_resume(tokenizer, text_docs):
    rows = list(iter_rows(text_docs, tokenizer, ctx=8))
    batches = list(iter_batches(rows, 3, 8, pad_id=3))
    assert [int(b.row[0]) for b in batches] == list(range(0, len(rows), 3))
    b = batches[-1]
    for i in range(len(b.row)):
        n = len(rows[int(b.row[i])].ids)
        assert b.attention_mask[i, :n].all() and not b.attention_mask[i, n:].any()
        assert not b.keep[i, n:].any()
    resumed = list(iter_batches(rows, 3, 8, pad_id=3, start_row=3))
    assert torch.equal(resumed[0].input_ids, batches[1].input_ids)


@pytest.mark.parametrize("ctx", [0, 1, -5])
def test_context_length_must_fit_bos_and_a_token(tokenizer, ctx):
    with pytest.raises(ScSteerError, match="context length"):
        list(iter_rows(["text"], tokenizer, ctx=ctx))


def test_prefetch_keeps_order_raises_where_the_source_fails_and_stops_with_its_consumer():
    import threading

    from sc_steer.data import prefetch

    assert list(prefetch(range(50), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ScSteerError("data 'x': unreadable")

    got = []
    with pytest.raises(ScSteerError, match="unreadable"):
        for v in prefetch(failing()):
            got.append(v)
    assert got == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "sc-steer-prefetch" for t in threading.enumerate())
    n = len(produced)
    assert n <= 3 + 2 + 1  # what was consumed, the queue, and one item in hand
