"""Per-prompt graphs: every edge against one full forward with plain transformers hooks per
(feature, position) removal, influence pruning, the planted-path circuit, the frontend layout."""

import json

import pytest
import torch
from helpers import firing_sae

from sc_steer import ScSteerError, open_model
from sc_steer.graph.prompt_build import influence, prompt_graph_from
from sc_steer.graph.prompt_measure import measure_prompt

PROMPT = "To be, or not to be: 1 2 3."
BLOCKS = {"llama": lambda m: m.model.layers, "gpt2": lambda m: m.transformer.h, "gpt_neox": lambda m: m.gpt_neox.layers}


def formula(sae, h):
    """The SAE's activations written out: ReLU, or ReLU of the k largest pre-activations."""
    pre = (h - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.cfg.k:
        kth = pre.topk(sae.cfg.k, dim=-1).values[..., -1:]
        return torch.where(pre >= kth, pre.clamp_min(0), torch.zeros_like(pre))
    return pre.clamp_min(0)


def hooked(lm, family, ids, edit_at=None, edit=None, zero_input_at=None):
    """One plain forward: the block outputs (after ``edit`` at block ``edit_at``) and the logits."""
    blocks = BLOCKS[family](lm.hf)
    outs, handles = {}, []
    for n, blk in enumerate(blocks):
        def hook(_m, _a, out, n=n):
            h = out[0] if isinstance(out, tuple) else out
            if n == edit_at:
                h = edit(h.clone())
            outs[n] = h
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles.append(blk.register_forward_hook(hook))
    if zero_input_at is not None:
        def pre(_m, args, kwargs):
            h = args[0].clone()
            h[0, zero_input_at] = 0
            return (h, *args[1:]), kwargs
        handles.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = lm.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return outs, logits[0, -1]


def saes_for(n_layers, d=32):
    return {f"resid_post.{n}": firing_sae(("relu", "topk")[n % 2], d, 40, 20 + n, k=(None, 6)[n % 2])
            for n in range(n_layers)}


@pytest.mark.parametrize("family,layers", [("llama", [0, 1, 2]), ("llama", [0, 1]), ("gpt2", [0, 1, 2]),
                                           ("gpt_neox", [1, 2])])
def test_every_edge_equals_a_full_forward_per_removal(tiny_model_dirs, family, layers):
    """Feature -> feature, embedding -> feature and feature -> logit weights, within 1e-5; a graph whose
    top layer is not the model's last runs the rest of the model for its logit edges."""
    lm = open_model(str(tiny_model_dirs[family]))
    saes = saes_for(3)
    pe = measure_prompt(lm, {f"resid_post.{n}": saes[f"resid_post.{n}"] for n in layers}, PROMPT, max_rows=7)
    ids = torch.tensor([pe.token_ids])
    keep = pe.keep
    clean, clean_logits = hooked(lm, family, ids)
    f = {n: formula(saes[f"resid_post.{n}"], clean[n][0]) * keep[:, None] for n in layers}
    for n in layers:        # the nodes are the active (position, feature) pairs with their activations
        want = (f[n] > 0).nonzero()
        assert torch.equal(pe.nodes[n], want)
        torch.testing.assert_close(pe.acts[n], f[n][want[:, 0], want[:, 1]], atol=1e-5, rtol=0)
    assert len(pe.logit_ids) >= 1 and pe.logit_ids[0] == clean_logits.argmax()
    torch.testing.assert_close(pe.logit_probs, torch.softmax(clean_logits, -1)[pe.logit_ids], atol=1e-6, rtol=0)
    checked = 0
    for n in layers:
        sae = saes[f"resid_post.{n}"]
        src = pe.nodes[n]
        for r in range(0, len(src), 3):                         # every third removal, to keep it quick
            t, i = (int(x) for x in src[r])

            def remove(h, t=t, i=i, sae=sae, a=float(pe.acts[n][r])):
                h[0, t] -= a * sae.W_dec[i]
                return h
            outs, logits = hooked(lm, family, ids, edit_at=n, edit=remove)
            if n != layers[-1]:
                tgt = pe.nodes[n + 1]
                g = formula(saes[f"resid_post.{n + 1}"], outs[n + 1][0])
                want = f[n + 1][tgt[:, 0], tgt[:, 1]] - g[tgt[:, 0], tgt[:, 1]]
                torch.testing.assert_close(pe.edges[n][r], want, atol=1e-5, rtol=0)
            else:
                want = clean_logits[pe.logit_ids] - logits[pe.logit_ids]
                torch.testing.assert_close(pe.logit_edges[r], want, atol=1e-5, rtol=0)
            checked += 1
    assert checked >= 10
    if layers[0] == 0:
        assert torch.equal(pe.embed_pos, keep.nonzero()[:, 0])
        for e, t in enumerate(pe.embed_pos.tolist()):
            outs, _ = hooked(lm, family, ids, zero_input_at=t)
            tgt = pe.nodes[0]
            g = formula(saes["resid_post.0"], outs[0][0])
            torch.testing.assert_close(pe.embed_edges[e], f[0][tgt[:, 0], tgt[:, 1]] - g[tgt[:, 0], tgt[:, 1]],
                                       atol=1e-5, rtol=0)
    else:
        assert pe.embed_edges is None
    assert max(pe.edges[n].abs().max() for n in layers[:-1]) > 1e-2 and pe.logit_edges.abs().max() > 1e-3


def test_influence_is_the_sum_over_paths_of_normalised_weights(tiny_model_dirs):
    """Influence by brute force: enumerate every path to the logits and multiply its normalised weights."""
    lm = open_model(str(tiny_model_dirs["llama"]))
    pe = measure_prompt(lm, saes_for(3), "thou art lovely")
    got = influence(pe)
    norm = lambda w: w.abs().double() / w.abs().double().sum(0, keepdim=True).clamp_min(1e-30)
    p = pe.logit_probs.double() / pe.logit_probs.double().sum()
    a2, a1, a0 = norm(pe.logit_edges), norm(pe.edges[1]), norm(pe.edges[0])
    for i in range(0, len(pe.nodes[0]), 5):
        total = 0.0
        for j in range(len(pe.nodes[1])):
            for k in range(len(pe.nodes[2])):
                for m in range(len(p)):
                    total += float(a0[i, j] * a1[j, k] * a2[k, m] * p[m])
        assert float(got[0][i]) == pytest.approx(total, rel=1e-9, abs=1e-12)
    assert float(got[2].sum()) == pytest.approx(1.0, abs=1e-6) or float(pe.logit_edges.abs().sum(0).min()) == 0


def test_influence_pruning_keeps_the_nodes_that_carry_the_share(tiny_model_dirs):
    lm = open_model(str(tiny_model_dirs["llama"]))
    pe = measure_prompt(lm, saes_for(3), PROMPT)
    infl = influence(pe)
    sizes = []
    for amount in (0.3, 0.6, 0.9):
        g = prompt_graph_from(pe, prune="influence", amount=amount, edge_amount=1.0)
        feats = [d for _, d in g.nodes(data=True) if d["kind"] == "feature"]
        sizes.append(len(feats))
        # the nodes kept: the fewest most influential that carry `amount` of the total (by hand)
        every = sorted(((float(infl[n][r]), n, r) for n in pe.layers for r in range(len(pe.nodes[n]))), reverse=True)
        total, run, chosen = sum(x[0] for x in every), 0.0, set()
        for v, n, r in every:
            if run >= amount * total:
                break
            run += v
            t, i = pe.nodes[n][r].tolist()
            chosen.add(f"L{n}/F{i}@{t}")
        ids = {n for n, d in g.nodes(data=True) if d["kind"] == "feature"}
        assert ids <= chosen and len(ids) >= 0.5 * len(chosen)
        assert {d["kind"] for _, d in g.nodes(data=True)} >= {"feature", "logit"}
        logits = [d for _, d in g.nodes(data=True) if d["kind"] == "logit"]
        assert len(logits) == len(pe.logit_ids) and all(d["position"] == pe.last for d in logits)
        for u, v, d in g.edges(data=True):
            assert g.nodes[v]["position"] >= g.nodes[u]["position"]
            assert g.nodes[v]["layer"] == g.nodes[u]["layer"] + 1 or g.nodes[v]["kind"] == "logit"
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    top = prompt_graph_from(pe, prune="top_k", amount=2)
    assert max(top.out_degree(n) for n in top) <= 2
    with pytest.raises(ScSteerError, match="expected one of influence"):
        prompt_graph_from(pe, prune="nope")
    with pytest.raises(ScSteerError, match="--amount"):
        prompt_graph_from(pe, prune="influence", amount=1.5)


def test_bad_prompts_are_refused(tiny_model_dirs):
    lm = open_model(str(tiny_model_dirs["llama"]))
    saes = saes_for(3)
    with pytest.raises(ScSteerError, match="non-empty"):
        measure_prompt(lm, saes, "   ")
    with pytest.raises(ScSteerError, match="at most 7 after BOS"):
        measure_prompt(lm, saes, PROMPT * 3, ctx=8)
    with pytest.raises(ScSteerError, match="consecutive"):
        measure_prompt(lm, saes, PROMPT, layers=[0, 2])
    with pytest.raises(ScSteerError, match="no SAE for resid_post.2"):
        measure_prompt(lm, {"resid_post.1": saes["resid_post.1"]}, PROMPT, layers=[1, 2])


@pytest.fixture(scope="module")
def prompt_run(tiny_model_dirs, tmp_path_factory):
    """A run folder: the tiny Llama and an SAE at each of its three layers."""
    run = tmp_path_factory.mktemp("promptrun")
    for name, sae in saes_for(3).items():
        sae.save(run / "saes" / name)
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    return run


def strict(path):
    def bad(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=bad)


def test_the_cli_writes_a_prompt_graph_in_every_format_and_the_frontend_layout(prompt_run, tmp_path):
    import networkx as nx
    from safetensors.torch import load_file

    from sc_steer.cli import main
    from sc_steer.graph.frontend import read_frontend

    out = tmp_path / "pg"
    assert main(["graph", "--run", str(prompt_run), "--prompt", PROMPT, "--out", str(out), "--curve", "0.5,0.8,0.95"]) == 0
    g = nx.node_link_graph(strict(out / "graph.json"), edges="links")
    attrs = g.graph
    assert attrs["kind"] == "prompt" and attrs["prompt"] == PROMPT and attrs["prune"] == "influence"
    assert -0.5 < attrs["faithfulness"] < 1.5 and attrs["metric_at"] == "last"
    assert [c["amount"] for c in json.loads(attrs["faithfulness_curve"])] == [0.5, 0.8, 0.95]
    kinds = {d["kind"] for _, d in g.nodes(data=True)}
    assert kinds == {"feature", "embedding", "logit"}
    recipe = strict(out / "recipe.json")
    assert recipe["prompt"] == PROMPT and recipe["layers"] == [0, 1, 2]
    assert recipe["scores"] == {"faithfulness": attrs["faithfulness"], "completeness": attrs["completeness"],
                                "metric": "next_token", "metric_at": "last"}
    eff = load_file(str(out / "effects.safetensors"))
    assert {"edges_L0", "edges_L1", "logit_edges", "embed_edges", "nodes_L2"} <= set(eff)
    # the frontend's layout, field by field, logits and embeddings included
    data = strict(out / "graph-frontend.json")
    meta = data["metadata"]
    tokens = json.loads(attrs["prompt_tokens"])
    assert meta["prompt_tokens"] == tokens and meta["prompt"] == PROMPT and meta["node_threshold"] == 0.8
    types = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
             "is_target_logit": bool, "jsNodeId": str, "clerp": str, "run_idx": int, "reverse_ctx_idx": int}
    by_type = {}
    for n in data["nodes"]:
        assert all(isinstance(n[k], t) for k, t in types.items()), n
        assert n["influence"] is None or isinstance(n["influence"], float)
        assert n["activation"] is None or isinstance(n["activation"], float)
        by_type.setdefault(n["feature_type"], []).append(n)
    assert set(by_type) == {"cross layer transcoder", "embedding", "logit"}
    for n in by_type["cross layer transcoder"]:
        assert n["node_id"] == f"{n['layer']}_{n['feature']}_{n['ctx_idx']}" and isinstance(n["activation"], float)
    for n in by_type["embedding"]:
        assert n["layer"] == "E" and n["node_id"].startswith("E_") and n["feature"] == n["ctx_idx"]
    logits = by_type["logit"]
    assert all(n["layer"] == "4" and n["ctx_idx"] == len(tokens) - 1 for n in logits)   # 3 layers: logits at 3 + 1
    assert sum(n["is_target_logit"] for n in logits) == 1
    assert max(logits, key=lambda n: n["token_prob"])["is_target_logit"]
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"]) == g.number_of_nodes() and len(data["links"]) == g.number_of_edges()
    assert all(e["source"] in ids and e["target"] in ids for e in data["links"])
    back = read_frontend(out / "graph-frontend.json")
    assert back.number_of_edges() == g.number_of_edges()
    assert {d["kind"] for _, d in back.nodes(data=True)} == kinds
    # the HTML view: token columns and layer rows with headers
    page = (out / "graph.html").read_text()
    assert "embeddings" in page and "logits" in page and "layer 2" in page and f"{len(tokens) - 1}: " in page
    assert (out / "graph.png").stat().st_size > 5000 and (out / "faithfulness.png").exists()


