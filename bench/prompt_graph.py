"""Per-prompt graph: its batched block reruns against one full forward per (feature, position) removal,
and beside it the averaged graph's time.

    OMP_NUM_THREADS=1 python bench/prompt_graph.py --run runs/demo

One run measures: the per-prompt measurement of a 32-token held-out prompt over every layer (every
edge: features, embeddings, logits); the naive method (one full model forward per removal, read at
the next layer) on a random sample of the same removals, checked against it within 1e-5 and
extrapolated to all of them; pruning, scoring (faithfulness and completeness) and the exports; and
the averaged graph of the gallery's recipe (32 prompts x 64 tokens, 12 sources a layer).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sc_steer.data import iter_documents
from sc_steer.graph.prompt_measure import measure_prompt, prompt_batch
from sc_steer.graph.prompt_run import prompt_feature_graph
from sc_steer.graph.run import feature_graph
from sc_steer.models import open_model
from sc_steer.rundir import load_run_saes, read_run
from sc_steer.sites import Site


def prompt_of(lm, n_tokens: int) -> str:
    """The first held-out document's first ``n_tokens`` tokens."""
    for doc in iter_documents("demo:heldout", split="line"):
        ids = lm.tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return lm.tokenizer.decode(ids[:n_tokens])
    raise SystemExit("no held-out document is long enough")


def naive_row(lm, saes, batch, n, t, i, a):
    """One full forward with feature i removed at position t of layer n; layer n+1's activations."""
    got = {}

    def edit(site, h, _call):
        if site.layer == n:
            h = h.clone()
            h[0, t] -= a * saes[f"resid_post.{n}"].W_dec[i]
            return h
        got["h"] = h
        return None

    with torch.no_grad(), lm.edited(edit, [Site("resid_post", n), Site("resid_post", n + 1)]):
        lm.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return saes[f"resid_post.{n + 1}"].encode(got["h"].float())[0]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--sample", type=int, default=256, help="removals run the naive way")
    args = ap.parse_args()
    lm = open_model(read_run(args.run)["model"])
    saes = load_run_saes(args.run)
    prompt = prompt_of(lm, args.tokens)
    measure_prompt(lm, saes, "warm up the kernels")

    t = time.perf_counter()
    pe = measure_prompt(lm, saes, prompt)
    t_ours = time.perf_counter() - t
    removals = sum(len(pe.nodes[n]) for n in pe.layers[:-1])
    batch = prompt_batch(lm, prompt, 64)
    g = torch.Generator().manual_seed(0)
    picks = [(n, r) for n in pe.layers[:-1] for r in range(len(pe.nodes[n]))]
    picks = [picks[j] for j in torch.randperm(len(picks), generator=g)[:args.sample].tolist()]
    t = time.perf_counter()
    err = 0.0
    for n, r in picks:
        pos, i = (int(x) for x in pe.nodes[n][r])
        after = naive_row(lm, saes, batch, n, pos, i, float(pe.acts[n][r]))
        tgt = pe.nodes[n + 1]
        want = pe.acts[n + 1] - after[tgt[:, 0], tgt[:, 1]]
        want = want * (tgt[:, 0] >= pos)
        err = max(err, float((pe.edges[n][r] - want).abs().max()))
    t_naive = (time.perf_counter() - t) / len(picks) * removals

    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        graph, _ = prompt_feature_graph(lm, saes, prompt, out, progress=False)
        t_all = time.perf_counter() - t
        t = time.perf_counter()
        feature_graph(lm, saes, "demo:heldout", out + "/avg", sources="top:12", amount=2, max_prompts=32, progress=False)
        t_avg = time.perf_counter() - t

    print(f"model {lm.name}, prompt of {len(pe.token_ids)} tokens (BOS included): {prompt!r}")
    print(f"active (feature, position) nodes per layer: {[len(pe.nodes[n]) for n in pe.layers]}, "
          f"{removals} feature removals + {len(pe.embed_pos)} embedding + {len(pe.logit_ids)} logits")
    print(f"per-prompt measurement (batched block reruns): {t_ours:7.2f} s")
    print(f"naive, one full forward per removal          : {t_naive:7.2f} s (extrapolated from {len(picks)} "
          f"removals; max |difference| {err:.1e}, {'OK' if err <= 1e-5 else 'MISMATCH'} at 1e-5)")
    print(f"speed-up {t_naive / t_ours:.1f}x")
    print(f"per-prompt graph end to end (measure, prune at influence 0.8, score, 8 export formats): {t_all:7.2f} s; "
          f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges, faithfulness "
          f"{graph.graph['faithfulness']:.3f}, completeness {graph.graph['completeness']:.3f}")
    print(f"averaged graph, gallery recipe (32 prompts x 64 tokens, top:12 sources a layer, attribution, "
          f"scores, 8 formats): {t_avg:7.2f} s")


if __name__ == "__main__":
    main()
