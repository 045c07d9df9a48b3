"""Steering scores, the methods comparison and steerability, each against a computation written here with
plain transformers forward hooks and the SAE formula on a tiny Llama (unpadded, one sequence at a time)."""
import math

import pytest
import torch
from helpers import firing_sae

from sc_steer import ScSteerError, open_model
from sc_steer.sites import Site
from sc_steer.steer import Intervention
from sc_steer.steer.compare import fluency, harmonic, steer_eval, summarise
from sc_steer.steer.generate import generate_batch, left_pad
from sc_steer.steer.recipe import Recipe
from sc_steer.steer.scores import (
    Concept,
    continuation_mask,
    repeated_share,
    score_continuations,
)
from sc_steer.steer.steerability import output_scores

SITE = "resid_post.1"
PROMPTS = ["In the beginning God created the heaven", "To be, or not"]


@pytest.fixture(scope="module")
def setup(tiny_model_dirs):
    lm = open_model(str(tiny_model_dirs["llama"]))
    return lm, {SITE: firing_sae()}


def sae_formula(sae, h):
    """ReLU SAE by hand: relu((h - b_dec) W_enc + b_enc)."""
    return torch.relu((h.float() - sae.b_dec) @ sae.W_enc + sae.b_enc)


def hooked(lm, ids, add=None):
    """Logits of one unpadded sequence and block 1's output, adding ``add(h)`` to it where given."""
    got = {}

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        if add is not None:
            h = h + add(h)
        got["h"] = h
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = lm.module(Site.parse(SITE, lm.n_layers)).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.hf(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        handle.remove()
    return logits, got["h"][0]


def rows_of(lm, prompts):
    tok = lm.tokenizer
    return [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def lens_by_hand(lm, direction, k=10):
    """Llama: RMSNorm's gain; GPT-2: LayerNorm centres first, then its gain."""
    d = direction.detach().float()
    if hasattr(lm.hf, "transformer"):
        d = (d - d.mean()) * lm.hf.transformer.ln_f.weight.detach().float()
    else:
        d = d * lm.hf.model.norm.weight.detach().float()
    return set((lm.hf.lm_head.weight.detach().float() @ d).topk(k).indices.tolist())


def reference_scores(lm, sae, feature, prompt_row, cont, steered_row=None, add=None):
    """Every score of one continuation (already cut at its EOS), computed by hand."""
    n = len(prompt_row)
    logits, h = hooked(lm, prompt_row + cont)
    lp = torch.log_softmax(logits, -1)
    lens = sorted(lens_by_hand(lm, sae.W_dec[feature].detach()))
    m = len(cont)
    concept = sae_formula(sae, h[n:n + m])[:, feature].mean()
    token_lp = torch.stack([lp[n - 1 + j, cont[j]] for j in range(m)]).mean()
    lens_lp = torch.stack([torch.logsumexp(lp[n + j, lens], 0) for j in range(m)]).mean()
    s_row = steered_row or prompt_row
    s_logits, _ = hooked(lm, s_row + cont, add)
    ls = torch.log_softmax(s_logits, -1)
    ns = len(s_row)
    kl = torch.stack([(ls[ns - 1 + j].exp() * (ls[ns - 1 + j] - lp[n - 1 + j])).sum() for j in range(m)]).mean()
    return {"concept": float(concept.detach()), "logprob": float(token_lp), "concept_lens": float(lens_lp), "kl": float(kl.detach()),
            "rep2": repeated_share(cont, 2), "rep3": repeated_share(cont, 3), "n_tokens": m}


def test_repetition_and_the_continuation_mask_by_hand():
    assert repeated_share([1, 2, 1, 2, 1], 2) == pytest.approx(0.5)          # (1,2) (2,1) (1,2) (2,1)
    assert repeated_share([1, 2, 1, 2, 1], 3) == pytest.approx(1 / 3)        # (1,2,1) (2,1,2) (1,2,1)
    assert repeated_share([5, 6], 3) == 0.0 and repeated_share([7, 8, 9], 2) == 0.0
    mask = continuation_mask(torch.tensor([[4, 2, 2, 2], [4, 5, 6, 7], [2, 9, 9, 9]]), eos_id=2)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]


@pytest.mark.parametrize("family, how", [("llama", "all"), ("llama", "generated"), ("llama", "prompting"),
                                         ("gpt2", "all")])
def test_every_score_equals_a_plain_hook_computation(setup, tiny_model_dirs, family, how):
    """Left-padded batch of two prompts of different lengths: each row's scores equal the same numbers
    computed one unpadded sequence at a time with plain hooks and the SAE formula. ``all`` / ``generated``:
    a feature added at every position / at the continuation's (KL against the edit); ``prompting``: text
    put before the prompt (KL against that context). GPT-2's learned positions catch a padded batch
    numbered from its padding."""
    lm, saes = setup if family == "llama" else (open_model(str(tiny_model_dirs[family])), setup[1])
    sae = saes[SITE]
    feature, coeff = 7, 6.0
    rows = rows_of(lm, PROMPTS)
    concept = Concept.of_feature(lm, saes, SITE, feature)
    assert set(concept.lens_ids.tolist()) == lens_by_hand(lm, sae.W_dec[feature].detach())
    if how != "prompting":
        items = [Intervention(SITE, feature, "add", coeff, how)]
        steered_rows, gen_rows = None, rows
        w = sae.W_dec[feature].detach()

        def add(h, b):   # every position but BOS, or the continuation's
            out = torch.zeros_like(h)
            out[:, 1 if how == "all" else len(rows[b]):] = coeff * w
            return out
    else:
        items, add = [], None
        prefix = lm.tokenizer("Exeunt all. Enter the King.\n", add_special_tokens=False)["input_ids"]
        steered_rows = gen_rows = [r[:1] + prefix + r[1:] for r in rows]
    ids, n = generate_batch(lm, left_pad(lm, gen_rows), Recipe(items) if items else None, saes, max_new_tokens=7)
    cont = ids[:, n:]
    cont[1, 3] = lm.tokenizer.eos_token_id     # an EOS mid-way: the row is scored up to it, no further
    got = score_continuations(lm, saes, concept, rows, cont, steered_rows=steered_rows, items=items)
    for b in range(2):
        c = cont[b].tolist()
        c = c[:c.index(lm.tokenizer.eos_token_id) + 1] if lm.tokenizer.eos_token_id in c else c
        want = reference_scores(lm, sae, feature, rows[b], c, None if steered_rows is None else steered_rows[b],
                                None if add is None else (lambda h, b=b: add(h, b)))
        assert got[b]["n_tokens"] == want["n_tokens"] == len(c)
        for k in ("concept", "logprob", "concept_lens", "kl", "rep2", "rep3"):
            assert got[b][k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), (b, k)
        assert want["kl"] > 1e-4     # the steered pass really differs
    assert got[1]["n_tokens"] == 4


def test_a_direction_concept_is_the_projection_on_its_unit_vector(setup):
    lm, saes = setup
    torch.manual_seed(0)
    d = torch.randn(lm.d_model)
    concept = Concept.of_direction(lm, SITE, d)
    rows = rows_of(lm, PROMPTS[:1])
    ids, n = generate_batch(lm, left_pad(lm, rows), None, saes, max_new_tokens=5)
    got = score_continuations(lm, saes, concept, rows, ids[:, n:])[0]
    _, h = hooked(lm, rows[0] + ids[0, n:].tolist())
    assert got["concept"] == pytest.approx(float((h[len(rows[0]):] @ (d / d.norm())).mean()), rel=1e-4, abs=1e-5)
    assert got["kl"] == 0.0
    with pytest.raises(ScSteerError, match="direction"):
        Concept.of_direction(lm, SITE, torch.zeros(lm.d_model))


def _firing_feature(lm, sae) -> int:
    """A feature that fires on some demo text and is silent on much of it (methods need both)."""
    tok = lm.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok("And God said, Let there be light: and there was light. "
                                                  "HAMLET. To be, or not to be, that is the question.",
                                                  add_special_tokens=False)["input_ids"]])
    _, h = hooked(lm, ids[0].tolist())
    on = (sae_formula(sae, h[1:]) > 0).float().mean(0)
    assert (on > 0).any(), on
    return int(torch.where(on > 0, on, 2.0).argmin())     # the rarest that fires


