"""Feature interpretation against brute force, the neuron baseline, the HTML browser, bad input."""
import json
import math

import pytest
import torch

from sc_steer import ScSteerError, open_model
from sc_steer.data import iter_batches, iter_documents, iter_rows, pad_token_id
from sc_steer.interpret import UnitStats, interpret, load_unit, write_browser, write_plots
from sc_steer.sae import SAEConfig, make_sae
from helpers import firing_sae, launch_chromium


def brute_force_top(acts, rows, n, window):
    """Per unit: [(value, token index, [window indices])] of its n largest activations."""
    out = []
    for u in range(acts.shape[1]):
        vals, idx = acts[:, u].sort(descending=True)
        best = []
        for v, t in zip(vals[:n].tolist(), idx[:n].tolist()):
            same = [j for j in range(t - window, t + window + 1) if 0 <= j < len(rows) and rows[j] == rows[t]]
            best.append((v, t, same))
        out.append(best)
    return out


def test_stats_match_brute_force_with_edges():
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0] * 7 + [1] * 5 + [2] * 9 + [3] * 6)
    tokens = torch.randint(0, 12, (len(rows),), generator=g)
    acts = torch.relu(torch.randn(len(rows), 4, generator=g))
    acts[:, 2] = 0.0                      # never fires
    acts[7, 3] = 50.0                     # maximum at the first token of row 1 (position 0 after BOS)
    acts[len(rows) - 1, 1] = 40.0         # maximum at the very last token
    st = UnitStats(4, 12, top_n=5, window=3)
    for lo, hi in ((0, 12), (12, 21), (21, 27)):   # chunks of whole rows
        st.update(acts[lo:hi], tokens[lo:hi], rows[lo:hi])
    ref = brute_force_top(acts, rows.tolist(), 5, 3)
    for u in (0, 1, 3):
        for i, (v, t, win) in enumerate(ref[u]):
            assert st.top_val[u, i].item() == pytest.approx(v)
            assert st.top_idx[u, i].item() == t
            got = st.top_win_idx[u, i]
            assert got[got >= 0].tolist() == win
            assert torch.allclose(st.top_win_act[u, i][got >= 0], acts[win, u])
    assert st.top_idx[3, 0] == 7 and st.top_win_idx[3, 0].tolist()[:3] == [-1, -1, -1]
    assert st.top_win_idx[1, 0].tolist()[-3:] == [-1, -1, -1]
    assert st.fires[2] == 0 and st.density()[2] == 0 and st.top_tokens(2) == []
    for u in (0, 1):
        ids, means = st.token_means(u, min_count=1)
        for t, m in zip(ids.tolist(), means.tolist()):
            assert m == pytest.approx(acts[tokens == t, u].mean().item(), rel=1e-5)
    assert st.fires.tolist() == (acts > 0).sum(0).tolist()
    few = UnitStats(4, 12, top_n=5, window=3, windows=2)       # windows kept for the first two only
    for lo, hi in ((0, 12), (12, 21), (21, 27)):
        few.update(acts[lo:hi], tokens[lo:hi], rows[lo:hi])
    assert torch.equal(few.top_val, st.top_val) and torch.equal(few.top_idx, st.top_idx)
    assert torch.equal(few.top_win_idx, st.top_win_idx[:, :2]) and torch.equal(few.top_win_act, st.top_win_act[:, :2])
    sparse = UnitStats(4, 12, top_n=5, window=3, dense_token_limit=0)
    sparse.update(acts, tokens, rows)
    for u in (0, 1, 3):
        a, b = sparse.top_tokens(u, 5, 1), st.top_tokens(u, 5, 1)
        assert [(t, c) for t, _, c in a] == [(t, c) for t, _, c in b]
        assert [m for _, m, _ in a] == pytest.approx([m for _, m, _ in b], rel=1e-5)


