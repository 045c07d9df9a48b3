"""The attribution-graph frontend's JSON layout (the viewer circuit-tracer ships and Neuronpedia hosts),
written and read back.

One file per graph: ``metadata`` (slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold,
schema_version), ``qParams`` (pinnedIds, supernodes, linkType, clickedId, sg_pos), ``nodes`` (node_id
``"{layer}_{feature}_{ctx_idx}"``, feature, layer as a string, ctx_idx, feature_type, token_prob,
is_target_logit, jsNodeId, clerp: our label, influence, activation) and ``links`` (source, target,
weight); ``graph-metadata.json`` beside the files indexes them. sc-steer's averaged graphs have no
positions: every node is written at ``ctx_idx`` 0 and ``prompt_tokens`` is empty; ``activation`` is
the feature's mean activation over the prompts and ``influence`` the sum of its edges' absolute
weights.
"""
from __future__ import annotations

from pathlib import Path

import networkx as nx

from ..errors import ScSteerError
from ..files import atomic_write_text, parse_json, read_json, to_json

SCHEMA_VERSION = 1
INDEX = "graph-metadata.json"
FEATURE_TYPE = "cross layer transcoder"   # the frontend's type for a feature node (ours are SAE features)


def frontend_json(g: nx.DiGraph, slug: str, scan: str, prompt: str = "") -> dict:
    """The frontend's dict for ``g`` (nodes with ``layer`` and ``feature``, edges with ``weight``)."""
    def nid(n):
        d = g.nodes[n]
        return f"{d['layer']}_{d['feature']}_0"

    nodes = []
    for n, d in g.nodes(data=True):
        infl = float(sum(abs(float(e.get("weight", 0.0))) for *_, e in g.in_edges(n, data=True)) +
                     sum(abs(float(e.get("weight", 0.0))) for *_, e in g.out_edges(n, data=True)))
        nodes.append({"node_id": nid(n), "feature": int(d["feature"]), "layer": str(d["layer"]), "ctx_idx": 0,
                      "feature_type": FEATURE_TYPE, "token_prob": 0.0, "is_target_logit": False,
                      "jsNodeId": f"{d['layer']}_{d['feature']}-0", "clerp": str(d.get("label", "")),
                      "influence": infl, "activation": _number(d.get("mean_act"), d.get("max_act"))})
    links = [{"source": nid(u), "target": nid(v), "weight": float(e["weight"])} for u, v, e in g.edges(data=True)]
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": [], "prompt": prompt,
                         "node_threshold": None, "schema_version": SCHEMA_VERSION},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


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
    graphs.append({"slug": slug, "scan": scan, "prompt_tokens": [], "prompt": prompt, "title_prefix": "",
                   "node_threshold": None})
    atomic_write_text(index_path, to_json({"graphs": graphs}, indent=1))
    return path


def read_frontend(path: str | Path) -> nx.DiGraph:
    """A frontend JSON file back as a networkx graph (node ids as in the file; ``layer``, ``feature``,
    ``ctx_idx``, ``label`` from ``clerp``; edge ``weight``)."""
    data = parse_json(Path(path).read_text(), str(path), dict, "the attribution-graph frontend's JSON")
    if not isinstance(data.get("nodes"), list) or not isinstance(data.get("links"), list):
        raise ScSteerError(f"{str(path)!r}: expected \"nodes\" and \"links\" lists")
    g = nx.DiGraph(**{k: v for k, v in data.get("metadata", {}).items() if isinstance(v, (str, int, float))})
    for n in data["nodes"]:
        g.add_node(n["node_id"], layer=n["layer"], feature=n["feature"], ctx_idx=n["ctx_idx"], label=n.get("clerp", ""),
                   feature_type=n.get("feature_type"), activation=n.get("activation"), influence=n.get("influence"))
    for e in data["links"]:
        g.add_edge(e["source"], e["target"], weight=e["weight"])
    return g
