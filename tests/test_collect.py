"""Collected activations against plain transformers forward hooks, resuming, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sc_steer import ActivationStore, ScSteerError, collect, open_model
from sc_steer.data import iter_batches, iter_documents, iter_rows, pad_token_id

from helpers import hook_activations


@pytest.fixture
def corpus(tmp_path, text_docs):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": d * 3}) for d in text_docs) + "\n")
    return str(path)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_every_site_equals_forward_hooks_exactly(tiny_model_dirs, tmp_path, corpus, family):
    lm = open_model(str(tiny_model_dirs[family]))
    sites = lm.sites("resid_post.*,mlp_out.1,attn_out.2,mlp_act.0")
    manifest = collect(lm, sites, corpus, tmp_path / "acts", ctx=24, batch_size=3, shard_tokens=50, progress=False)
    store = ActivationStore(tmp_path / "acts")
    assert store.n_tokens == manifest["n_tokens"] and len(store.shards) > 1
    rows = iter_rows(iter_documents(corpus), lm.tokenizer, 24)
    expected = {str(s): [] for s in sites}
    meta = {"tokens": [], "doc": []}
    for b in iter_batches(rows, 3, 24, pad_token_id(lm.tokenizer)):
        ref = hook_activations(lm.hf, {str(s): lm.module(s) for s in sites}, b.input_ids, b.attention_mask,
                               inputs_of={"mlp_act.0"})
        for s in expected:
            expected[s].append(ref[s][b.keep])
        meta["tokens"].append(b.input_ids[b.keep])
        meta["doc"].append(b.doc[b.keep])
    for s in expected:
        assert torch.equal(store.load(s), torch.cat(expected[s])), s
    assert store.d("mlp_act.0") == torch.cat(expected["mlp_act.0"]).shape[1] in (64, 128)
    assert store.d("resid_post.0") == 32
    got = store.metadata()
    assert torch.equal(got["tokens"].long(), torch.cat(meta["tokens"]))
    assert torch.equal(got["doc"].long(), torch.cat(meta["doc"]))
    assert not (got["tokens"] == lm.tokenizer.bos_token_id).any()
    mean_norm = torch.cat(expected["resid_post.1"]).double().norm(dim=-1).mean().item()
    assert manifest["sites"]["resid_post.1"]["mean_norm"] == pytest.approx(mean_norm, rel=1e-9)


def test_padding_and_batching_do_not_change_activations(tiny_model_dirs, tmp_path, corpus):
    """Each row run alone, unpadded, through the plain model gives the same stored vectors."""
    lm = open_model(str(tiny_model_dirs["llama"]))
    collect(lm, "resid_post.2", corpus, tmp_path / "acts", ctx=16, batch_size=4, progress=False)
    stored = ActivationStore(tmp_path / "acts").load("resid_post.2")
    ref = []
    for row in iter_rows(iter_documents(corpus), lm.tokenizer, 16):
        ids = torch.tensor([row.ids])
        out = hook_activations(lm.hf, {"b": lm.hf.model.layers[2]}, ids, torch.ones_like(ids))["b"]
        ref.append(out[0][torch.tensor(row.keep)])
    torch.testing.assert_close(stored, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_remote_local_path_matches_plain_collection(tiny_model_dirs, tmp_path, corpus):
    plain = open_model(str(tiny_model_dirs["gpt2"]))
    collect(plain, "resid_post.0,resid_post.2", corpus, tmp_path / "a", ctx=16, max_tokens=40, progress=False)
    remote = open_model(str(tiny_model_dirs["gpt2"]), remote="local")
    collect(remote, "resid_post.0,resid_post.2", corpus, tmp_path / "b", ctx=16, max_tokens=40, progress=False)
    for s in ("resid_post.0", "resid_post.2"):
        assert torch.equal(ActivationStore(tmp_path / "a").load(s), ActivationStore(tmp_path / "b").load(s))


def test_max_tokens_and_store_dtype(tiny_model_dirs, tmp_path, corpus):
    lm = open_model(str(tiny_model_dirs["llama"]))
    m = collect(lm, "resid_post.0", corpus, tmp_path / "a", ctx=16, batch_size=2, max_tokens=20,
                store_dtype="float16", progress=False)
    assert 20 <= m["n_tokens"] < 20 + 2 * 15 and m["dtype"] == "float16"
    assert ActivationStore(tmp_path / "a").load("resid_post.0").dtype == torch.float16


def test_streaming_batches_cover_every_token_once(tiny_model_dirs, tmp_path, corpus):
    lm = open_model(str(tiny_model_dirs["llama"]))
    collect(lm, "resid_post.0,resid_post.1", corpus, tmp_path / "a", ctx=16, shard_tokens=30, progress=False)
    store = ActivationStore(tmp_path / "a")
    full = {s: store.load(s) for s in store.sites}
    batches = list(store.batches(store.sites, 7, seed=1, buffer_tokens=40))
    assert all(len(b["resid_post.0"]) == 7 for b in batches[:-1])
    got = {s: torch.cat([b[s] for b in batches]) for s in store.sites}
    # aligned: the same permutation for every site, so (site0, site1) pairs are rows of the full table
    joint_got = torch.cat([got["resid_post.0"], got["resid_post.1"]], 1)
    joint_full = torch.cat([full["resid_post.0"], full["resid_post.1"]], 1)
    assert sorted(map(tuple, joint_got.tolist())) == sorted(map(tuple, joint_full.tolist()))
    assert not torch.equal(joint_got, joint_full)
    again = torch.cat([b["resid_post.0"] for b in store.batches("resid_post.0", 7, seed=1, buffer_tokens=40)])
    assert torch.equal(again, got["resid_post.0"])


def _folder_contents(path):
    files = {p.name: load_file(str(p)) for p in sorted((path / "shards").iterdir())}
    return json.loads((path / "manifest.json").read_text()), files


@pytest.mark.slow
def test_killed_collection_resumes_to_identical_output(tiny_model_dirs, tmp_path):
    """SIGKILL a real `sc-steer collect` midway, rerun it, compare with an uninterrupted run."""
    text = tmp_path / "big.txt"
    text.write_text(("And God said, Let there be light: and there was light. 12:34 " * 40 + "\n\n") * 40)
    args = ["--model", str(tiny_model_dirs["llama"]), "--data", str(text), "--split", "paragraph",
            "--sites", "resid_post.*", "--ctx", "32", "--batch-size", "1", "--shard-tokens", "200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "sc_steer.cli", "collect"]
    subprocess.run(cli + args + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli + args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        mf = killed / "manifest.json"
        if mf.exists() and len(json.loads(mf.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "running", "the run finished before it could be killed"
    subprocess.run(cli + args + ["--out", str(killed)], check=True, env=env, capture_output=True)
    whole_manifest, whole_files = _folder_contents(tmp_path / "whole")
    killed_manifest, killed_files = _folder_contents(killed)
    assert killed_manifest == whole_manifest
    assert whole_files.keys() == killed_files.keys() and len(whole_files) > 3
    for name in whole_files:
        for key in whole_files[name]:
            assert torch.equal(whole_files[name][key], killed_files[name][key]), (name, key)


def test_partial_shard_is_redone(tiny_model_dirs, tmp_path, corpus, monkeypatch):
    """A crash while writing a shard leaves a temp file; the rerun removes it and finishes."""
    import sc_steer.shards as acts

    lm = open_model(str(tiny_model_dirs["llama"]))
    kw = dict(ctx=16, batch_size=2, shard_tokens=40, progress=False)
    collect(lm, "resid_post.1", corpus, tmp_path / "whole", **kw)
    real = acts._write_shard
    calls = {"n": 0}

    def crashing(out, manifest, shard):
        calls["n"] += 1
        if calls["n"] == 3:
            (out / "shards" / "shard_00002.safetensors.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        real(out, manifest, shard)

    monkeypatch.setattr(acts, "_write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        collect(lm, "resid_post.1", corpus, tmp_path / "crash", **kw)
    monkeypatch.setattr(acts, "_write_shard", real)
    collect(lm, "resid_post.1", corpus, tmp_path / "crash", **kw)
    assert _folder_contents(tmp_path / "crash")[0] == _folder_contents(tmp_path / "whole")[0]
    assert torch.equal(ActivationStore(tmp_path / "crash").load("resid_post.1"),
                       ActivationStore(tmp_path / "whole").load("resid_post.1"))


def test_folder_of_a_different_run_is_refused(tiny_model_dirs, tmp_path, corpus):
    lm = open_model(str(tiny_model_dirs["llama"]))
    collect(lm, "resid_post.0", corpus, tmp_path / "a", ctx=16, progress=False)
    with pytest.raises(ScSteerError, match="holds another collection.*config"):
        collect(lm, "resid_post.1", corpus, tmp_path / "a", ctx=16, progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ScSteerError, match="not empty"):
        collect(lm, "resid_post.0", corpus, tmp_path / "b", ctx=16, progress=False)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_a_kill_after_the_last_shard_only_finishes_the_manifest(tiny_model_dirs, tmp_path, corpus, monkeypatch):
    """Killed after the last shard was listed but before the manifest was marked complete: the rerun
    must not collect an extra shard."""
    import sc_steer.activations as acts

    lm = open_model(str(tiny_model_dirs["llama"]))
    kw = dict(ctx=16, batch_size=2, shard_tokens=40, max_tokens=100, progress=False)
    collect(lm, "resid_post.1", corpus, tmp_path / "whole", **kw)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(acts, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        collect(lm, "resid_post.1", corpus, tmp_path / "crash", **kw)
    monkeypatch.undo()
    collect(lm, "resid_post.1", corpus, tmp_path / "crash", **kw)
    assert _folder_contents(tmp_path / "crash")[0] == _folder_contents(tmp_path / "whole")[0]


def test_shard_writer_output_reads_back_with_safetensors(tmp_path):
    """Shards are written by our own serializer (no intermediate copy); safetensors must read them."""
    from safetensors import safe_open

    from sc_steer.shards import write_safetensors

    tensors = {"act.a": torch.randn(5, 3).to(torch.bfloat16), "act.b": torch.randn(5, 2, dtype=torch.float16),
               "tokens": torch.arange(5, dtype=torch.int32), "row": torch.arange(5), "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "f", "rows_end": "7"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "f", "rows_end": "7"}


def test_shards_are_cut_by_bytes_too(tiny_model_dirs, tmp_path, corpus):
    """A byte budget cuts more, smaller shards at batch ends; the stored tokens are the same."""
    lm = open_model(str(tiny_model_dirs["llama"]))
    kw = dict(ctx=16, batch_size=2, progress=False)
    one = collect(lm, "resid_post.*", corpus, tmp_path / "one", **kw)
    per_token = 3 * 32 * 4   # three fp32 sites of width 32
    many = collect(lm, "resid_post.*", corpus, tmp_path / "many", shard_bytes=40 * per_token, **kw)
    assert len(one["shards"]) == 1 and len(many["shards"]) > 3
    assert all(s["n_tokens"] < 40 + 2 * 16 for s in many["shards"])
    assert all(s["n_tokens"] >= 40 for s in many["shards"][:-1])
    for site in ("resid_post.0", "resid_post.2"):
        assert torch.equal(ActivationStore(tmp_path / "many").load(site), ActivationStore(tmp_path / "one").load(site))
