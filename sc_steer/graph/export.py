"""Write a feature graph in every format people load: GraphML, GEXF, node-link JSON, DOT, a rendered
SVG/PNG (matplotlib, layers left to right), and a self-contained interactive HTML view."""
from __future__ import annotations

import html
import json
from pathlib import Path

import networkx as nx

from ..files import atomic_write, make_dir, to_json
from .build import is_prompt_graph, node_strength

FORMATS = ("graphml", "gexf", "json", "dot", "svg", "png", "html", "frontend")


def layered_positions(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """x = layer; within a layer, nodes ordered by total |weight| (strongest at the top)."""
    by_layer: dict[int, list[str]] = {}
    for n, d in g.nodes(data=True):
        by_layer.setdefault(int(d["layer"]), []).append(n)
    pos = {}
    for layer, ns in by_layer.items():
        ns.sort(key=lambda n: -node_strength(g, n))
        for r, n in enumerate(ns):
            pos[n] = (float(layer), -r + (len(ns) - 1) / 2)
    return pos


def grid_positions(g: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], list[tuple[float, str]], list[tuple[float, str]]]:
    """A per-prompt graph on a grid: x = token position (only positions with nodes get a column), y =
    layer (embeddings at the bottom, logits at the top), a cell's nodes stacked by influence. Returns the
    positions and the column and row headers as (coordinate, text)."""
    tokens = json.loads(g.graph.get("prompt_tokens", "[]"))
    cols = sorted({int(d["position"]) for _, d in g.nodes(data=True)})
    col_of = {t: i for i, t in enumerate(cols)}
    cells: dict[tuple[int, int], list[str]] = {}
    for n, d in g.nodes(data=True):
        cells.setdefault((int(d["layer"]), int(d["position"])), []).append(n)
    layers = sorted({layer for layer, _ in cells})
    pos, rows, y = {}, [], 0.0
    for layer in layers:
        height = max(len(v) for (lay, _), v in cells.items() if lay == layer)
        for (lay, t), ns in cells.items():
            if lay != layer:
                continue
            ns.sort(key=lambda n: -float(g.nodes[n].get("influence") or 0.0))
            for r, n in enumerate(ns):
                pos[n] = (float(col_of[t]), y + height - 1 - r)
        kind = next(g.nodes[n]["kind"] for (lay, _), v in cells.items() if lay == layer for n in v)
        rows.append((y + (height - 1) / 2, {"embedding": "embeddings", "logit": "logits"}.get(kind, f"layer {layer}")))
        y += height + 0.6
    heads = [(float(i), f"{t}: {tokens[t]!r}" if t < len(tokens) else str(t)) for t, i in col_of.items()]
    return pos, heads, rows


def _box_text(d: dict, n: int) -> str:
    """A node's short text: feature id and label, or the token of an embedding or logit node."""
    if d.get("kind") == "embedding":
        return _short(f"emb {d['token']!r}", n + 6)
    if d.get("kind") == "logit":
        return _short(f"→ {d['token']!r} {100 * float(d['activation']):.0f}%", n + 6)
    return f"F{d['feature']}: {_short(str(d['label']), n)}"


def _short(label: str, n: int = 18) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


MAX_FIG = (40.0, 30.0)   # inches: the largest picture drawn (bigger graphs get smaller boxes, not bigger files)
ARROWS = 300             # above this many edges they are drawn as plain lines