def test_a_zero_coefficient_scores_exactly_as_the_unsteered_run(setup):
    lm, saes = setup
    f = _firing_feature(lm, saes[SITE])
    res = steer_eval(lm, saes, [(SITE, f)], PROMPTS, methods=("add", "actadd", "mean_diff"), coeffs=[0.0],
                     max_new_tokens=6, seeds=(3,), vector_tokens=3000, progress=False)
    base = {(s["decoding"], s["prompt"]): s for s in res["samples"] if s["method"] == "none"}
    steered = [s for s in res["samples"] if s["method"] != "none"]
    assert len(steered) == 3 * 2 * 2
    for s in steered:
        b = base[(s["decoding"], s["prompt"])]
        assert s["text"] == b["text"]
        for k in ("concept", "concept_lens", "logprob", "rep2", "rep3", "n_tokens"):
            assert s[k] == b[k], (s["method"], k)
        assert s["kl"] == 0.0
    for c in res["chosen"]:
        assert c["C"] == 0.0 and c["F"] == 1.0 and c["H"] == 0.0 and c["wrong_way"] == 0.0


def _sample(method, coeff, prompt, concept, logprob, rep=0.0, decoding="greedy"):
    return {"feature": "s:1", "method": method, "coeff": coeff, "decoding": decoding, "seed": None, "prompt": prompt,
            "text": "", "concept": concept, "concept_lens": 0.0, "logprob": logprob, "rep2": rep, "rep3": rep,
            "kl": 0.1 * (coeff or 0)}


