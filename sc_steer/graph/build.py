"""Turn measured effects into a networkx DiGraph: nodes ``L{layer}/F{feature}``, numeric edge data,
relative pruning (never one absolute threshold for all layers), chains and neighbourhoods."""
from __future__ import annotations

import json

import networkx as nx
import torch

from ..errors import ScSteerError
from .measure import PairEffects

PRUNE = ("top_k", "relative", "cumulative")
RANK_BY = ("weight", "through")


def node_id(layer: int, feature: int) -> str:
    return f"L{layer}/F{feature}"


def is_prompt_graph(g: nx.DiGraph) -> bool:
    """A per-prompt graph (``prompt_build``: nodes with positions, embeddings and logits)."""
    return g.graph.get("kind") == "prompt"


def node_strength(g: nx.DiGraph, n: str) -> float:
    """The sum of the absolute weights of a node's edges, in and out."""
    return float(sum(abs(float(d.get("weight", 0.0))) for *_, d in g.in_edges(n, data=True)) +
                 sum(abs(float(d.get("weight", 0.0))) for *_, d in g.out_edges(n, data=True)))


def _keep_mask(score: torch.Tensor, prune: str, amount: float) -> torch.Tensor:
    """Which (source, target) pairs survive, from ``score [S, J]`` (non-negative strengths)."""
    if prune == "top_k":
        k = int(amount)
        if k < 1:
            raise ScSteerError(f"top_k {amount!r}: expected an integer >= 1")
        idx = score.topk(min(k, score.shape[1]), dim=1).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True) & (score > 0)
    if not 0 < amount <= 1:
        raise ScSteerError(f"{prune} {amount!r}: expected a fraction in (0, 1]")
    if prune == "relative":  # relative to the strongest edge of this layer pair
        return (score >= amount * score.max()) & (score > 0)
    # cumulative influence: per source, the strongest edges that together carry `amount` of its total
    vals, order = score.sort(dim=1, descending=True)
    cum = vals.cumsum(1) / vals.sum(1, keepdim=True).clamp_min(1e-30)
    keep_sorted = (cum - vals / vals.sum(1, keepdim=True).clamp_min(1e-30)) < amount
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, keep_sorted) & (score > 0)


def build_graph(pairs: list[PairEffects], *, prune: str = "top_k", amount: float = 5, rank_by: str = "weight",
                nodes: dict[int, list[dict]] | None = None, provenance: dict | None = None,
                attribution: dict[int, torch.Tensor] | None = None) -> nx.DiGraph:
    """Edges i -> j kept by ``prune`` ("top_k" per source, "relative" to the pair's strongest edge, or
    "cumulative" influence per source) on |weight| or on the |through-block| part (``rank_by``).

    ``nodes[layer]`` are interpretation records (label, density, max_act) to annotate nodes.
    """
    if prune not in PRUNE:
        raise ScSteerError(f"prune {prune!r}: expected one of {', '.join(PRUNE)}")
    if rank_by not in RANK_BY:
        raise ScSteerError(f"rank_by {rank_by!r}: expected {' or '.join(RANK_BY)}")
    g = nx.DiGraph()
    for key, val in (provenance or {}).items():
        g.graph[key] = val if isinstance(val, (int, float, str)) else json.dumps(val, sort_keys=True)
    g.graph.update({"prune": prune, "prune_amount": float(amount), "rank_by": rank_by,
                    "sign_convention": "weight = clean - ablated activation of the target; positive = source supports target"})

    def add_node(layer: int, feature: int) -> str:
        nid = node_id(layer, feature)
        if nid not in g:
            rec = (nodes or {}).get(layer)
            info = rec[feature] if rec and feature < len(rec) else {}
            g.add_node(nid, layer=layer, feature=feature, label=info.get("label", f"F{feature}"),
                       density=float(info.get("density", float("nan"))), max_act=float(info.get("max_act", float("nan"))))
        return nid

    for p in pairs:
        score = (p.weight if rank_by == "weight" else p.through).abs()
        keep = _keep_mask(score, prune, amount)
        attr = (attribution or {}).get(p.layer)
        for s_row, j in keep.nonzero().tolist():
            i = int(p.sources[s_row])
            a, b = add_node(p.layer, i), add_node(p.layer + 1, j)
            eff, skip = float(p.effect[s_row, j]), float(p.skip[s_row, j])
            data = {"weight": -eff, "effect": eff, "abs_weight": abs(eff), "effect_std": float(p.effect_std[s_row, j]),
                    "count": int(p.count), "pre_delta": float(p.pre_delta[s_row, j]), "skip": skip,
                    "through": eff - skip}
            if attr is not None:
                data["attribution"] = float(attr[s_row, j])
            g.add_edge(a, b, **data)
    return g


def neighbourhood(g: nx.DiGraph, node: str, radius: int = 1) -> nx.DiGraph:
    """The subgraph within ``radius`` edges of ``node``, in either direction."""
    if node not in g:
        raise ScSteerError(f"node {node!r} is not in the graph (ids look like L2/F17)")
    return nx.ego_graph(g, node, radius=radius, undirected=True).copy()
