"""A static feature browser (no server): ``browser/index.html`` plus one data script per unit set,
and PNG summaries (score distributions, firing densities).

Data travel as ``<script>`` files that register themselves on ``window.SC_DATA``, which works from
``file://`` where ``fetch`` of local JSON is blocked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .. import rundir
from ..files import atomic_write, atomic_write_text, make_dir, to_json
from .explain import HEADLINE_K, K_VALUES
from .report import KIND_TITLES

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sc-steer feature browser</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#side{width:340px;border-right:1px solid #ccc;display:flex;flex-direction:column}
#side header{padding:8px;border-bottom:1px solid #ddd}
#list{overflow-y:auto;flex:1}
.item{padding:4px 8px;cursor:pointer;border-bottom:1px solid #f0f0f0;font-size:13px}
.item:hover,.item.sel{background:#eef4ff}
.dens{color:#888;float:right}
#main{flex:1;overflow-y:auto;padding:12px 20px}
.ctx{font-family:ui-monospace,monospace;font-size:13px;margin:3px 0;white-space:pre-wrap}
.tok{border-radius:2px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 6px}
.bars{display:flex;align-items:flex-end;height:80px;gap:1px}.bars div{background:#4a7bd0;width:9px}
select,input{width:100%;margin:3px 0;box-sizing:border-box}
</style></head><body>
<div id="side"><header>
<select id="set"></select>
<input id="q" placeholder="search: token, label, context text or id">
<div id="count" style="font-size:12px;color:#666"></div>
</header><div id="list"></div></div>
<div id="main"><p>Choose a unit on the left.</p></div>
<script>
window.SC_DATA = window.SC_DATA || {};
const SETS = __SETS__;
const EDGES = __EDGES__;
const sel = document.getElementById('set'), q = document.getElementById('q');
const list = document.getElementById('list'), main = document.getElementById('main');
SETS.forEach(s => { const o = document.createElement('option'); o.value = s.key; o.textContent = s.title; sel.appendChild(o); });
function load(key, then) {
  if (window.SC_DATA[key]) return then(window.SC_DATA[key]);
  const s = SETS.find(x => x.key === key), el = document.createElement('script');
  el.src = s.script; el.onload = () => then(window.SC_DATA[key]); document.head.appendChild(el);
}
function esc(t) { return t.replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/>/g,'&gt;'); }
function show(u) {
  const maxc = Math.max(1e-9, ...u.contexts.map(c => c.max));
  const f = v => v == null ? '–' : v.toFixed(3);
  let h = `<h2>#${u.id}: ${esc(u.label)}</h2><p>density ${(100*u.density).toFixed(3)}% · max ${u.max_act.toFixed(3)} · mean when firing ${u.mean_act.toFixed(3)} · concentration ${f(u.score)} · explanation score (5 tokens) ${f(u.explain_score)} · sensitivity ${f(u.sensitivity)} · specificity ${f(u.specificity)}</p>`;
  if (u.scores) {
    const ks = Object.keys(u.scores.tokens);
    h += '<h3>Explanation score by length</h3><table><tr><th>entries</th>' + ks.map(k => `<th>${k}</th>`).join('') + '</tr>' +
         ['tokens', 'context'].map(n => `<tr><td>${n === 'tokens' ? 'tokens' : 'tokens and pairs'}</td>` + ks.map(k => `<td>${f(u.scores[n][k])}</td>`).join('') + '</tr>').join('') + '</table>';
    const entry = e => esc(JSON.stringify(e.token)) + (e.prev === undefined ? '' : ' after ' + esc(JSON.stringify(e.prev))) + ` (${e.mean})`;
    h += '<p>explanation: ' + u.explanation.tokens.map(entry).join(', ') + '<br>with context: ' + u.explanation.context.map(entry).join(', ') + '</p>';
  }
  h += '<h3>Top input tokens</h3><table><tr><th>token</th><th>mean act.</th><th>count</th></tr>' +
       u.top_tokens.map(t => `<tr><td>${esc(JSON.stringify(t.token))}</td><td>${t.mean.toFixed(3)}</td><td>${t.count}</td></tr>`).join('') + '</table>';
  h += '<h3>Top contexts</h3>' + u.contexts.map(c => '<div class="ctx">' + c.tokens.map((t, i) => {
        const a = Math.max(0, c.acts[i]) / maxc, b = i === c.max_index ? 'outline:1px solid #c00;' : '';
        return `<span class="tok" title="${c.acts[i]}" style="${b}background:rgba(255,120,0,${a.toFixed(3)})">${esc(t).replace(/\n/g, '↵\n')}</span>`;
      }).join('') + `  <small>(${c.max.toFixed(3)})</small></div>`).join('');
  const hm = Math.max(1, ...u.hist);
  h += '<h3>Activation histogram (log10 of positive activations)</h3><div class="bars">' +
       u.hist.map((c, i) => `<div title="10^${EDGES[i].toFixed(2)}..10^${EDGES[i+1].toFixed(2)}: ${c}" style="height:${(80*c/hm).toFixed(1)}px"></div>`).join('') + '</div>';
  h += '<h3>Logit lens</h3><table><tr><th>promoted</th><th>suppressed</th></tr>' +
       u.logit_lens.promoted.map((p, i) => `<tr><td>${esc(JSON.stringify(p[0]))} ${p[1]}</td><td>${esc(JSON.stringify(u.logit_lens.suppressed[i][0]))} ${u.logit_lens.suppressed[i][1]}</td></tr>`).join('') + '</table>';
  main.innerHTML = h;
}
// the playground's search rules: an id or an exact top token first (by its place in the list), then
// the label, then the top contexts' text
function rank(u, term) {
  if (!term) return 3;
  if (String(u.id) === term) return 0;
  const i = u.top_tokens.findIndex(t => t.token.trim().toLowerCase() === term);
  if (i >= 0) return 1 + i / 100;
  if (u.label.toLowerCase().includes(term)) return 2;
  if (u.contexts.some(c => c.tokens.join('').toLowerCase().includes(term))) return 2.5;
  return null;
}
const PAGE = 200;
let hits = [], shown = 0;
function more() {
  hits.slice(shown, shown + PAGE).forEach(u => {
    const d = document.createElement('div'); d.className = 'item'; d.id = 'u' + u.id;
    d.innerHTML = `<span class="dens">${(100*u.density).toFixed(2)}%</span>#${u.id} ${esc(u.label)}`;
    d.onclick = () => pick(u);
    list.insertBefore(d, document.getElementById('more'));
  });
  shown = Math.min(hits.length, shown + PAGE);
  document.getElementById('count').textContent = `showing ${shown} of ${hits.length} matching (${window.SC_DATA[sel.value].length} units)`;
  document.getElementById('more').style.display = shown < hits.length ? '' : 'none';
}
function pick(u) {
  document.querySelectorAll('.item.sel').forEach(x => x.classList.remove('sel'));
  const el = document.getElementById('u' + u.id); if (el) el.classList.add('sel');
  history.replaceState(null, '', '#' + sel.value.replace(/^sae\//, '') + '/' + u.id);   // a link to this unit
  show(u);
}
function render(then) {
  load(sel.value, data => {
    const term = q.value.trim().toLowerCase();
    hits = data.map(u => [rank(u, term), u]).filter(x => x[0] !== null)
               .sort((a, b) => a[0] - b[0] || b[1].density - a[1].density).map(x => x[1]);
    shown = 0;
    list.innerHTML = '<button id="more" style="margin:6px 8px">show more</button>';
    document.getElementById('more').onclick = more;
    more();
    if (then) then(data);
  });
}
function fromHash() {   // #resid_post.1/1781 (SAE features) or #resid/resid_post.1/5 (other unit sets)
  const m = decodeURIComponent(location.hash.slice(1)).match(/^(.*)\/(\d+)$/);
  if (!m) return render();
  const key = SETS.some(s => s.key === m[1]) ? m[1] : 'sae/' + m[1];
  if (!SETS.some(s => s.key === key)) return render();
  sel.value = key;
  render(data => { const u = data.find(x => x.id === Number(m[2])); if (u) pick(u); });
}
sel.onchange = () => render(); q.oninput = () => render(); window.onhashchange = fromHash; fromHash();
</script></body></html>
"""


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(".", "_")