def draw(g: nx.DiGraph, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if is_prompt_graph(g):
        pos, cols, rows = grid_positions(g)
        xs = [x for x, _ in cols] or [0.0]
        height = max([y for _, y in pos.values()] or [0]) + 1
        fig, ax = plt.subplots(figsize=(min(MAX_FIG[0], max(6, 1.9 * len(cols))), min(MAX_FIG[1], max(4, 0.42 * height))))
    else:
        pos = layered_positions(g)
        layers = sorted({d["layer"] for _, d in g.nodes(data=True)})
        cols, rows, xs = [(float(x), f"layer {x}") for x in layers], [], [float(x) for x in layers] or [0.0]
        height = max([sum(1 for _, d in g.nodes(data=True) if d["layer"] == layer) for layer in layers] or [1])
        fig, ax = plt.subplots(figsize=(min(MAX_FIG[0], 3.2 * max(2, len(layers))), min(MAX_FIG[1], max(4, 0.42 * height))))
    wmax = max([abs(d["weight"]) for *_, d in g.edges(data=True)] or [1.0]) or 1.0
    if g.number_of_edges() <= ARROWS:
        for u, v, d in g.edges(data=True):
            (x0, y0), (x1, y1) = pos[u], pos[v]
            ax.annotate("", (x1 - 0.06, y1), (x0 + 0.06, y0),
                        arrowprops={"arrowstyle": "-|>", "lw": 0.4 + 3 * abs(d["weight"]) / wmax,
                                    "color": "#c0392b" if d["weight"] > 0 else "#2e6fd0", "alpha": 0.75})
    else:   # many edges: plain lines in one collection (annotate costs ~3 ms an arrow)
        from matplotlib.collections import LineCollection

        es = sorted(g.edges(data=True), key=lambda e: abs(e[2]["weight"]))     # strongest drawn last
        ax.add_collection(LineCollection([(pos[u], pos[v]) for u, v, _ in es],
                                         linewidths=[0.2 + 3 * abs(d["weight"]) / wmax for *_, d in es],
                                         colors=["#c0392b" if d["weight"] > 0 else "#2e6fd0" for *_, d in es], alpha=0.5))
    for n, d in g.nodes(data=True):
        x, y = pos[n]
        ax.text(x, y, _box_text(d, 18), ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.25", "fc": "#fff8e6", "ec": "#999", "lw": 0.5})
    ax.set_xticks([x for x, _ in cols], [t for _, t in cols], fontsize=8, rotation=30 if rows else 0)
    ax.set_yticks([y for y, _ in rows], [t for _, t in rows])
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ys = [y for _, y in pos.values()] or [0]
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    ax.set_title(title or "feature graph (red: source supports target, blue: suppresses)", fontsize=10)
    fig.tight_layout()
    w, h = fig.get_size_inches()
    dpi = min(130.0, (6e6 / (w * h)) ** 0.5)    # at most ~6 megapixels
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix[1:], dpi=dpi))
    plt.close(fig)