def test_sparse_token_table_equals_the_dense_one_for_signed_units():
    """Residual dimensions and neurons are signed; the sparse per-token table (used when units x vocab is
    large) summed only the positive values but divided by every occurrence."""
    g = torch.Generator().manual_seed(3)
    rows = torch.arange(60) // 10
    tokens = torch.randint(0, 7, (60,), generator=g)
    acts = torch.randn(60, 5, generator=g) + torch.linspace(-1, 1, 5)
    acts[::4, 1] = 0.0
    dense, sparse = UnitStats(5, 7, top_n=4, window=2), UnitStats(5, 7, top_n=4, window=2, dense_token_limit=0)
    for st in (dense, sparse):
        st.update(acts[:30], tokens[:30], rows[:30])
        st.update(acts[30:], tokens[30:], rows[30:])
    for u in range(5):
        ids, means = sparse.token_means(u, min_count=1)
        for t, m in zip(ids.tolist(), means.tolist()):   # the brute-force mean over all occurrences
            assert m == pytest.approx(acts[tokens == t, u].mean().item(), rel=1e-5, abs=1e-6)
        a, b = sparse.top_tokens(u, 3, 1), dense.top_tokens(u, 3, 1)
        assert [(t, c) for t, _, c in a] == [(t, c) for t, _, c in b]
        assert [m for _, m, _ in a] == pytest.approx([m for _, m, _ in b], rel=1e-5)


def test_sig_round_agrees_with_sig_within_one_unit_in_the_last_digit():
    from sc_steer.interpret.readout import _sig, sig_round

    g = torch.Generator().manual_seed(4)
    mags = torch.randint(-30, 31, (4000,), generator=g).double()
    x = torch.randn(4000, generator=g, dtype=torch.float64) * 10 ** mags
    x[::97] = 0.0
    x[1::89] = 10 ** mags[1::89]                  # exact powers of ten and their negatives
    x[2::89] = -(10 ** mags[2::89])
    for vals in (x, x.float()):                   # the read-out rounds float32 activations too
        for digits in (4, 5):
            got = sig_round(vals, digits).tolist()
            ref = [_sig(v, digits) for v in vals.tolist()]
            unit = [10.0 ** (math.floor(math.log10(abs(r))) - digits + 1) if r else 0.0 for r in ref]
            assert all(abs(a - b) <= u * (1 + 1e-9) for a, b, u in zip(got, ref, unit))
            plain = [(a, b) for a, b, u in zip(got, ref, unit) if 1e-15 < u * 10 ** digits < 1e20]
            assert sum(a != b for a, b in plain) <= len(plain) // 1000   # exact but for rounding ties
    odd = sig_round(torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan])).tolist()
    assert odd[:4] == [0.0, 0.0, math.inf, -math.inf] and math.copysign(1, odd[1]) == -1 and math.isnan(odd[4])


def test_concentration_and_entropy_of_many_units_equal_the_scalar_functions():
    from sc_steer.interpret.score import concentration, concentration_many, token_entropy, token_entropy_many

    g = torch.Generator().manual_seed(6)
    vals = torch.rand(300, 20, generator=g).sort(dim=1, descending=True).values * 5
    toks = torch.randint(0, 9, (300, 20), generator=g)            # few token ids: many repeats
    toks[:40] = 3                                                  # one token only
    vals[50:60, -3:] = float("-inf")                               # fewer positive activations than n
    vals[60:65, -1] = 0.0
    vals[65:70, -1] = -0.5
    for n_tokens in (1, 5, 30):
        got, ref = concentration_many(vals, toks, n_tokens), [concentration(v, t, n_tokens) for v, t in zip(vals, toks)]
        assert [r is None for r in ref] == [x is None for x in got] and sum(r is None for r in ref) == 20
        assert [x for x in got if x is not None] == pytest.approx([r for r in ref if r is not None], rel=1e-9)
    got, ref = token_entropy_many(vals, toks), [token_entropy(v, t) for v, t in zip(vals, toks)]
    assert [r is None for r in ref] == [x is None for x in got]
    assert [x for x in got if x is not None] == pytest.approx([r for r in ref if r is not None], rel=1e-9, abs=1e-12)
    assert got[0] == 0.0