def test_the_matched_cost_choice_by_hand():
    """Two prompts: prompt 0 chooses, prompt 1 scores. Unsteered: concept 1, logprob -3, no repetition;
    on-topic text holds 4.
    add at 2 reaches concept 3 with fluency exp(-0.1) = 0.905; at 4 concept 5 but fluency exp(-1) = 0.37,
    under the 0.7 bound: 2 is chosen on prompt 0. Scored on prompt 1 (concept 2 vs unsteered 1, on-topic
    4): C = 1/3, F = exp(-0.2), H their harmonic mean (prompt 1 alone would have
    chosen 4, fluent there). clamp never keeps fluency
    within the bound: none chosen, H = 0."""
    s = [_sample("none", 0.0, 0, 1.0, -3.0), _sample("none", 0.0, 1, 1.0, -3.0),
         _sample("add", 2.0, 0, 3.0, -3.1), _sample("add", 4.0, 0, 5.0, -4.0),
         _sample("add", 2.0, 1, 2.0, -3.2), _sample("add", 4.0, 1, 4.0, -3.1),
         _sample("clamp", 2.0, 0, 9.0, -5.0), _sample("clamp", 2.0, 1, 0.5, -5.0)]
    r = summarise(s, {"s:1": 4.0}, ("add", "clamp"), 0.7, n_prompts=2)
    add = next(c for c in r["chosen"] if c["method"] == "add")
    assert add["coeff"] == 2.0 and add["within"]
    assert add["C"] == pytest.approx(1 / 3) and add["F"] == pytest.approx(math.exp(-0.2))
    assert add["H"] == pytest.approx(2 * (1 / 3) * math.exp(-0.2) / (1 / 3 + math.exp(-0.2)))
    assert add["wrong_way"] == 0.0 and add["kl"] == pytest.approx(0.2)
    clamp = next(c for c in r["chosen"] if c["method"] == "clamp")
    assert clamp["coeff"] is None and not clamp["within"] and clamp["H"] == 0.0
    clamp_row = next(t for t in r["table"] if t["method"] == "clamp")
    assert clamp_row["wrong_way"] == 1.0           # 0.5 below the unsteered 1.0 on prompt 1
    assert [m["method"] for m in r["methods"]] == ["add", "clamp"] and r["methods"][0]["wins"] == 1
    assert fluency(-3.0, 0.5, -3.0, 0.0) == pytest.approx(0.5) and harmonic(0.0, 0.0) == 0.0