def write_browser(out: str | Path, summary: dict) -> Path:
    """Write ``browser/index.html`` and ``browser/data/*.js`` from the interpretation in ``out``."""
    out = Path(out)
    data_dir = out / rundir.BROWSER / "data"
    make_dir(data_dir)
    sets = []
    for key, info in summary["sets"].items():
        records = rundir.read_records(out, info["site"], info["kind"])
        script = f"data/{_safe(key)}.js"
        payload = to_json(records, separators=(",", ":")).replace("</", "<\\/")
        atomic_write_text(out / rundir.BROWSER / script,
                          f"window.SC_DATA = window.SC_DATA || {{}}; window.SC_DATA[{json.dumps(key)}] = {payload};\n")
        sim = info["explain"]["tokens"][str(HEADLINE_K)]
        sim_text = (f", explanation score (K = {HEADLINE_K}) {sim['mean']:.2f} [{sim['ci95'][0]:.2f}, "
                    f"{sim['ci95'][1]:.2f}]") if sim["n"] else ""
        sets.append({"key": key, "script": script,
                     "title": f"{info['site']} · {KIND_TITLES[info['kind']]} ({info['live']}/{info['n_units']} live"
                              f"{sim_text})"})
    page = _PAGE.replace("__SETS__", json.dumps(sets)).replace("__EDGES__", json.dumps(summary["hist_edges_log10"]))
    return atomic_write_text(out / rundir.BROWSER / "index.html", page)


