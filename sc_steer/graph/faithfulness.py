"""Does a graph explain the model? Faithfulness and completeness of its features as a circuit
(after Marks et al. 2024), on the prompts it was measured on.

At every layer the graph has nodes in, SAE features are zero-ablated error-preservingly
(``h -= f_i(h) W_dec[i]``, the SAE's reconstruction error kept), at text positions, each layer reading
the stream the earlier edits left. With a metric m (default: the mean log-probability of the clean
model's own next token at every text position; or the mean logit difference of two tokens):

    faithfulness = (m(only the graph's features kept) - m(none kept)) / (m(full model) - m(none kept))
    completeness = (m(full model) - m(only the graph's features ablated)) / (m(full model) - m(none kept))

A per-prompt graph's nodes are (feature, position) pairs: each is kept or ablated at its own position
only, and the metric is read at the last position (the logits the graph explains) unless ``at="all"``.

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
from .build import is_prompt_graph


def circuit_features(g: nx.DiGraph) -> dict[int, list]:
    """The graph's features by layer: feature ids, or ``(position, feature)`` pairs for a per-prompt
    graph (its embedding and logit nodes are no SAE features and are left out)."""
    prompt = is_prompt_graph(g)
    out: dict[int, list] = {}
    for _, d in g.nodes(data=True):
        if d.get("kind", "feature") != "feature":
            continue
        key = (int(d["position"]), int(d["feature"])) if prompt else int(d["feature"])
        out.setdefault(int(d["layer"]), []).append(key)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _metric_values(lm: LM, saes: dict[int, SAE], batches: list[TokenBatch], ablate: dict[int, torch.Tensor],
                   metric, targets: list[torch.Tensor] | None, at: str) -> tuple[float, list[torch.Tensor]]:
    """The metric with ``ablate[layer]`` (a bool mask of features to ablate: ``[d_sae]``, or ``[T, d_sae]``
    per position) applied, and the model's own next tokens (argmax) at every position of each batch."""
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
        where = keep
        if at == "last":   # each row's last text position
            last = (keep.long() * torch.arange(keep.shape[1], device=keep.device)).argmax(1)
            where = torch.zeros_like(keep).scatter_(1, last[:, None], True) & keep
        total += float(vals[where].sum())
        count += int(where.sum())
    return total / max(count, 1), own


def _masks(features: dict[int, list], saes: dict[int, SAE], batches: list[TokenBatch]) -> dict[int, torch.Tensor]:
    """Bool masks of the circuit's features per layer (``[T, d_sae]`` when they come with positions)."""
    masks = {}
    for n, ids in features.items():
        d = saes[n].cfg.d_sae
        positional = bool(ids) and isinstance(ids[0], (tuple, list))
        if positional:
            if len(batches) != 1 or batches[0].input_ids.shape[0] != 1:
                raise ScSteerError("circuit scores: features with positions need the one prompt they were found on")
            m = torch.zeros(batches[0].input_ids.shape[1], d, dtype=torch.bool)
            for t, i in ids:
                m[t, i] = True
        else:
            m = torch.zeros(d, dtype=torch.bool)
            m[torch.tensor(ids, dtype=torch.long)] = True
        masks[n] = m
    return masks


