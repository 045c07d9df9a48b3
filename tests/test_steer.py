"""Steering: nnsight generation against an independent forward-hook implementation, recipes, ActAdd."""
import json

import pytest
import torch

from sc_steer import ScSteerError, open_model
from helpers import firing_sae
from sc_steer.steer import Intervention, Recipe, actadd_vector, decompose, generate

PROMPTS = ["In the beginning God created", "To be, or not to be: that is"]


def busiest_feature(lm, saes) -> int:
    """The feature firing at most prompt positions of block 1 (remove/clamp/scale act on its value, so
    a feature that is silent there would make them no-ops and the comparisons blind)."""
    got = {}
    h = lm.hf.model.layers[1].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            lm.hf(**lm.tokenizer(PROMPTS, return_tensors="pt", padding=True))
    finally:
        h.remove()
    f = saes["resid_post.1"].encode(got["h"]).flatten(0, 1)
    return int(((f > 0).sum(0) + f.mean(0) / (f.mean(0).max() + 1e-9)).argmax())


@pytest.fixture(scope="module")
def steer_setup(tiny_model_dirs):
    lm = open_model(str(tiny_model_dirs["llama"]))
    return lm, {"resid_post.1": firing_sae()}


def generate_with(lm, enc, register, max_new_tokens: int) -> list[str]:
    """Greedy transformers generate with one hand-made hook: ``register()`` installs it, returning its handle."""
    hd = register()
    try:
        with torch.no_grad():
            ids = lm.hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=lm.tokenizer.pad_token_id)
    finally:
        hd.remove()
    n = enc["input_ids"].shape[1]
    return [lm.tokenizer.decode(r[n:], skip_special_tokens=True) for r in ids]