@pytest.mark.parametrize("dense_limit", [10**9, 0])
def test_top_tokens_of_a_block_of_units_equal_the_per_unit_ones(dense_limit, monkeypatch):
    from sc_steer.interpret import stats as stats_module

    monkeypatch.setattr(stats_module, "MEANS_BLOCK", 50)          # several sub-blocks per call
    g = torch.Generator().manual_seed(7)
    T, U, V = 600, 23, 40
    rows = torch.arange(T) // 20
    tokens = torch.randint(0, V, (T,), generator=g)
    acts = torch.randn(T, U, generator=g) + torch.linspace(-1, 1, U)   # signed: some means <= 0
    acts[:, 4] = torch.relu(acts[:, 4] - 2)                            # sparse
    acts[:, 5] = 0.0                                                   # never fires
    st = UnitStats(U, V, top_n=4, window=2, dense_token_limit=dense_limit)
    assert st.tokens.dense == (dense_limit > 0)
    for lo in range(0, T, 200):
        st.update(acts[lo:lo + 200], tokens[lo:lo + 200], rows[lo:lo + 200])
    for min_count, k in ((1, 5), (15, 10), (10**6, 3)):
        for start, stop in ((0, U), (3, 17)):
            ids, means, counts = st.top_tokens_block(start, stop, k, min_count)
            for row, u in enumerate(range(start, stop)):
                ref = st.top_tokens(u, k, min_count)
                ok = means[row] > 0
                assert ids[row][ok].tolist() == [t for t, _, _ in ref]
                assert counts[row][ok].tolist() == [c for _, _, c in ref]
                assert means[row][ok].tolist() == pytest.approx([m for _, m, _ in ref], rel=1e-12)