def write_plots(out: str | Path, summary: dict) -> list[Path]:
    """``interpret_scores.png`` (score distributions per layer and unit kind) and ``density.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    layers = sorted({int(s["site"].split(".")[1]) for s in summary["sets"].values()})
    kinds = [k for k in ("sae", "resid", "mlp") if any(s["kind"] == k for s in summary["sets"].values())]
    scores: dict[tuple[str, int], list[float]] = {}
    densities: dict[str, list[float]] = {k: [] for k in kinds}
    for info in summary["sets"].values():
        recs = rundir.read_records(out, info["site"], info["kind"])
        layer = int(info["site"].split(".")[1])
        scores[(info["kind"], layer)] = [r["score"] for r in recs if r["score"] is not None]
        densities[info["kind"]] += [math.log10(r["density"]) for r in recs if r["density"] > 0]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(layers), 4))
    colors = {"sae": "#d95f02", "resid": "#7570b3", "mlp": "#1b9e77"}
    width = 0.8 / len(kinds)
    for ki, kind in enumerate(kinds):
        data = [scores.get((kind, layer), []) or [float("nan")] for layer in layers]
        pos = [layer + (ki - (len(kinds) - 1) / 2) * width for layer in layers]
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
        for box in bp["boxes"]:
            box.set_facecolor(colors[kind])
        ax.plot([], [], color=colors[kind], lw=6, label=KIND_TITLES[kind])
    ax.set_xticks(layers, [f"layer {layer}" for layer in layers])
    ax.set_ylabel("top-token concentration")
    ax.set_title("Interpretability score: SAE features vs neurons")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = atomic_write(out / rundir.SCORES_PNG, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind in kinds:
        if densities[kind]:
            ax.hist(densities[kind], bins=40, alpha=0.6, color=colors[kind], label=KIND_TITLES[kind], density=True)
    ax.set_xlabel("log10 firing density (fraction of tokens with activation > 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = atomic_write(out / rundir.DENSITY_PNG, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return [p1, p2, _explain_curves(out, summary, layers, kinds, colors)]


def _explain_curves(out: Path, summary: dict, layers: list[int], kinds: list[str], colors: dict) -> Path:
    """``explain_curves.png``: mean explanation score against explanation length, per layer and unit kind
    (solid: tokens, dashed: tokens and pairs), with 95% intervals."""
    import matplotlib.pyplot as plt

    ks = [*map(str, K_VALUES), "all"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.4), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for info in summary["sets"].values():
            if int(info["site"].split(".")[1]) != layer:
                continue
            for name, style in (("tokens", "-"), ("context", "--")):
                pts = [(i, info["explain"][name][k]) for i, k in enumerate(ks) if info["explain"][name][k].get("n")]
                if pts:
                    x = [i for i, _ in pts]
                    y = [p["mean"] for _, p in pts]
                    err = [[p["mean"] - p["ci95"][0] for _, p in pts], [p["ci95"][1] - p["mean"] for _, p in pts]]
                    ax.errorbar(x, y, yerr=err, fmt=style, marker="o", ms=3, capsize=2, color=colors[info["kind"]],
                                label=f"{KIND_TITLES[info['kind']]}" + (", with pairs" if name == "context" else ""))
        ax.set_xticks(range(len(ks)), ks)
        ax.set_xlabel("explanation length K")
        ax.set_title(f"layer {layer}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out Pearson r")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("How well a unit follows from an explanation of K entries", fontsize=10)
    fig.tight_layout()
    path = atomic_write(out / rundir.EXPLAIN_PNG, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path
