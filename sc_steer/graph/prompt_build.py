"""A prompt's measured effects as a pruned networkx graph: influence on the logits, node and edge
pruning, node annotation.

Influence (as circuit-tracer defines it, on our exact edges): every target's incoming |weights| are
normalised to sum to 1, the logit nodes start with their probabilities (normalised to sum to 1), and
a node's influence is the sum over all its paths to the logits of the products of normalised weights.
``influence`` pruning keeps the feature nodes with the most influence until they carry ``amount`` of
the total, then the edges among what is left with the most ``normalised weight x target influence``
until they carry ``edge_amount`` of that. Incoming weights are normalised over the graph's own sources
only: what the SAE error terms, BOS and the features an ablation switches on carry is not in it.
"""
from __future__ import annotations

import json

import networkx as nx
import torch

from ..errors import ScSteerError
from .build import _keep_mask
from .prompt_measure import PromptEffects

PROMPT_PRUNE = ("influence", "top_k", "relative", "cumulative")


def feature_node(layer: int, feature: int, position: int) -> str:
    return f"L{layer}/F{feature}@{position}"


def embed_node(position: int) -> str:
    return f"E@{position}"


def logit_node(token_id: int) -> str:
    return f"logit/{token_id}"


def _share_in(w: torch.Tensor) -> torch.Tensor:
    """|w| with each target's (column's) incoming weights normalised to sum to 1."""
    a = w.abs().double()
    return a / a.sum(0, keepdim=True).clamp_min(1e-30)


def influence(pe: PromptEffects) -> dict:
    """Influence on the logit nodes of every node: ``{layer: [N], "embed": [E], "logit": [K]}``."""
    out = {"logit": pe.logit_probs.double() / pe.logit_probs.double().sum()}
    top = pe.layers[-1]
    out[top] = _share_in(pe.logit_edges) @ out["logit"]
    for n in reversed(pe.layers[:-1]):
        out[n] = _share_in(pe.edges[n]) @ out[n + 1]
    if pe.embed_edges is not None:
        out["embed"] = _share_in(pe.embed_edges) @ out[pe.layers[0]]
    return out


def _cumulative(score: torch.Tensor, amount: float) -> torch.Tensor:
    """The largest entries of ``score`` (flat, non-negative) that together reach ``amount`` of its sum."""
    vals, order = score.flatten().sort(descending=True)
    total = vals.sum().clamp_min(1e-30)
    keep_sorted = ((vals.cumsum(0) - vals) < amount * total) & (vals > 0)
    return torch.zeros_like(keep_sorted).scatter_(0, order, keep_sorted).view_as(score)


def _matrices(pe: PromptEffects) -> list[tuple[object, object, torch.Tensor]]:
    """(source group, target group, weights) for every edge matrix: groups are a layer, "embed" or "logit"."""
    mats = [(n, n + 1, pe.edges[n]) for n in pe.layers[:-1]]
    if pe.embed_edges is not None:
        mats.insert(0, ("embed", pe.layers[0], pe.embed_edges))
    mats.append((pe.layers[-1], "logit", pe.logit_edges))
    return mats


def prune_prompt(pe: PromptEffects, prune: str = "influence", amount: float = 0.8,
                 edge_amount: float = 0.98) -> tuple[dict, list[tuple[object, object, torch.Tensor, torch.Tensor]], dict]:
    """Which edges survive: ``[(source group, target group, weights, bool mask)]``, and the influence of every
    node. ``influence`` keeps nodes by cumulative influence, then edges; the other modes prune each
    source's edges as the averaged graph does (``build._keep_mask``)."""
    if prune not in PROMPT_PRUNE:
        raise ScSteerError(f"prune {prune!r}: expected one of {', '.join(PROMPT_PRUNE)}")
    infl = influence(pe)
    mats = _matrices(pe)
    if prune != "influence":
        return infl, [(s, t, w, _keep_mask(w.abs(), prune, amount)) for s, t, w in mats], {}
    for name, a in (("--amount", amount), ("--edge-amount", edge_amount)):
        if not 0 < a <= 1:
            raise ScSteerError(f"influence pruning {name} {a!r}: expected a fraction in (0, 1]")
    flat = torch.cat([infl[n] for n in pe.layers])
    kept_flat = _cumulative(flat, amount)
    kept, start = {}, 0
    for n in pe.layers:
        kept[n] = kept_flat[start:start + len(infl[n])]
        start += len(infl[n])
    kept["logit"] = torch.ones(len(pe.logit_ids), dtype=torch.bool)
    if pe.embed_edges is not None:
        kept["embed"] = torch.ones(len(pe.embed_pos), dtype=torch.bool)
    scores = []
    for s, t, w in mats:
        sc = _share_in(w) * infl[t][None, :]
        scores.append(sc * kept[s][:, None] * kept[t][None, :])
    flat_scores = torch.cat([x.flatten() for x in scores])
    keep_flat = _cumulative(flat_scores, edge_amount) if len(flat_scores) else flat_scores.bool()
    kept_edges, start = [], 0
    for (s, t, w), sc in zip(mats, scores):
        kept_edges.append((s, t, w, keep_flat[start:start + sc.numel()].view_as(sc)))
        start += sc.numel()
    return infl, kept_edges, {"node_amount": amount, "edge_amount": edge_amount}