_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title><style>
body{font-family:system-ui,sans-serif;margin:0;display:flex}#g{flex:1;overflow:auto}#info{width:320px;padding:10px;
border-left:1px solid #ccc;font-size:13px;height:100vh;overflow:auto;box-sizing:border-box}
.node rect{fill:#fff8e6;stroke:#999}.node text{font-size:10px;pointer-events:none}.node{cursor:pointer}
.layer{font-size:13px;font-weight:bold;fill:#444}td,th{border:1px solid #ddd;padding:2px 5px}table{border-collapse:collapse}
.edge{fill:none;opacity:.7}.dim{opacity:.08}.hl rect{stroke:#000;stroke-width:2}</style></head><body>
<div id="g">__SVG__</div><div id="info"><h3>__TITLE__</h3><p>Click a feature to see its edges.
Red: the source supports the target (ablating it lowers the target); blue: it suppresses it.</p></div>
<script>
const G = __DATA__;
const info = document.getElementById('info');
function esc(t){return String(t).replace(/&/g,'&amp;').replace(/</g,'&lt;')}
document.querySelectorAll('.node').forEach(el => el.addEventListener('click', () => {
  const id = el.dataset.id, n = G.nodes.find(x => x.id === id);
  const links = G.links.filter(e => e.source === id || e.target === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const through = links.some(e => e.through != null);
  const near = new Set([id, ...links.map(e => e.source), ...links.map(e => e.target)]);
  document.querySelectorAll('.node').forEach(x => { x.classList.toggle('dim', !near.has(x.dataset.id)); x.classList.toggle('hl', x.dataset.id === id); });
  document.querySelectorAll('.edge').forEach(x => x.classList.toggle('dim', !(x.dataset.s === id || x.dataset.t === id)));
  const r = (v, d) => v == null ? '–' : Number(v).toPrecision(d);
  const facts = [['position', n.position], ['token', n.token == null ? null : JSON.stringify(n.token)],
    ['activation', r(n.activation, 3)], ['influence', r(n.influence, 3)],
    ['density', n.density == null ? null : (100 * n.density).toFixed(3) + '%'], ['max activation', r(n.max_act, 3)]]
    .filter(([, v]) => v != null && v !== '–').map(([k, v]) => `${k} ${esc(v)}`).join('<br>');
  info.innerHTML = `<h3>${esc(id)}</h3><p>${esc(n.label)}<br>${facts}</p>` +
    '<table><tr><th>edge</th><th>weight</th>' + (through ? '<th>through the next block</th>' : '') + '</tr>' +
    links.map(e => `<tr><td>${esc(e.source)} → ${esc(e.target)}</td><td>${r(e.weight, 3)}</td>` +
      (through ? `<td>${r(e.through, 3)}</td>` : '') + '</tr>').join('') + '</table>';
}));
</script></body></html>"""


BOX = 150   # a node's box width in the HTML view: room for "F1234: " and 22 characters of label


def html_view(g: nx.DiGraph, title: str) -> str:
    """An SVG of the graph (averaged: layer columns; per prompt: token columns and layer rows, each with
    its header) and a panel with the clicked node's data and edge table."""
    prompt = is_prompt_graph(g)
    if prompt:
        pos, cols, rows = grid_positions(g)
        ytop = max([y for _, y in pos.values()] or [0])
        xs = {n: 110 + (BOX + 40) * x for n, (x, _) in pos.items()}
        ys = {n: 50 + 30 * (ytop - y) for n, (_, y) in pos.items()}
        heads = [(110 + (BOX + 40) * x, 18, t) for x, t in cols]
        heads += [(8, 54 + 30 * (ytop - y), t) for y, t in rows]
    else:
        pos = layered_positions(g)
        x0 = min([p[0] for p in pos.values()] or [0])
        xs = {n: 40 + 260 * (x - x0) for n, (x, _) in pos.items()}
        ymax = max([y for _, y in pos.values()] or [0])
        ys = {n: 44 + 34 * (ymax - y) for n, (_, y) in pos.items()}
        heads = sorted({(40 + 260 * (int(d["layer"]) - x0), 16, f"layer {d['layer']}") for _, d in g.nodes(data=True)})
    wmax = max([abs(d["weight"]) for *_, d in g.edges(data=True)] or [1.0]) or 1.0
    parts = []
    for u, v, d in g.edges(data=True):
        color = "#c0392b" if d["weight"] > 0 else "#2e6fd0"
        if prompt:   # from the source's top edge up to the target's bottom edge
            a, b, c, e = xs[u] + BOX / 2, ys[u] - 11, xs[v] + BOX / 2, ys[v] + 11
            path = f"M{a},{b} C{a},{b - 25} {c},{e + 25} {c},{e}"
        else:
            path = (f"M{xs[u] + BOX},{ys[u]} C{xs[u] + BOX + 70},{ys[u]} {xs[v] - 70},{ys[v]} {xs[v]},{ys[v]}")
        parts.append(f'<path class="edge" data-s="{html.escape(u)}" data-t="{html.escape(v)}" d="{path}" '
                     f'stroke="{color}" stroke-width="{0.5 + 3.5 * abs(d["weight"]) / wmax:.2f}">'
                     f'<title>{html.escape(u)} → {html.escape(v)}: weight {d["weight"]:.3g}</title></path>')
    for n, d in g.nodes(data=True):
        parts.append(f'<g class="node" data-id="{html.escape(n)}" transform="translate({xs[n]},{ys[n] - 11})">'
                     f'<rect width="{BOX}" height="22" rx="4"/><text x="5" y="15">{html.escape(_box_text(d, 22))}</text>'
                     f'<title>{html.escape(n)}: {html.escape(str(d["label"]))}</title></g>')
    parts += [f'<text class="layer" x="{x}" y="{y}">{html.escape(t)}</text>' for x, y, t in heads]
    width = max(list(xs.values()) + [0]) + BOX + 50
    height = max(list(ys.values()) + [0]) + 40
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}">{"".join(parts)}</svg>'
    data = to_json(nx.node_link_data(g, edges="links"), default=float).replace("</", "<\\/")
    return _HTML.replace("__SVG__", svg).replace("__DATA__", data).replace("__TITLE__", html.escape(title))


def export_graph(g: nx.DiGraph, out: str | Path, name: str = "graph", formats: tuple[str, ...] = FORMATS,
                 title: str = "") -> dict[str, Path]:
    """Write ``out/name.{graphml,gexf,json,dot,svg,png,html}`` and ``out/name-frontend.json`` (+ its
    ``graph-metadata.json``); returns the paths by format."""
    out = Path(out)
    make_dir(out)
    paths = {}
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        if fmt == "graphml":
            atomic_write(path, lambda p: nx.write_graphml(g, p))
        elif fmt == "gexf":
            atomic_write(path, lambda p: nx.write_gexf(g, p))
        elif fmt == "json":
            atomic_write(path, lambda p: p.write_text(to_json(nx.node_link_data(g, edges="links"), indent=1)))
        elif fmt == "dot":
            atomic_write(path, lambda p: nx.nx_pydot.write_dot(_quoted(g), p))
        elif fmt in ("svg", "png"):
            draw(g, path, title)
        elif fmt == "html":
            atomic_write(path, lambda p: p.write_text(html_view(g, title or name)))
        elif fmt == "frontend":   # the attribution-graph frontend's layout, beside its graph-metadata.json
            from .frontend import write_frontend

            path = write_frontend(g, out, f"{name}-frontend", str(g.graph.get("model", "")), title or name)
        paths[fmt] = path
    return paths


def _quoted(g: nx.DiGraph) -> nx.DiGraph:
    """DOT needs ids and string values quoted (ids contain '/')."""
    h = nx.DiGraph()
    q = lambda s: json.dumps(str(s))
    for k, v in g.graph.items():
        h.graph[k] = q(v)
    for n, d in g.nodes(data=True):
        h.add_node(q(n), **{k: (q(v) if isinstance(v, str) else v) for k, v in d.items()})
    for u, v, d in g.edges(data=True):
        h.add_edge(q(u), q(v), **d)
    return h


def read_dot(path: str | Path) -> nx.DiGraph:
    """Load a DOT export back (ids and string attributes unquoted; numbers parsed)."""
    raw = nx.DiGraph(nx.nx_pydot.read_dot(str(path)))
    un = lambda s: json.loads(s) if isinstance(s, str) and s.startswith('"') else s

    def val(v):
        if isinstance(v, str) and v.startswith('"'):
            return json.loads(v)  # a quoted string stays a string
        try:
            return int(v)
        except (TypeError, ValueError):
            try:
                return float(v)
            except (TypeError, ValueError):
                return v

    g = nx.DiGraph()
    for n, d in raw.nodes(data=True):
        if n in ("node", "edge", "graph", "\\n"):
            continue
        g.add_node(un(n), **{k: val(v) for k, v in d.items()})
    for u, v, d in raw.edges(data=True):
        g.add_edge(un(u), un(v), **{k: val(x) for k, x in d.items()})
    return g