def hook_generate(lm, sae, prompts, item, max_new_tokens):
    """Reference: HF generate (KV cache) with a forward hook on block 1 doing the edit by hand."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    state = {"step": 0}
    w = sae.W_dec[item.feature].detach()

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        prefill = state["step"] == 0
        state["step"] += 1
        if (item.positions == "prompt" and not prefill) or (item.positions == "generated" and prefill):
            return None
        mask = enc["attention_mask"].bool() if prefill else torch.ones(h.shape[:2], dtype=torch.bool)
        if prefill and not item.include_bos:   # the BOS token, found here by its position in each row
            first = (enc["attention_mask"] == 0).sum(1)
            mask = mask.clone()
            mask[torch.arange(len(first)), first] = False
        if item.positions == "last":
            mask = mask.clone()
            mask[:, :-1] = False
        f = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)[..., item.feature]
        amount = {"add": torch.full_like(f, item.coeff), "remove": -f, "clamp": item.coeff - f,
                  "scale": (item.coeff - 1) * f}[item.mode]
        new = h + (amount * mask)[..., None] * w
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    return generate_with(lm, enc, lambda: lm.hf.model.layers[1].register_forward_hook(hook), max_new_tokens)


@pytest.mark.parametrize("mode, coeff, positions, bos", [
    ("add", 0.5, "all", False), ("add", 0.5, "generated", False), ("add", 0.5, "prompt", False),
    ("add", 0.5, "last", False), ("remove", 0.0, "all", False), ("clamp", 0.3, "all", False),
    ("clamp", 0.3, "last", False), ("scale", 4.0, "generated", False), ("scale", 0.0, "all", False),
    ("add", 6.0, "all", True), ("clamp", 3.0, "prompt", True),
])
def test_greedy_steering_equals_forward_hooks_token_for_token(steer_setup, mode, coeff, positions, bos):
    lm, saes = steer_setup
    feature = busiest_feature(lm, saes)
    item = Intervention("resid_post.1", feature, mode, coeff, positions, include_bos=bos)
    ours = generate(lm, PROMPTS, Recipe([item]), saes, max_new_tokens=12)
    ref = hook_generate(lm, saes["resid_post.1"], PROMPTS, item, 12)
    assert ours == ref


@pytest.mark.parametrize("site, width", [("mlp_act.1", 64), ("attn_out.1", 32)])
def test_steering_inside_the_block_edits_where_the_sae_reads(steer_setup, site, width):
    """An mlp_act SAE reads the down projection's input (the neurons) and an attn_out SAE the attention's
    output: a clamp there must equal a hand-made hook at that very place, step after step."""
    lm, _ = steer_setup
    sae = firing_sae(d_in=width, d_sae=48, gain=4.0)
    block = lm.hf.model.layers[1]
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    first = (enc["attention_mask"] == 0).sum(1)

    def edited(h, prefill):
        mask = enc["attention_mask"].bool().clone() if prefill else torch.ones(h.shape[:2], dtype=torch.bool)
        if prefill:
            mask[torch.arange(len(first)), first] = False          # BOS left alone
        f = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)
        feature = int(f.flatten(0, 1).gt(0).sum(0).argmax()) if "feature" not in calls else calls["feature"]
        calls.setdefault("feature", feature)
        return h + ((2.0 - f[..., feature]) * mask)[..., None] * sae.W_dec[feature]

    calls: dict = {"n": 0}
    if site.startswith("mlp_act"):
        def pre(_m, args):
            calls["n"] += 1
            return (edited(args[0], calls["n"] == 1),)
        ref = generate_with(lm, enc, lambda: block.mlp.down_proj.register_forward_pre_hook(pre), 10)
    else:
        def post(_m, _a, out):
            calls["n"] += 1
            return (edited(out[0], calls["n"] == 1),) + tuple(out[1:])
        ref = generate_with(lm, enc, lambda: block.self_attn.register_forward_hook(post), 10)
    unsteered = generate(lm, PROMPTS, None, {}, max_new_tokens=10)
    ours = generate(lm, PROMPTS, Recipe([Intervention(site, calls["feature"], "clamp", 2.0)]), {site: sae},
                    max_new_tokens=10)
    assert calls["n"] == 10 and ours == ref and ours != unsteered


@pytest.mark.parametrize("mode, coeff", [("add", 0.5), ("clamp", 0.3)])
def test_the_position_sets_steer_differently(steer_setup, mode, coeff):
    """The token-for-token comparison can only catch a wrong position mask if the masks matter at its
    coefficients (stronger ones saturate: every position set then gives the same repeated token)."""
    lm, saes = steer_setup
    feature = busiest_feature(lm, saes)
    out = {p: generate(lm, PROMPTS, Recipe([Intervention("resid_post.1", feature, mode, coeff, p)]), saes,
                       max_new_tokens=12) for p in ("all", "last", "prompt", "generated")}
    assert len({tuple(v) for v in out.values()}) == 4, out


def test_bos_is_left_alone_unless_asked(steer_setup):
    """Editing BOS changes what every later position attends to: the default must not do it."""
    lm, saes = steer_setup
    feature = busiest_feature(lm, saes)
    texts = {}
    for bos in (False, True):
        item = Intervention("resid_post.1", feature, "add", 6.0, "prompt", include_bos=bos)
        texts[bos] = generate(lm, PROMPTS, Recipe([item]), saes, max_new_tokens=12)
    assert texts[False] != texts[True]
    assert lm.tokenizer(PROMPTS[0])["input_ids"][0] == lm.tokenizer.bos_token_id   # the prompts do start with BOS


def test_steering_reaches_generated_tokens(steer_setup):
    lm, saes = steer_setup
    base = generate(lm, PROMPTS, None, saes, max_new_tokens=12)
    gen_only = generate(lm, PROMPTS, Recipe([Intervention("resid_post.1", 0, "add", 20.0, "generated")]), saes,
                        max_new_tokens=12)
    assert gen_only != base
    # the first generated token comes from the prompt step, which "generated" leaves alone
    first = lambda texts: [lm.tokenizer(t, add_special_tokens=False)["input_ids"][:1] for t in texts]  # noqa: E731
    assert first(gen_only) == first(base)


def test_sampling_is_reproducible_with_a_seed(steer_setup):
    lm, saes = steer_setup
    r = Recipe([Intervention("resid_post.1", 3, "add", 4.0)])
    a = generate(lm, PROMPTS, r, saes, max_new_tokens=10, do_sample=True, temperature=1.0, seed=7)
    b = generate(lm, PROMPTS, r, saes, max_new_tokens=10, do_sample=True, temperature=1.0, seed=7)
    assert a == b


def test_recipes_round_trip_and_bad_input(steer_setup, tmp_path):
    lm, saes = steer_setup
    r = Recipe([Intervention("resid_post.1", 3, "add", 4.0, "prompt"),
                Intervention("resid_post.0", None, "add", 1.0, "all", vector=[0.1] * 32)], name="x")
    path = r.save(tmp_path / "r.json")
    assert Recipe.load(path) == r and json.loads(path.read_text())["name"] == "x"
    bad = [(Intervention("resid_post.1", 99), "out of range"), (Intervention("resid_post.1", 1, "boost"), "mode"),
           (Intervention("resid_post.1", 1, positions="middle"), "positions"),
           (Intervention("resid_post.2", 1), "no SAE for resid_post.2"),
           (Intervention("resid_post.1", None, vector=[1.0] * 5), "expected shape"),
           (Intervention("resid_post.9", 1), "layers 0-2")]
    for item, msg in bad:
        with pytest.raises(ScSteerError, match=msg):
            generate(lm, PROMPTS, Recipe([item]), saes, max_new_tokens=2)
    (tmp_path / "bad.json").write_text('{"interventions": [{"site": "resid_post.1", "colour": 1}]}')
    with pytest.raises(ScSteerError, match="unknown intervention key"):
        Recipe.load(tmp_path / "bad.json")


def test_steering_refuses_a_model_whose_weights_are_not_here(steer_setup):
    """Steering hooks the model's own modules; a model run on NDIF has none here to hook."""
    from sc_steer.models import LM

    lm, saes = steer_setup
    away = LM(lm.hf, lm.tokenizer, "away", remote=True, nn_model=lm.nn)
    with pytest.raises(ScSteerError, match="--remote ndif"):
        generate(away, PROMPTS, Recipe([Intervention("resid_post.1", 3, "add", 4.0)]), saes, max_new_tokens=2)


