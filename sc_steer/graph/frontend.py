"""The attribution-graph frontend's JSON layout (the viewer circuit-tracer ships and Neuronpedia hosts),
written and read back.

One file per graph: ``metadata`` (slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold,
schema_version), ``qParams`` (pinnedIds, supernodes, linkType, clickedId, sg_pos), ``nodes`` (node_id
``"{layer}_{feature}_{ctx_idx}"``, feature, layer as a string, ctx_idx, feature_type, token_prob,
is_target_logit, jsNodeId, clerp: our label, influence, activation) and ``links`` (source, target,
weight); ``graph-metadata.json`` beside the files indexes them. A per-prompt graph is written as
circuit-tracer writes one: features at their positions, embedding nodes (``E_{token}_{position}``) and
logit nodes (layer = number of layers + 1) with their probabilities, ``influence`` on the logits.
sc-steer's averaged graphs have no positions: every node is written at ``ctx_idx`` 0 and
``prompt_tokens`` is empty; ``activation`` is the feature's mean activation over the prompts and
``influence`` the sum of its edges' absolute weights. ``feature`` is the SAE feature id (the frontend's
newest models use a pairing of layer and id there; the ``node_id`` carries both either way).
"""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

from ..errors import ScSteerError
from ..files import atomic_write_text, parse_json, read_json, to_json
from .build import node_strength

SCHEMA_VERSION = 1
INDEX = "graph-metadata.json"
FEATURE_TYPE = "cross layer transcoder"   # the frontend's type for a feature node (ours are SAE features)


def _node(g: nx.DiGraph, n: str) -> dict:
    """One node in the frontend's layout. Per-prompt graphs: features at their position, embeddings
    (layer "E", ``feature`` = position), logits (layer = the model's layer count + 1, ``feature`` = token
    id); averaged graphs: every feature at ctx_idx 0."""
    d = g.nodes[n]
    kind, layer, pos = d.get("kind", "feature"), int(d["layer"]), int(d.get("position", 0))
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "influence": _number(d.get("influence"), node_strength(g, n)) if kind == "feature" else None,
            "activation": _number(d.get("activation"), d.get("mean_act"), d.get("max_act")) if kind == "feature" else None}
    if kind == "embedding":
        tok = int(d["feature"])
        return {**base, "node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                "feature_type": "embedding", "jsNodeId": f"E_{tok}-{pos}", "clerp": str(d.get("label", "")),
                "influence": _number(d.get("influence"))}
    if kind == "logit":
        tok, p, lay = int(d["feature"]), float(d["activation"]), str(layer + 1)
        top = max((float(x["activation"]) for _, x in g.nodes(data=True) if x.get("kind") == "logit"), default=p)
        return {**base, "node_id": f"{lay}_{tok}_{pos}", "feature": tok, "layer": lay, "ctx_idx": pos,
                "feature_type": "logit", "token_prob": p, "is_target_logit": p == top,
                "jsNodeId": f"L_{tok}-{pos}", "clerp": f"Output {json.dumps(str(d.get('token', '')))} (p={p:.3f})"}
    return {**base, "node_id": f"{layer}_{d['feature']}_{pos}", "feature": int(d["feature"]), "layer": str(layer),
            "ctx_idx": pos, "feature_type": FEATURE_TYPE, "jsNodeId": f"{layer}_{d['feature']}-0",
            "clerp": str(d.get("label", ""))}


def frontend_json(g: nx.DiGraph, slug: str, scan: str, prompt: str = "") -> dict:
    """The frontend's dict for ``g`` (an averaged or a per-prompt graph)."""
    nodes = {n: _node(g, n) for n in g.nodes}
    links = [{"source": nodes[u]["node_id"], "target": nodes[v]["node_id"], "weight": float(e["weight"])}
             for u, v, e in g.edges(data=True)]
    tokens = json.loads(g.graph.get("prompt_tokens", "[]"))
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": tokens,
                         "prompt": str(g.graph.get("prompt", prompt)) if tokens else prompt,
                         "node_threshold": g.graph.get("node_amount"), "schema_version": SCHEMA_VERSION},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": list(nodes.values()), "links": links}


def _number(*values) -> float:
    """The first finite value (a feature without interpretation records has none: 0.0)."""
    import math

    for v in values:
        if v is not None and math.isfinite(float(v)):
            return float(v)
    return 0.0


def write_frontend(g: nx.DiGraph, out: str | Path, slug: str, scan: str, prompt: str = "") -> Path:
    """``out/{slug}.json`` in the frontend's layout, and the folder's ``graph-metadata.json`` updated."""
    out = Path(out)
    data = frontend_json(g, slug, scan, prompt)
    path = atomic_write_text(out / f"{slug}.json", to_json(data))
    index_path = out / INDEX
    index = read_json(index_path, "the frontend's graph index") if index_path.exists() else {"graphs": []}
    graphs = [x for x in index.get("graphs", []) if x.get("slug") != slug]
    graphs.append({"slug": slug, "scan": scan, "prompt_tokens": data["metadata"]["prompt_tokens"],
                   "prompt": data["metadata"]["prompt"], "title_prefix": "",
                   "node_threshold": data["metadata"]["node_threshold"]})
    atomic_write_text(index_path, to_json({"graphs": graphs}, indent=1))
    return path


def read_frontend(path: str | Path) -> nx.DiGraph:
    """A frontend JSON file back as a networkx graph (node ids as in the file; ``layer``, ``feature``,
    ``ctx_idx``, ``label`` from ``clerp``; edge ``weight``)."""
    data = parse_json(Path(path).read_text(), str(path), dict, "the attribution-graph frontend's JSON")
    if not isinstance(data.get("nodes"), list) or not isinstance(data.get("links"), list):
        raise ScSteerError(f"{str(path)!r}: expected \"nodes\" and \"links\" lists")
    g = nx.DiGraph(**{k: v for k, v in data.get("metadata", {}).items() if isinstance(v, (str, int, float))})
    kinds = {"embedding": "embedding", "logit": "logit"}
    for n in data["nodes"]:
        g.add_node(n["node_id"], layer=n["layer"], feature=n["feature"], ctx_idx=n["ctx_idx"], label=n.get("clerp", ""),
                   kind=kinds.get(n.get("feature_type"), "feature"), feature_type=n.get("feature_type"),
                   activation=n.get("activation"), influence=n.get("influence"), token_prob=n.get("token_prob"))
    for e in data["links"]:
        g.add_edge(e["source"], e["target"], weight=e["weight"])
    return g
