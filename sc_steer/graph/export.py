"""Write a feature graph in every format people load: GraphML, GEXF, node-link JSON, DOT, a rendered
SVG/PNG (matplotlib, layers left to right), and a self-contained interactive HTML view."""
from __future__ import annotations

import html
import json
from pathlib import Path

import networkx as nx

from ..files import atomic_write, make_dir, to_json

FORMATS = ("graphml", "gexf", "json", "dot", "svg", "png", "html", "frontend")


def layered_positions(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """x = layer; within a layer, nodes ordered by total |weight| (strongest at the top)."""
    by_layer: dict[int, list[str]] = {}
    for n, d in g.nodes(data=True):
        by_layer.setdefault(int(d["layer"]), []).append(n)
    pos = {}
    for layer, ns in by_layer.items():
        strength = {n: sum(abs(d["weight"]) for *_, d in g.edges(n, data=True)) +
                    sum(abs(d["weight"]) for *_, d in g.in_edges(n, data=True)) for n in ns}
        ns.sort(key=lambda n: -strength[n])
        for r, n in enumerate(ns):
            pos[n] = (float(layer), -r + (len(ns) - 1) / 2)
    return pos


def _short(label: str, n: int = 18) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def draw(g: nx.DiGraph, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = layered_positions(g)
    layers = sorted({d["layer"] for _, d in g.nodes(data=True)})
    height = max([sum(1 for _, d in g.nodes(data=True) if d["layer"] == layer) for layer in layers] or [1])
    fig, ax = plt.subplots(figsize=(3.2 * max(2, len(layers)), max(4, 0.42 * height)))
    wmax = max([abs(d["weight"]) for *_, d in g.edges(data=True)] or [1.0])
    for u, v, d in g.edges(data=True):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate("", (x1 - 0.06, y1), (x0 + 0.06, y0),
                    arrowprops={"arrowstyle": "-|>", "lw": 0.4 + 3 * abs(d["weight"]) / wmax,
                                "color": "#c0392b" if d["weight"] > 0 else "#2e6fd0", "alpha": 0.75})
    for n, d in g.nodes(data=True):
        x, y = pos[n]
        ax.text(x, y, f"F{d['feature']}: {_short(str(d['label']))}", ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.25", "fc": "#fff8e6", "ec": "#999", "lw": 0.5})
    ax.set_xticks(layers, [f"layer {layer}" for layer in layers])
    ax.set_yticks([])
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    ys = [y for _, y in pos.values()] or [0]
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    ax.set_title(title or "feature graph (red: source supports target, blue: suppresses)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix[1:], dpi=130))
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
  const links = G.links.filter(e => e.source === id || e.target === id);
  const near = new Set([id, ...links.map(e => e.source), ...links.map(e => e.target)]);
  document.querySelectorAll('.node').forEach(x => { x.classList.toggle('dim', !near.has(x.dataset.id)); x.classList.toggle('hl', x.dataset.id === id); });
  document.querySelectorAll('.edge').forEach(x => x.classList.toggle('dim', !(x.dataset.s === id || x.dataset.t === id)));
  const r = (v, d) => v == null ? '–' : Number(v).toPrecision(d);
  info.innerHTML = `<h3>${esc(id)}</h3><p>${esc(n.label)}<br>density ${(100 * n.density).toFixed(3)}%, max activation ${r(n.max_act, 3)}</p>` +
    '<table><tr><th>edge</th><th>weight</th><th>through the next block</th></tr>' +
    links.map(e => `<tr><td>${esc(e.source)} → ${esc(e.target)}</td><td>${r(e.weight, 3)}</td><td>${r(e.through, 3)}</td></tr>`).join('') + '</table>';
}));
</script></body></html>"""


BOX = 150   # a node's box width in the HTML view: room for "F1234: " and 22 characters of label


def html_view(g: nx.DiGraph, title: str) -> str:
    pos = layered_positions(g)
    xs = {n: 40 + 260 * (x - min(p[0] for p in pos.values())) for n, (x, _) in pos.items()}
    ymax = max([y for _, y in pos.values()] or [0])
    ys = {n: 44 + 34 * (ymax - y) for n, (_, y) in pos.items()}
    wmax = max([abs(d["weight"]) for *_, d in g.edges(data=True)] or [1.0])
    parts = []
    for u, v, d in g.edges(data=True):
        color = "#c0392b" if d["weight"] > 0 else "#2e6fd0"
        parts.append(f'<path class="edge" data-s="{html.escape(u)}" data-t="{html.escape(v)}" '
                     f'd="M{xs[u] + BOX},{ys[u]} C{xs[u] + BOX + 70},{ys[u]} {xs[v] - 70},{ys[v]} {xs[v]},{ys[v]}" '
                     f'stroke="{color}" stroke-width="{0.5 + 3.5 * abs(d["weight"]) / wmax:.2f}">'
                     f'<title>{html.escape(u)} → {html.escape(v)}: weight {d["weight"]:.3g}</title></path>')
    layers = {}
    for n, d in g.nodes(data=True):
        layers.setdefault(d.get("layer"), xs[n])
        label = html.escape(f"F{d['feature']}: {_short(str(d['label']), 22)}")
        parts.append(f'<g class="node" data-id="{html.escape(n)}" transform="translate({xs[n]},{ys[n] - 11})">'
                     f'<rect width="{BOX}" height="22" rx="4"/><text x="5" y="15">{label}</text>'
                     f'<title>{html.escape(n)}: {html.escape(str(d["label"]))}</title></g>')
    parts += [f'<text class="layer" x="{x}" y="16">layer {layer}</text>' for layer, x in layers.items()]
    width = max(xs.values() or [0]) + BOX + 50
    height = max(ys.values() or [0]) + 40
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