def test_actadd_and_decomposition(steer_setup):
    lm, saes = steer_setup
    v = actadd_vector(lm, "resid_post.1", "Love", "Hate")
    assert v.shape[1] == 32 and torch.allclose(v[0], torch.zeros(32), atol=1e-6)  # BOS rows cancel
    out = generate(lm, PROMPTS, Recipe([Intervention("resid_post.1", None, "add", 5.0, "prompt", v.tolist())]),
                   saes, max_new_tokens=6)
    assert len(out) == 2
    sae = saes["resid_post.1"]
    parts = decompose(3 * sae.W_dec[17].detach() + 0.1 * sae.W_dec[4].detach(), sae, k=3)
    assert parts["by_cosine"][0][0] == 17
    # a difference vector also suppresses: the negatively aligned side is reported, not hidden
    parts = decompose(3 * sae.W_dec[17].detach() - 2.5 * sae.W_dec[4].detach(), sae, k=3)
    assert parts["by_cosine"][0][0] == 17 and parts["against_by_cosine"][0][0] == 4
    assert parts["against_by_cosine"][0][1] < 0 < parts["by_cosine"][0][1]


def test_an_actadd_sequence_starts_at_each_rows_first_prompt_token(steer_setup):
    """Left padding puts each prompt at another offset: row b gets v[j] at its own position pad_b + j (BOS
    left alone), at the prefill step only. A hand-made hook does the same and must give the same tokens."""
    lm, saes = steer_setup
    torch.manual_seed(3)
    v = torch.randn(4, 32)
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    pads = (enc["attention_mask"] == 0).sum(1)
    assert len(set(pads.tolist())) == 2          # the rows really are at different offsets
    calls = {"n": 0}

    def hook(_m, _a, out):
        calls["n"] += 1
        if calls["n"] > 1:
            return None
        h = (out[0] if isinstance(out, tuple) else out).clone()
        for b, p in enumerate(pads.tolist()):
            h[b, p + 1:p + 4] += 3.0 * v[1:]         # position p is the row's BOS
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    ref = generate_with(lm, enc, lambda: lm.hf.model.layers[1].register_forward_hook(hook), 10)
    ours = generate(lm, PROMPTS, Recipe([Intervention("resid_post.1", None, "add", 3.0, "prompt", v.tolist())]),
                    saes, max_new_tokens=10)
    assert ours == ref and ours != generate(lm, PROMPTS, None, saes, max_new_tokens=10)