def test_prompt_graph_bad_input(prompt_run, tmp_path, capsys):
    from sc_steer.cli import main

    cases = [(["--prompt", "  "], "--prompt: expected a non-empty text"),
             (["--prompt", PROMPT, "--prune", "influence", "--amount", "2"], "--amount"),
             (["--prune", "influence"], "--prune influence needs --prompt"),
             (["--prompt", PROMPT, "--edge-amount", "0"], "--edge-amount"),
             (["--prompt", PROMPT, "--logits", "0"], "--logits"),
             (["--prompt", PROMPT, "--logit-diff", "the cat", " the"], "is 2 tokens"),
             (["--prompt", PROMPT * 30], "raise --ctx")]
    for i, (extra, want) in enumerate(cases):
        code = main(["graph", "--run", str(prompt_run), "--out", str(tmp_path / f"b{i}"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and want in err and "Traceback" not in err, (extra, err)


def _hook_metric(lm, saes, ids, masks, metric, target=None):
    """Plain hooks: at each layer h -= (f * mask[T, S]) W_dec at text positions, then the metric at the
    last position (the clean model's own next token's log-prob, or a logit difference)."""
    handles = []
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[0] = False
    for n, mask in masks.items():
        sae = saes[f"resid_post.{n}"]

        def hook(_m, _i, out, sae=sae, mask=mask):
            h = out[0] if isinstance(out, tuple) else out
            f = formula(sae, h[0])
            h = h - (((f * mask) @ sae.W_dec) * keep[:, None])[None]
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles.append(lm.hf.model.layers[n].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = lm.hf(input_ids=ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    if metric == "next_token":
        t = int(logits.argmax()) if target is None else target
        return float(torch.log_softmax(logits, -1)[t]), t
    return float(logits[metric[1]] - logits[metric[2]]), None


def test_positional_faithfulness_and_completeness_equal_plain_hooks(prompt_run, tmp_path):
    from sc_steer.graph.faithfulness import circuit_features, circuit_scores
    from sc_steer.graph.prompt_measure import prompt_batch
    from sc_steer.graph.prompt_run import prompt_feature_graph
    from sc_steer.rundir import load_run_saes

    saes = load_run_saes(prompt_run)
    lm = open_model(json.loads((prompt_run / "run.json").read_text())["model"])
    g, _ = prompt_feature_graph(lm, saes, PROMPT, tmp_path / "f", amount=0.6, formats=("json",), progress=False)
    feats = circuit_features(g)
    assert all(isinstance(x, tuple) for v in feats.values() for x in v)
    batch = prompt_batch(lm, PROMPT, 64)
    T = batch.input_ids.shape[1]
    masks = {}
    for n in range(3):
        m = torch.zeros(T, 40)
        for t, i in feats.get(n, []):
            m[t, i] = 1.0
        masks[n] = m
    for metric in ("next_token", ("logit_diff", 5, 9)):
        got = circuit_scores(lm, saes, [batch], feats, metric, at="last")
        layers = sorted(feats)
        full, own = _hook_metric(lm, saes, batch.input_ids, {n: 0 * masks[n] for n in layers}, metric)
        none, _ = _hook_metric(lm, saes, batch.input_ids, {n: torch.ones(T, 40) for n in layers}, metric, own)
        only, _ = _hook_metric(lm, saes, batch.input_ids, {n: 1 - masks[n] for n in layers}, metric, own)
        without, _ = _hook_metric(lm, saes, batch.input_ids, {n: masks[n] for n in layers}, metric, own)
        for k, want in (("full", full), ("none", none), ("circuit_only", only), ("circuit_ablated", without)):
            assert got[k] == pytest.approx(want, rel=1e-5, abs=1e-5), (metric, k)
        assert abs(full - none) > 1e-3
    assert g.graph["faithfulness"] == pytest.approx(circuit_scores(lm, saes, [batch], feats, at="last")["faithfulness"])


@pytest.fixture(scope="module")
def planted(tiny_model_dirs, tmp_path_factory):
    """A 2-layer Llama with one planted path. Attention writes nothing and block 0 is the identity, so
    resid_post.0 is the embedding: every token carries 3 along e0 plus small noise elsewhere (never
    along e0 or e1). Block 1's MLP reads e0, writes ~3 along e1 and (nearly) cancels e0; the
    unembedding reads e1 for token X only. The SAEs are the signed axes (feature k = relu(h_k), feature d + k = relu(-h_k)): exact
    reconstructions, so feature 0 at layer 0 alone drives feature 1 at layer 1, which alone drives X."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sc_steer.sae import SAEConfig, make_sae

    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    d, X = 16, 7
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        emb = 0.1 * torch.randn(len(tok), d)
        emb[:, :2] = 0
        emb[:, 0] = 3.0
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                p.weight.zero_()
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[0, 0] = 4.0
        mlp.up_proj.weight[0, 0] = 1.0
        mlp.down_proj.weight[1, 0] = 0.05
        x0 = float((3.0 / emb.pow(2).mean(1).sqrt()).mean())            # what the MLP's unit 0 reads from e0
        mlp.down_proj.weight[0, 0] = -3.0 / float(torch.nn.functional.silu(torch.tensor(4 * x0)) * x0)
        head = 0.01 * torch.randn(len(tok), d)
        head[X] = 0
        head[X, 1] = 5.0
        model.lm_head.weight.copy_(head)
    path = tmp_path_factory.mktemp("planted")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    saes = {}
    for n in range(2):
        sae = make_sae(SAEConfig(architecture="relu", d_in=d, d_sae=2 * d))
        with torch.no_grad():
            eye = torch.eye(d)
            sae.W_enc.copy_(torch.cat([eye, -eye], 1))
            sae.W_dec.copy_(torch.cat([eye, -eye], 0))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        saes[f"resid_post.{n}"] = sae
    return open_model(str(path)), saes, X


def test_a_planted_path_is_found_and_scores_near_one_and_the_rest_near_zero(planted, tmp_path):
    from sc_steer.graph.faithfulness import circuit_features, circuit_scores
    from sc_steer.graph.prompt_measure import prompt_batch
    from sc_steer.graph.prompt_run import prompt_feature_graph

    lm, saes, X = planted
    batch = prompt_batch(lm, PROMPT, 64)
    last = batch.input_ids.shape[1] - 1
    metric = ("logit_diff", X, 8)
    # averaged circuits: the path's features against every other feature
    path = {0: [0], 1: [1]}
    others = {0: list(range(1, 32)), 1: [0, *range(2, 32)]}
    for m in ("next_token", metric):
        on = circuit_scores(lm, saes, [batch], path, m)
        off = circuit_scores(lm, saes, [batch], others, m)
        assert on["faithfulness"] == pytest.approx(1.0, abs=0.1) and on["completeness"] == pytest.approx(1.0, abs=0.1), m
        assert abs(off["faithfulness"]) < 0.1 and abs(off["completeness"]) < 0.1, m
    # the per-prompt graph finds the path by itself, down to X
    g, _ = prompt_feature_graph(lm, saes, PROMPT, tmp_path / "p", formats=("json",), metric=metric, progress=False)
    assert g.nodes[f"logit/{X}"]["activation"] > 0.9                       # the model is sure of X
    for u, v in ((f"L0/F0@{last}", f"L1/F1@{last}"), (f"L1/F1@{last}", f"logit/{X}")):
        assert g.has_edge(u, v) and g.edges[u, v]["weight"] > 1.0, (u, v)
    assert g.graph["faithfulness"] == pytest.approx(1.0, abs=0.1)
    assert g.graph["completeness"] == pytest.approx(1.0, abs=0.1)
    assert circuit_features(g) == {0: [(last, 0)], 1: [(last, 1)]}
    # every other active (position, feature) node, the path's two left out, explains nothing
    pe = measure_prompt(lm, saes, PROMPT)
    rest = {n: [tuple(x) for x in pe.nodes[n].tolist() if tuple(x) != (last, (0, 1)[n])] for n in (0, 1)}
    cut = circuit_scores(lm, saes, [batch], rest, metric, at="last")
    assert abs(cut["faithfulness"]) < 0.1 and abs(cut["completeness"]) < 0.1


@pytest.mark.slow
def test_the_prompt_graph_view_in_a_browser_has_token_columns_layer_rows_and_sorted_edges(prompt_run, tmp_path):
    import re

    from helpers import launch_chromium

    from sc_steer.cli import main

    playwright = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "view"
    assert main(["graph", "--run", str(prompt_run), "--prompt", PROMPT, "--out", str(out), "--amount", "0.9"]) == 0
    tokens = json.loads(json.loads((out / "graph.json").read_text())["graph"]["prompt_tokens"])
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.goto((out / "graph.html").as_uri())
        heads = page.locator("text.layer").all_text_contents()
        assert {"embeddings", "layer 0", "layer 1", "layer 2", "logits"} <= set(heads)
        assert f"{len(tokens) - 1}: {tokens[-1]!r}" in heads
        page.locator(".node[data-id^='logit/']").first.click()
        info = page.inner_text("#info")
        assert f"position {len(tokens) - 1}" in info and "through the next block" not in info
        weights = [abs(float(x)) for x in re.findall(r"→ logit/\d+\s+(-?[\d.e+-]+)", info)]
        assert len(weights) >= 2 and weights == sorted(weights, reverse=True)
        browser.close()


def test_every_gallery_graph_parses_strictly_and_its_readme_gives_its_scores():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "graphs"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert {p.name for p in folders} >= {"demo", "demo-through", "demo-prompt"}
    table = (root / "README.md").read_text()
    for folder in folders:
        attrs = strict(folder / "graph.json")["graph"]
        strict(folder / "graph-frontend.json")
        recipe = strict(folder / "recipe.json")
        assert ("prompt" in recipe) == (attrs.get("kind") == "prompt")
        assert recipe["scores"]["faithfulness"] == attrs["faithfulness"]
        readme = (folder / "README.md").read_text()
        for key in ("faithfulness", "completeness"):
            shown = f"{attrs[key]:.3f}"
            assert shown in readme and shown in table, (folder.name, key, shown)
        assert (folder / "faithfulness.png").exists()


def test_logit_nodes_are_the_fewest_tokens_reaching_the_probability():
    from sc_steer.graph.prompt_measure import top_logits

    p = torch.tensor([0.05, 0.5, 0.2, 0.25])
    assert top_logits(p, 10, 0.5).tolist() == [1]            # the top token alone reaches 0.5
    assert top_logits(p, 10, 0.6).tolist() == [1, 3]
    assert top_logits(p, 10, 0.95).tolist() == [1, 3, 2]
    assert top_logits(p, 2, 0.99).tolist() == [1, 3]          # capped