def circuit_scores(lm: LM, saes: dict[str, SAE], batches: list[TokenBatch], features: dict[int, list],
                   metric="next_token", at: str = "all") -> dict:
    """Faithfulness and completeness of ``features`` (layer -> feature ids, or (position, feature) pairs
    on a one-prompt batch: ``circuit_features(g)``) over ``batches``; ``metric`` is "next_token" or
    ("logit_diff", token_a, token_b) with token ids, read at every text position (``at="all"``) or at
    each prompt's last one (``"last"``)."""
    follow_model(saes, lm)
    if not features:
        raise ScSteerError("circuit scores: the graph has no nodes")
    if metric != "next_token" and not (isinstance(metric, tuple) and len(metric) == 3 and metric[0] == "logit_diff"):
        raise ScSteerError(f"metric {metric!r}: expected 'next_token' or ('logit_diff', token_a, token_b)")
    if at not in ("all", "last"):
        raise ScSteerError(f"metric positions {at!r}: expected all or last")
    by_layer = {}
    for n in features:
        if f"resid_post.{n}" not in saes:
            raise ScSteerError(f"circuit scores: no SAE for resid_post.{n}")
        by_layer[n] = saes[f"resid_post.{n}"]
    masks = _masks(features, by_layer, batches)
    none = {n: torch.zeros_like(m) for n, m in masks.items()}
    full, own = _metric_values(lm, by_layer, batches, none, metric, None, at)
    everything = {n: torch.ones_like(m) for n, m in masks.items()}
    empty, _ = _metric_values(lm, by_layer, batches, everything, metric, own, at)
    only, _ = _metric_values(lm, by_layer, batches, {n: ~m for n, m in masks.items()}, metric, own, at)
    without, _ = _metric_values(lm, by_layer, batches, masks, metric, own, at)
    span = full - empty
    return {"metric": "next_token" if metric == "next_token" else list(metric), "at": at, "full": full,
            "none": empty, "circuit_only": only, "circuit_ablated": without,
            "faithfulness": (only - empty) / span if span else float("nan"),
            "completeness": (full - without) / span if span else float("nan"),
            "n_features": sum(len(v) for v in features.values())}


def faithfulness_curve(lm: LM, saes: dict[str, SAE], batches: list[TokenBatch], graphs: dict[float, nx.DiGraph],
                       metric="next_token", at: str = "all") -> list[dict]:
    """``circuit_scores`` of the same measurement pruned at several amounts (``graphs``: amount -> graph),
    with each graph's size: how many features and edges it takes to explain how much."""
    out = []
    for amount, g in sorted(graphs.items()):
        if not g.number_of_nodes():
            continue
        sc = circuit_scores(lm, saes, batches, circuit_features(g), metric, at)
        out.append({"amount": amount, "edges": g.number_of_edges(), "features": sc["n_features"],
                    "faithfulness": sc["faithfulness"], "completeness": sc["completeness"]})
    return out


def metric_of(lm: LM, logit_diff: tuple[str, str] | list[str] | None):
    """"next_token", or ("logit_diff", id_a, id_b) from two token strings (each must be one token)."""
    if not logit_diff:
        return "next_token"
    if len(logit_diff) != 2:
        raise ScSteerError(f"--logit-diff {logit_diff!r}: expected two tokens, e.g. ' Paris' ' London'")
    ids = []
    for text in logit_diff:
        got = lm.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(got) != 1:
            raise ScSteerError(f"--logit-diff token {text!r} is {len(got)} tokens; give single tokens "
                               "(mind the leading space)")
        ids.append(got[0])
    return ("logit_diff", ids[0], ids[1])


def attach_scores(lm: LM, saes: dict[str, SAE], batches: list[TokenBatch], g: nx.DiGraph, *, metric="next_token",
                  at: str = "all", curve: dict[float, nx.DiGraph] | None = None, out=None, prune: str = "",
                  progress: bool = False) -> None:
    """Faithfulness and completeness into ``g``'s attributes; with ``curve`` (amount -> the same
    measurement pruned at that amount) also ``faithfulness_curve`` and ``out/faithfulness.png``."""
    from ..files import make_dir, to_json

    features = circuit_features(g)
    if features:
        sc = circuit_scores(lm, saes, batches, features, metric, at)
        g.graph.update(faithfulness=sc["faithfulness"], completeness=sc["completeness"],
                       metric=to_json(sc["metric"]), metric_at=at)
        if progress:
            what = "log-prob of the model's own next token" if metric == "next_token" else "logit difference"
            print(f"faithfulness {sc['faithfulness']:.3f}, completeness {sc['completeness']:.3f} "
                  f"({sc['n_features']} features; metric: {what}, {'last position' if at == 'last' else 'every position'})")
    if curve:
        points = faithfulness_curve(lm, saes, batches, curve, metric, at)
        g.graph["faithfulness_curve"] = to_json(points)
        plot_curve(points, make_dir(out) / "faithfulness.png", prune)


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
    ax.set_ylabel("share of the metric kept / lost")
    ax.set_ylim(min(0.0, *(c[k] for c in curve for k in ("faithfulness", "completeness"))) - 0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