@pytest.fixture(scope="module")
def interpreted(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("interp")
    text = out / "t.jsonl"
    docs = ["In the beginning God created the heaven and the earth. " * 3,
            "Ge1:2 And the earth was without form, and void; 1 2 3 4 5 6 7 8 9.",
            "thou art more lovely and more temperate: thee, thy, thine. " * 2]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    lm = open_model(str(tiny_model_dirs["llama"]))
    sae = firing_sae(d_sae=48, seed=1, gain=4.0, bias=-0.2)
    with torch.no_grad():
        sae.W_enc[:, 5] = 0.0
        sae.b_enc[5] = -1.0     # feature 5 never fires
    summary = interpret(lm, {"resid_post.1": sae}, str(text), out, ctx=20, batch_size=2, top_n=6, window=4,
                        min_count=1, progress=False)
    return {"lm": lm, "sae": sae, "out": out, "text": str(text), "summary": summary}


def test_pipeline_records_match_brute_force(interpreted):
    lm, sae, out = interpreted["lm"], interpreted["sae"], interpreted["out"]
    xs, toks, rows = [], [], []
    hook_out = {}
    h = lm.hf.model.layers[1].register_forward_hook(lambda m, i, o: hook_out.__setitem__("x", o))
    for b in iter_batches(iter_rows(iter_documents(interpreted["text"]), lm.tokenizer, 20), 2, 20,
                          pad_token_id(lm.tokenizer)):
        with torch.no_grad():
            lm.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
        xs.append(hook_out["x"][b.keep])
        toks.append(b.input_ids[b.keep])
        rows.append(b.row[:, None].expand_as(b.input_ids)[b.keep])
    h.remove()
    with torch.no_grad():
        acts = sae.encode(torch.cat(xs))
    toks, rows = torch.cat(toks), torch.cat(rows)
    records = [json.loads(x) for x in (out / "features" / "resid_post.1.jsonl").read_text().splitlines()]
    assert len(records) == 48
    strings = [lm.tokenizer.decode([i]) for i in range(len(lm.tokenizer))]
    ref = brute_force_top(acts, rows.tolist(), 6, 4)
    checked = 0
    for u, rec in enumerate(records):
        assert rec["density"] == pytest.approx((acts[:, u] > 0).float().mean().item())
        positive = [r for r in ref[u] if r[0] > 0]
        assert len(rec["contexts"]) == len(positive)
        for ctx, (v, t, win) in zip(rec["contexts"], positive):
            assert ctx["max"] == pytest.approx(v, rel=1e-4) and ctx["token_index"] == t
            assert ctx["tokens"] == [strings[i] for i in toks[win].tolist()]
            assert ctx["acts"] == pytest.approx(acts[win, u].tolist(), rel=1e-3, abs=1e-7)
            assert ctx["tokens"][ctx["max_index"]] == strings[int(toks[t])]
            checked += 1
        means = {}
        for t in set(toks.tolist()):
            means[t] = acts[toks == t, u].mean().item()
        best = sorted((m, t) for t, m in means.items() if m > 0)[::-1][:10]
        assert [x["id"] for x in rec["top_tokens"]] == [t for _, t in best]
    assert checked > 20
    assert records[5]["density"] == 0 and records[5]["contexts"] == [] and records[5]["label"] == "(never fires)"
    # the whole-table simulation score of every unit, recomputed per position from the same activations
    sim = _brute_force_simulation(acts, toks, rows)
    for u, rec in enumerate(records):
        if torch.isnan(sim[u]):
            assert rec["scores"]["tokens"]["all"] is None
        else:
            assert rec["scores"]["tokens"]["all"] == pytest.approx(float(sim[u]), abs=1e-4)
    assert sum(r["scores"]["tokens"]["all"] is not None for r in records) >= 10
    # every explanation score, sensitivity and specificity from the definitions (tests/test_explain.py)
    from sc_steer.interpret.explain import K_VALUES, pair_vocabulary
    from test_explain import brute

    prev = torch.cat([torch.full_like(toks[:1], -1), toks[:-1]])
    prev[torch.cat([torch.tensor([True]), rows[1:] != rows[:-1]])] = lm.tokenizer.bos_token_id
    ev = rows % 2 == 0
    pairs = pair_vocabulary(prev[ev], toks[ev], len(lm.tokenizer))
    ref = brute(rows, toks, prev, acts, len(lm.tokenizer), K_VALUES, 3, pairs)
    compared = 0
    for rec, r in zip(records, ref):
        for name in ("tokens", "context"):
            for k, v in r[name].items():
                got = rec["scores"][name][k]
                assert (got is None) == math.isnan(v) and (got is None or got == pytest.approx(v, abs=2e-4)), \
                    (rec["id"], name, k, got, v)
                compared += got is not None
        for key in ("sensitivity", "specificity"):
            assert (rec[key] is None) == math.isnan(r[key]) and (rec[key] is None or rec[key] == pytest.approx(r[key], abs=1e-4))
    assert compared > 100


def test_neuron_baseline_and_summary(interpreted):
    out, summary = interpreted["out"], interpreted["summary"]
    assert set(summary["sets"]) == {"sae/resid_post.1", "resid/resid_post.1", "mlp/mlp_act.1"}
    resid = [json.loads(x) for x in (out / "neurons" / "resid_post.1.jsonl").read_text().splitlines()]
    mlp = [json.loads(x) for x in (out / "neurons" / "mlp_act.1.jsonl").read_text().splitlines()]
    assert len(resid) == 32 and len(mlp) == 64
    assert all(len(r["logit_lens"]["promoted"]) == 8 for r in resid + mlp)
    md = (out / "features" / "resid_post.1.md").read_text()
    assert md.count("\n| ") >= 3 and "Top Input Tokens" in md
    assert "MLP neurons" in (out / "interpret.md").read_text()
    md = (out / "interpret.md").read_text()
    assert "Explanation scores" in md and md.count("| K = 1 | K = 2 | K = 5 | K = 10 | K = 20 | K = all |") == 2
    for key in summary["sets"]:
        for name in ("tokens", "context"):
            sim = summary["sets"][key]["explain"][name]["all"]
            assert sim["n"] > 0 and sim["ci95"][0] <= sim["mean"] <= sim["ci95"][1]


def test_logit_lens_against_a_direct_computation(interpreted):
    lm, sae = interpreted["lm"], interpreted["sae"]
    rec = load_unit(interpreted["out"], "resid_post.1", 3)
    d = sae.W_dec[3].detach() * lm.hf.model.norm.weight.detach()
    logits = lm.hf.lm_head.weight.detach() @ d
    top = logits.topk(8).indices.tolist()
    assert [lm.tokenizer.decode([t]) for t in top] == [p[0] for p in rec["logit_lens"]["promoted"]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_applies_the_final_norm(tiny_model_dirs, family):
    """With a final-norm gain far from ones (a random model's is all ones, which hides a dropped gain):
    RMSNorm scales by the gain, LayerNorm also centres; values and ranks against a direct product."""
    from sc_steer.interpret.lens import logit_lens

    lm = open_model(str(tiny_model_dirs[family]))
    norm = lm.hf.model.norm if family == "llama" else lm.hf.transformer.ln_f
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-3, 3, 32))
    dirs = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    got = logit_lens(lm, dirs, k=6)
    W_U = lm.hf.lm_head.weight.detach()
    for d, rec in zip(dirs, got):
        x = d - d.mean() if family == "gpt2" else d
        logits = W_U @ (x * norm.weight.detach())
        assert [t for t, _ in rec["promoted"]] == logits.topk(6).indices.tolist()
        assert [v for _, v in rec["promoted"]] == pytest.approx(logits.topk(6).values.tolist(), rel=1e-4, abs=1e-5)
        assert [t for t, _ in rec["suppressed"]] == (-logits).topk(6).indices.tolist()