def test_output_scores_equal_a_feature_by_feature_loop(setup):
    """Batched over features (rows of different features in one pass, left-padded prompts): each feature's
    score equals pushing it alone, on each unpadded prompt, by hand."""
    lm, saes = setup
    sae = saes[SITE]
    feats = [0, 3, 7, 11, 19]
    res = output_scores(lm, sae, SITE, PROMPTS, features=feats, batch=2, scale=0.5, progress=False)
    rows = rows_of(lm, PROMPTS)
    norms = [hooked(lm, r)[1][1:].norm(dim=-1) for r in rows]
    coeff = 0.5 * float(torch.cat(norms).mean())
    assert res["coeff"] == pytest.approx(coeff, rel=1e-5)
    for f, got in zip(feats, res["scores"]):
        w = sae.W_dec[f].detach()
        lens = sorted(lens_by_hand(lm, w))
        gains = []
        for r in rows:
            p0 = torch.softmax(hooked(lm, r)[0][-1], -1)

            def push(h, w=w):
                out = torch.zeros_like(h)
                out[:, 1:] = coeff * w
                return out
            p1 = torch.softmax(hooked(lm, r, push)[0][-1], -1)
            gains.append(float(p1[lens].sum() - p0[lens].sum()))
        assert got == pytest.approx(sum(gains) / len(gains), rel=1e-4, abs=1e-6), f


def test_bad_input_to_steer_eval(setup):
    lm, saes = setup
    with pytest.raises(ScSteerError, match="coeffs"):
        steer_eval(lm, saes, [(SITE, 1)], PROMPTS, coeffs=[1.0, float("nan")], progress=False)
    with pytest.raises(ScSteerError, match="out of range"):
        steer_eval(lm, saes, [(SITE, 10_000)], PROMPTS, progress=False)
    with pytest.raises(ScSteerError, match="methods"):
        steer_eval(lm, saes, [(SITE, 1)], PROMPTS, methods=("add", "shout"), progress=False)
    with pytest.raises(ScSteerError, match="prompt"):
        steer_eval(lm, saes, [(SITE, 1)], [], progress=False)


def test_a_feature_that_never_fires_is_skipped_with_its_reason(setup):
    lm, _ = setup
    sae = firing_sae()
    good = _firing_feature(lm, sae)
    dead = (good + 1) % sae.cfg.d_sae
    with torch.no_grad():
        sae.b_enc[dead] = -1e6
    res = steer_eval(lm, {SITE: sae}, [(SITE, dead), (SITE, good)], PROMPTS[:1], methods=("add",), coeffs=[2.0],
                     max_new_tokens=3, seeds=(), vector_tokens=2000, progress=False)
    assert res["skipped"] == [{"feature": f"{SITE}:{dead}", "why": "never fires on 2,000 tokens of 'demo'"}]
    assert [f["feature"] for f in res["facts"]] == [f"{SITE}:{good}"]
    with pytest.raises(ScSteerError, match="never fires"):
        steer_eval(lm, {SITE: sae}, [(SITE, dead)], PROMPTS[:1], progress=False, vector_tokens=2000)


