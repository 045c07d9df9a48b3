"""The shipped demo model is a real language model with structured activations (`sc-steer demo` itself
runs in tests/test_readme.py, as the README gives it)."""
import math

import pytest
import torch

from sc_steer import open_model
from sc_steer.data import iter_batches, iter_documents, iter_rows, pad_token_id


@pytest.fixture(scope="module")
def demo_lm():
    return open_model("demo")


@pytest.fixture(scope="module")
def heldout_batch(demo_lm):
    rows = iter_rows(iter_documents("demo:heldout"), demo_lm.tokenizer, 256)
    return next(iter_batches(rows, 8, 256, pad_token_id(demo_lm.tokenizer)))


def test_demo_model_is_the_documented_llama(demo_lm):
    assert type(demo_lm.hf).__name__ == "LlamaForCausalLM"
    assert (demo_lm.n_layers, demo_lm.d_model, len(demo_lm.tokenizer)) == (4, 256, 8192)
    assert demo_lm.tokenizer("Ge1:1")["input_ids"][0] == demo_lm.tokenizer.bos_token_id


def test_beats_the_unigram_baseline_on_held_out_text(demo_lm, heldout_batch):
    b = heldout_batch
    with torch.no_grad():
        logits = demo_lm.hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    scored = b.keep[:, 1:]
    targets = b.input_ids[:, 1:][scored]
    ce = -torch.log_softmax(logits[:, :-1], -1)[scored].gather(-1, targets[:, None]).mean().item()
    # unigram fitted on these very targets (in-sample, so an optimistic baseline)
    counts = torch.bincount(targets, minlength=len(demo_lm.tokenizer)).double()
    p = counts[targets] / counts.sum()
    unigram_ce = -p.log().mean().item()
    # measured on the first held-out passages (all three sources): 53 against 210
    assert math.exp(ce) < 0.3 * math.exp(unigram_ce), (math.exp(ce), math.exp(unigram_ce))


def test_activations_carry_token_class_structure(demo_lm, heldout_batch):
    """Digits, archaic pronouns and punctuation each cluster in the residual stream at layer 1."""
    import nnsight

    b = heldout_batch
    with torch.no_grad(), demo_lm.trace({"input_ids": b.input_ids, "attention_mask": b.attention_mask}):
        h = nnsight.save(demo_lm.site_value(demo_lm.sites("resid_post.1")[0]))
    x = h[b.keep]
    x = x - x.mean(0)
    x = x / x.norm(dim=1, keepdim=True)
    strings = [demo_lm.tokenizer.decode([t]).strip() for t in b.input_ids[b.keep].tolist()]
    classes = {"digits": [i for i, s in enumerate(strings) if s.isdigit()],
               "archaic": [i for i, s in enumerate(strings) if s.lower() in {"thee", "thou", "thy", "thine", "ye", "hath"}],
               "punct": [i for i, s in enumerate(strings) if s in {",", ".", ";", ":"}]}
    for name, idx in classes.items():
        assert len(idx) >= 5, name
        inside = (x[idx] @ x[idx].T).mean().item()
        overall = (x[idx] @ x.T).mean().item()
        assert inside - overall > 0.15, (name, inside, overall)
