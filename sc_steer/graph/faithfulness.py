"""Does a graph explain the model? Faithfulness and completeness of its features as a circuit
(after Marks et al. 2024), on the prompts it was measured on.

At every layer the graph has nodes in, SAE features are zero-ablated error-preservingly
(``h -= f_i(h) W_dec[i]``, the SAE's reconstruction error kept), at text positions, each layer reading
the stream the earlier edits left. With a metric m (default: the mean log-probability of the clean
model's own next token at every text position; or the mean logit difference of two tokens):

    faithfulness = (m(only the graph's features kept) - m(none kept)) / (m(full model) - m(none kept))
    completeness = (m(full model) - m(only the graph's features ablated)) / (m(full model) - m(none kept))

Faithfulness near 1: the graph's features alone carry the behaviour the SAEs' features carry;
completeness near 1: nothing outside the graph carries it too. Both are relative to ablating every
feature at those layers, which keeps the error terms: behaviour the SAEs do not reconstruct is in
neither number.
"""
from __future__ import annotations

import networkx as nx
import torch

from ..data import TokenBatch
from ..devices import follow_model, to_device
from ..errors import ScSteerError
from ..models import LM
from ..sae import SAE
from ..sites import Site


def circuit_features(g: nx.DiGraph) -> dict[int, list[int]]:
    """The graph's features by layer (its nodes' ``layer`` and ``feature``)."""
    out: dict[int, list[int]] = {}
    for _, d in g.nodes(data=True):
        out.setdefault(int(d["layer"]), []).append(int(d["feature"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _metric_values(lm: LM, saes: dict[int, SAE], batches: list[TokenBatch], ablate: dict[int, torch.Tensor],
                   metric, targets: list[torch.Tensor] | None) -> tuple[float, list[torch.Tensor]]:
    """The metric with ``ablate[layer]`` (a ``[d_sae]`` bool mask of features to ablate) applied, and the
    model's own next tokens (argmax) at every position of each batch."""
    sites = {Site("resid_post", n): n for n in ablate}
    total, count, own = 0.0, 0, []
    for bi, b in enumerate(batches):
        keep = to_device(b.keep, lm.device)

        def edit(site: Site, h: torch.Tensor, _call: int, keep=keep) -> torch.Tensor:
            n = sites[site]
            sae = saes[n]
            f = sae.encode(h.float()) * ablate[n].to(h.device)
            return (h.float() - (f @ sae.W_dec) * keep[..., None]).to(h.dtype)

        ids, mask = to_device(b.input_ids, lm.device), to_device(b.attention_mask, lm.device)
        with torch.no_grad(), lm.edited(edit, list(sites)):
            logits = lm.hf(input_ids=ids, attention_mask=mask).logits.float()
        own.append(logits.argmax(-1))
        if metric == "next_token":
            lp = torch.log_softmax(logits, -1)
            t = targets[bi] if targets is not None else own[-1]
            vals = lp.gather(-1, t[..., None])[..., 0]
        else:
            _, a, bb = metric
            vals = logits[..., a] - logits[..., bb]
        total += float(vals[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1), own


def circuit_scores(lm: LM, saes: dict[str, SAE], batches: list[TokenBatch], features: dict[int, list[int]],
                   metric="next_token") -> dict:
    """Faithfulness and completeness of ``features`` (layer -> feature ids, e.g. ``circuit_features(g)``)
    over ``batches``; ``metric`` is "next_token" or ("logit_diff", token_a, token_b) with token ids."""
    follow_model(saes, lm)
    if not features:
        raise ScSteerError("circuit scores: the graph has no nodes")
    if metric != "next_token" and not (isinstance(metric, tuple) and len(metric) == 3 and metric[0] == "logit_diff"):
        raise ScSteerError(f"metric {metric!r}: expected 'next_token' or ('logit_diff', token_a, token_b)")
    by_layer = {}
    for n in features:
        if f"resid_post.{n}" not in saes:
            raise ScSteerError(f"circuit scores: no SAE for resid_post.{n}")
        by_layer[n] = saes[f"resid_post.{n}"]
    masks = {}
    for n, ids in features.items():
        m = torch.zeros(by_layer[n].cfg.d_sae, dtype=torch.bool)
        m[torch.tensor(ids, dtype=torch.long)] = True
        masks[n] = m
    none = {n: torch.zeros_like(m) for n, m in masks.items()}
    full, own = _metric_values(lm, by_layer, batches, none, metric, None)
    everything = {n: torch.ones_like(m) for n, m in masks.items()}
    empty, _ = _metric_values(lm, by_layer, batches, everything, metric, own)
    only, _ = _metric_values(lm, by_layer, batches, {n: ~m for n, m in masks.items()}, metric, own)
    without, _ = _metric_values(lm, by_layer, batches, masks, metric, own)
    span = full - empty
    return {"metric": "next_token" if metric == "next_token" else list(metric), "full": full, "none": empty,
            "circuit_only": only, "circuit_ablated": without,
            "faithfulness": (only - empty) / span if span else float("nan"),
            "completeness": (full - without) / span if span else float("nan"),
            "n_features": sum(len(v) for v in features.values())}


def faithfulness_curve(lm: LM, saes: dict[str, SAE], batches: list[TokenBatch], graphs: dict[float, nx.DiGraph],
                       metric="next_token") -> list[dict]:
    """``circuit_scores`` of the same measurement pruned at several amounts (``graphs``: amount -> graph),
    with each graph's size: how many features and edges it takes to explain how much."""
    out = []
    for amount, g in sorted(graphs.items()):
        if not g.number_of_nodes():
            continue
        sc = circuit_scores(lm, saes, batches, circuit_features(g), metric)
        out.append({"amount": amount, "edges": g.number_of_edges(), "features": sc["n_features"],
                    "faithfulness": sc["faithfulness"], "completeness": sc["completeness"]})
    return out


def plot_curve(curve: list[dict], path, prune: str) -> None:
    """Faithfulness and completeness against the number of edges kept (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_write

    fig, ax = plt.subplots(figsize=(5, 3.4))
    edges = [c["edges"] for c in curve]
    ax.plot(edges, [c["faithfulness"] for c in curve], "-o", label="faithfulness")
    ax.plot(edges, [c["completeness"] for c in curve], "-s", label="completeness")
    for c in curve:
        ax.annotate(f"{prune} {c['amount']:g}", (c["edges"], c["faithfulness"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept")
    ax.set_ylabel("share of next-token log-prob")
    ax.set_ylim(min(0.0, *(c[k] for c in curve for k in ("faithfulness", "completeness"))) - 0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