def prompt_graph_from(pe: PromptEffects, *, prune: str = "influence", amount: float = 0.8, edge_amount: float = 0.98,
                      labels: dict[int, list[dict] | None] | None = None, n_layers: int | None = None,
                      provenance: dict | None = None) -> nx.DiGraph:
    """The pruned graph: feature nodes ``L{n}/F{i}@{t}``, embeddings ``E@{t}``, logits ``logit/{token id}``.
    Node data: kind, layer (embeddings -1; logits ``n_layers``, one past the model's last layer),
    feature (a logit's token id), position, token, activation (a logit's probability), influence, label."""
    infl, kept_edges, thresholds = prune_prompt(pe, prune, amount, edge_amount)
    g = nx.DiGraph()
    for key, val in (provenance or {}).items():
        g.graph[key] = val if isinstance(val, (int, float, str)) else json.dumps(val, sort_keys=True)
    top_layer = n_layers if n_layers is not None else pe.layers[-1] + 1
    g.graph.update({"kind": "prompt", "prompt_tokens": json.dumps(pe.tokens), "last_position": pe.last,
                    "prune": prune, "prune_amount": float(amount), **thresholds,
                    "sign_convention": "weight = clean - ablated (feature activation, or logit); positive = source supports target"})

    def name(group, idx: int) -> str:
        if group == "embed":
            t = int(pe.embed_pos[idx])
            if embed_node(t) not in g:
                g.add_node(embed_node(t), kind="embedding", layer=-1, feature=int(pe.token_ids[t]), position=t,
                           token=pe.tokens[t], activation=float("nan"), influence=float(infl["embed"][idx]),
                           label=f"token {pe.tokens[t]!r}", density=float("nan"), max_act=float("nan"))
            return embed_node(t)
        if group == "logit":
            tok = int(pe.logit_ids[idx])
            nid = logit_node(tok)
            if nid not in g:
                p = float(pe.logit_probs[idx])
                text = pe.logit_tokens[idx]
                g.add_node(nid, kind="logit", layer=top_layer, feature=tok, position=pe.last, token=text,
                           activation=p, influence=float(infl["logit"][idx]), label=f"output {text!r} (p={p:.3f})",
                           density=float("nan"), max_act=float("nan"))
            return nid
        t, i = (int(x) for x in pe.nodes[group][idx])
        nid = feature_node(group, i, t)
        if nid not in g:
            rec = (labels or {}).get(group)
            info = rec[i] if rec and i < len(rec) else {}
            g.add_node(nid, kind="feature", layer=int(group), feature=i, position=t, token=pe.tokens[t],
                       activation=float(pe.acts[group][idx]), influence=float(infl[group][idx]),
                       label=info.get("label", f"F{i}"), density=float(info.get("density", float("nan"))),
                       max_act=float(info.get("max_act", float("nan"))))
        return nid

    for idx in range(len(pe.logit_ids)):       # the logits are always shown, even when nothing reaches them
        name("logit", idx)
    for s, t, w, mask in kept_edges:
        for a, c in mask.nonzero().tolist():
            g.add_edge(name(s, a), name(t, c), weight=float(w[a, c]))
    return g