def test_bad_input(interpreted, tiny_model_dirs, tmp_path):
    with pytest.raises(ScSteerError, match="out of range.*48 units"):
        load_unit(interpreted["out"], "resid_post.1", 48)
    wrong = make_sae(SAEConfig(architecture="topk", d_in=24, d_sae=48, k=4))
    with pytest.raises(ScSteerError, match="d_in=24"):
        interpret(interpreted["lm"], {"resid_post.1": wrong}, interpreted["text"], tmp_path, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ScSteerError, match="is empty"):
        interpret(interpreted["lm"], {"resid_post.1": interpreted["sae"]}, str(tmp_path / "empty.txt"), tmp_path,
                  progress=False)
    with pytest.raises(ScSteerError, match="window -1"):
        interpret(interpreted["lm"], {"resid_post.1": interpreted["sae"]}, interpreted["text"], tmp_path, window=-1)


def test_browser_data_hold_every_record_and_the_plots_are_drawn(interpreted):
    """The browser's data scripts carry exactly the records on disk (strict JSON inside), one per unit set."""
    out, summary = interpreted["out"], interpreted["summary"]
    write_browser(out, summary)
    pngs = write_plots(out, summary)
    assert all(p.stat().st_size > 5000 for p in pngs)
    for key, info in summary["sets"].items():
        script = (out / "browser" / "data" / f"{key.replace('/', '_').replace('.', '_')}.js").read_text()
        prefix = f"window.SC_DATA = window.SC_DATA || {{}}; window.SC_DATA[{json.dumps(key)}] = "
        assert script.startswith(prefix) and script.endswith(";\n")
        payload = json.loads(script[len(prefix):-2].replace("<\\/", "</"), parse_constant=pytest.fail)
        assert payload == [json.loads(x) for x in (out / info["file"]).read_text().splitlines()]


@pytest.mark.slow
def test_browser_opens_without_errors_and_finds_a_feature_by_token(interpreted):
    playwright = pytest.importorskip("playwright.sync_api")
    out, summary = interpreted["out"], interpreted["summary"]
    index = write_browser(out, summary)
    pngs = write_plots(out, summary)
    assert all(p.stat().st_size > 5000 for p in pngs)
    rec = next(json.loads(x) for x in (out / "features" / "resid_post.1.jsonl").read_text().splitlines()
               if json.loads(x)["top_tokens"])
    token = rec["top_tokens"][0]["token"].strip()
    errors = []
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index.as_uri())
        page.wait_for_selector(".item")
        page.fill("#q", token)
        page.wait_for_function("document.getElementById('count').textContent.length > 0")
        items = page.locator(".item").all_inner_texts()
        assert any(f"#{rec['id']} " in t for t in items), (token, items[:5])
        page.locator(".item", has_text=f"#{rec['id']} ").first.click()
        page.wait_for_selector(".ctx")
        assert page.locator(".ctx").count() == len(rec["contexts"])
        page.screenshot(path=str(out / "browser_screenshot.png"))
        browser.close()
    assert errors == []