def test_feature_facts_by_brute_force(setup):
    """Peak, on-topic level (best 24-token stretch per row, the 16 best rows averaged), the mean
    difference and the prompting text, each recomputed row by row with plain hooks."""
    from sc_steer.interpret.features import rows_upto
    from sc_steer.steer.methods import feature_facts

    lm, saes = setup
    sae = saes[SITE]
    f = _firing_feature(lm, sae)
    (ft,), skipped = feature_facts(lm, saes, [(SITE, f)], "demo", max_tokens=2500, window=24, progress=False)
    assert not skipped
    rows = rows_upto("demo", lm.tokenizer, 64, 2500)
    acts, hs, best = [], [], []
    for r in rows:
        _, h = hooked(lm, r.ids)
        a = sae_formula(sae, h[1:])[:, f].detach()       # text tokens only (BOS first)
        acts.append(a)
        hs.append(h[1:].detach())
        n = min(24, len(a))
        best.append(max(float(a[i:i + n].mean()) for i in range(len(a) - n + 1)))
    a_all, h_all = torch.cat(acts), torch.cat(hs)
    assert ft.peak == pytest.approx(float(a_all.max()), rel=1e-4)
    assert ft.on_topic == pytest.approx(sum(sorted(best)[-16:]) / 16, rel=1e-4)
    strong = a_all >= 0.5 * a_all.max()
    diff = h_all[strong].mean(0) - h_all[~strong].mean(0)
    assert torch.allclose(ft.mean_diff, diff / diff.norm(), atol=1e-4)
    r = max(range(len(rows)), key=lambda i: float(acts[i].max()))
    p = int(acts[r].argmax()) + 1                              # position in the row, BOS at 0
    assert ft.top_window == rows[r].ids[max(1, p - 15):p + 1]


def test_measure_effects_reports_the_scores_of_both_continuations(setup):
    from sc_steer.steer import generate_ids, measure_effects

    lm, saes = setup
    recipe = Recipe([Intervention(SITE, 7, "add", 6.0, "all")])
    rep = measure_effects(lm, PROMPTS[:1], recipe, saes, max_new_tokens=6, concept=(SITE, 7))["prompts"][0]
    s_ids, n = generate_ids(lm, PROMPTS[:1], recipe, saes, max_new_tokens=6)
    b_ids, _ = generate_ids(lm, PROMPTS[:1], None, saes, max_new_tokens=6)
    want = reference_scores(lm, saes[SITE], 7, s_ids[0, :n].tolist(), s_ids[0, n:].tolist(),
                            add=lambda h: torch.cat([torch.zeros_like(h[:, :1]), 0 * h[:, 1:] + 6.0 * saes[SITE].W_dec[7]], 1))
    base = reference_scores(lm, saes[SITE], 7, b_ids[0, :n].tolist(), b_ids[0, n:].tolist())
    for k in ("concept", "logprob", "kl", "rep2"):
        assert rep["scores"][k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
        assert rep["scores_baseline"][k] == pytest.approx(base[k], rel=1e-4, abs=1e-5), k
    assert rep["scores_baseline"]["kl"] == 0.0 and rep["scores"]["kl"] == pytest.approx(sum(rep["kl_per_step"]) / len(rep["kl_per_step"]), rel=1e-4)


def test_scoring_several_concepts_at_once_equals_scoring_each(setup):
    """One unsteered and one steered pass for every concept: the same numbers as one call per concept."""
    from sc_steer.steer.scores import score_concepts

    lm, saes = setup
    rows = rows_of(lm, PROMPTS)
    items = [Intervention(SITE, 7, "add", 6.0, "all")]
    ids, n = generate_batch(lm, left_pad(lm, rows), Recipe(items), saes, max_new_tokens=6)
    torch.manual_seed(1)
    concepts = [Concept.of_feature(lm, saes, SITE, 7), Concept.of_direction(lm, "resid_post.2", torch.randn(lm.d_model)),
                Concept.of_feature(lm, saes, SITE, 11)]
    together = score_concepts(lm, saes, concepts, rows, ids[:, n:], items=items)
    for c, got in zip(concepts, together):
        assert got == score_continuations(lm, saes, c, rows, ids[:, n:], items=items)