def _hooked_feature_mean(lm, sae, ids, n, feature):
    """The unsteered model's feature activation at block 1, averaged over positions n.. (plain hooks)."""
    got = {}
    h = lm.hf.model.layers[1].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            lm.hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        h.remove()
    return float(sae.encode(got["h"])[0, n:, feature].mean())


def test_effects_are_measured_on_the_generated_ids_and_the_watch_baseline_on_its_own_text(steer_setup):
    """A recipe that makes the model emit EOS at once: the decoded text is empty, but there was one step
    (re-tokenising the text lost it); the watched feature's baseline is the unsteered model on the
    unsteered continuation (it was read on the steered one)."""
    from sc_steer.steer import generate_ids, measure_effects

    lm, saes = steer_setup
    eos = lm.tokenizer.eos_token_id
    direction = lm.hf.lm_head.weight[eos].detach()
    direction = (direction / direction.norm() * 40 * lm.hf.model.norm.weight.detach().reciprocal()).tolist()
    recipe = Recipe([Intervention("resid_post.2", None, "add", 1.0, "all", vector=direction)])
    s_ids, n = generate_ids(lm, PROMPTS[:1], recipe, saes, max_new_tokens=8)
    b_ids, _ = generate_ids(lm, PROMPTS[:1], None, saes, max_new_tokens=8)
    assert s_ids[0, n:].tolist() == [eos] and b_ids.shape[1] > n + 1
    rep = measure_effects(lm, PROMPTS[:1], recipe, saes, max_new_tokens=8, watch=[("resid_post.1", 3)])["prompts"][0]
    assert rep["steered"] == "" and len(rep["kl_per_step"]) == 1 and rep["kl_per_step"][0] > 0
    sae = saes["resid_post.1"]
    assert rep["watch"]["resid_post.1:3"]["baseline"] == pytest.approx(_hooked_feature_mean(lm, sae, b_ids, n, 3),
                                                                      rel=1e-4, abs=1e-6)
    on_steered = _hooked_feature_mean(lm, sae, s_ids, n, 3)
    assert abs(on_steered - rep["watch"]["resid_post.1:3"]["baseline"]) > 1e-6   # the old reading differs


def test_effect_measurement(steer_setup):
    from sc_steer.steer import measure_effects

    lm, saes = steer_setup
    t = lm.tokenizer.convert_ids_to_tokens(500)
    t = lm.tokenizer.decode([500])
    direction = lm.hf.lm_head.weight[500].detach()
    direction = (direction / direction.norm() * 3 * lm.hf.model.norm.weight.detach().reciprocal()).tolist()
    recipe = Recipe([Intervention("resid_post.2", None, "add", 1.0, "all", vector=direction)])
    rep = measure_effects(lm, PROMPTS[:1], recipe, saes, max_new_tokens=8, target_tokens=[t],
                          watch=[("resid_post.1", 3)])["prompts"][0]
    assert 0 < len(rep["kl_per_step"]) <= 8
    assert min(rep["kl_per_step"]) > 0 and rep["target_logprob_change"][t] > 0
    assert rep["perplexity_steered"] > 0 and "resid_post.1:3" in rep["watch"]
    empty = measure_effects(lm, PROMPTS[:1], Recipe([]), saes, max_new_tokens=5)["prompts"][0]
    assert max(empty["kl_per_step"]) < 1e-6 and empty["steered"] == empty["baseline"]