def test_padded_vocabulary_gets_names_in_the_logit_lens(tokenizer, tmp_path):
    """Models often have more unembedding rows than tokens (Pythia: 50304 rows, 50277 tokens); the logit
    lens can rank those rows, and interpretation must name them instead of failing."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    n_tok = len(tokenizer)
    cfg = LlamaConfig(vocab_size=n_tok + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():   # make the padded rows the ones every direction promotes most
        model.lm_head.weight[n_tok:] = 0.0
        model.lm_head.weight[n_tok] = 50 * model.model.norm.weight.new_ones(32)
    lm = open_model(model, tokenizer=tokenizer)
    sae = firing_sae(d_sae=16, seed=2)
    interpret(lm, {"resid_post.0": sae}, "demo:heldout", tmp_path, max_tokens=300, ctx=32, neurons=False,
              progress=False)
    names = [p[0] for r in range(16) for p in load_unit(tmp_path, "resid_post.0", r)["logit_lens"]["promoted"]]
    assert f"<unused {n_tok}>" in names


def _brute_force_simulation(acts, tokens, rows):
    """Per-position predictions written out: even rows explain, odd rows are predicted."""
    import numpy as np

    explain, held = rows % 2 == 0, rows % 2 == 1
    out = []
    for u in range(acts.shape[1]):
        a = acts[:, u].double()
        table = {}
        for t in tokens[explain].unique().tolist():
            table[t] = float(a[explain & (tokens == t)].mean())
        fallback = float(a[explain].mean())
        pred = np.array([table.get(t, fallback) for t in tokens[held].tolist()])
        true = a[held].numpy()
        out.append(float(np.corrcoef(pred, true)[0, 1]) if pred.std() > 0 and true.std() > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dense_limit", [10**9, 0])
def test_simulation_score_equals_a_brute_force_computation(dense_limit):
    """The whole-table score ("all" of the token variant), read explaining rows first as interpret does."""
    from sc_steer.interpret.explain import Explanations

    g = torch.Generator().manual_seed(5)
    T, U, V = 400, 6, 9
    rows = torch.arange(T) // 13
    tokens = torch.randint(0, V, (T,), generator=g)
    tokens[(rows % 2 == 1) & (tokens == 8)] = 7       # ... and 7 never appears in the explaining half:
    tokens[(rows % 2 == 0) & (tokens == 7)] = 6       # the held-out 7s are predicted by the fallback mean
    table = torch.randn(V, U, generator=g)
    acts = table[tokens] + 0.7 * torch.randn(T, U, generator=g)     # token-driven plus noise
    acts[:, 1] = torch.relu(acts[:, 1] - 1.0)                        # sparse, SAE-like
    acts[:, 2] = torch.randn(T, generator=g)                         # unrelated to the token
    acts[:, 3] = 0.0                                                 # never varies: no score
    sim = Explanations(U, V, torch.zeros(0, dtype=torch.long), dense_limit=dense_limit)
    prev = torch.full_like(tokens, -1)
    for held in (0, 1):
        half = torch.nonzero(rows % 2 == held).squeeze(1)
        for lo in range(0, len(half), 91):                           # in chunks, as interpret streams
            i = half[lo:lo + 91]
            sim.update(acts[i], tokens[i], prev[i], bool(held))
    got, ref = sim.scores()["tokens"]["all"], _brute_force_simulation(acts, tokens, rows)
    assert torch.isnan(got[3]) and torch.isnan(ref[3])
    keep = ~torch.isnan(ref)
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-6, atol=1e-6)   # fp32 token sums
    assert got[0] > 0.4 and abs(got[2]) < 0.3


def test_one_pass_per_layer_writes_what_one_pass_for_all_writes(interpreted, tmp_path):
    """A table budget too small for two layers reads the text once per layer (``passes``); every
    record and the summary's scores are those of a single pass over all layers."""
    from sc_steer.interpret.features import passes, unit_sets

    lm = interpreted["lm"]
    saes = {"resid_post.0": firing_sae(d_sae=40, seed=2, gain=4.0, bias=-0.2), "resid_post.1": interpreted["sae"]}
    sets = unit_sets(lm, saes)
    assert [[us.key for us in g] for g in passes(sets, 100, 10, budget=0)] == \
        [["sae/resid_post.0", "resid/resid_post.0", "mlp/mlp_act.0"], ["sae/resid_post.1", "resid/resid_post.1",
                                                                        "mlp/mlp_act.1"]]
    assert len(passes(sets, 100, 10, budget=1 << 40)) == 1
    got = {}
    for budget in (0, 1 << 40):
        out = tmp_path / str(budget)
        summary = interpret(lm, saes, interpreted["text"], out, ctx=20, batch_size=2, top_n=6, window=4,
                            min_count=1, table_budget=budget, progress=False)
        assert summary["passes"] == (2 if budget == 0 else 1)
        got[budget] = ({p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.jsonl")},
                       {k: v["explain"] for k, v in summary["sets"].items()})
    assert len(got[0][0]) == 6 and got[0] == got[1 << 40]
