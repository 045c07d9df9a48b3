"""One prompt's feature graph, end to end: measure every (feature, position) removal, prune by influence
on the logits, score it as a circuit, export (``pipeline.graph_run`` with ``prompt=`` runs it on a run
folder)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ScSteerError
from ..files import atomic_write
from ..models import LM
from ..sae import SAE
from .export import FORMATS, export_graph
from .faithfulness import attach_scores
from .prompt_build import PROMPT_PRUNE, prompt_graph_from
from .prompt_measure import PromptEffects, measure_prompt, prompt_batch
from .run import check_model


def save_effects(pe: PromptEffects, path: Path) -> None:
    """The unpruned measurement: nodes, activations and every edge matrix (safetensors)."""
    t = {"token_ids": torch.tensor(pe.token_ids), "logit_ids": pe.logit_ids, "logit_probs": pe.logit_probs,
         "logit_edges": pe.logit_edges.contiguous()}
    for n in pe.layers:
        t[f"nodes_L{n}"] = pe.nodes[n].contiguous()
        t[f"acts_L{n}"] = pe.acts[n].contiguous()
        if n in pe.edges:
            t[f"edges_L{n}"] = pe.edges[n].contiguous()
    if pe.embed_edges is not None:
        t["embed_positions"], t["embed_edges"] = pe.embed_pos.contiguous(), pe.embed_edges.contiguous()
    atomic_write(path, lambda p: save_file(t, str(p)))


def prompt_feature_graph(lm: LM, saes: dict[str, SAE], prompt: str, out: str | Path, *, layers: list[int] | None = None,
                         prune: str = "influence", amount: float = 0.8, edge_amount: float = 0.98, n_logits: int = 10,
                         ctx: int = 64, metric="next_token", formats: tuple[str, ...] = FORMATS, name: str = "graph",
                         labels: dict[int, list[dict] | None] | None = None, provenance: dict | None = None,
                         progress: bool = True, curve: tuple[float, ...] = ()):
    """Measure, prune, score and export ``prompt``'s graph over the resid_post SAEs of ``layers``
    (consecutive; default all in ``saes``) into ``out``: the exports and ``effects.safetensors``.
    Faithfulness and completeness are read at the prompt's last position. Returns the graph and the
    export paths."""
    if prune not in PROMPT_PRUNE:
        raise ScSteerError(f"--prune {prune!r}: a per-prompt graph prunes by {', '.join(PROMPT_PRUNE)}")
    check_model(lm, saes, ctx)
    out = Path(out)
    t0 = time.time()
    pe = measure_prompt(lm, saes, prompt, layers=layers, ctx=ctx, n_logits=n_logits, progress=progress)
    seconds = round(time.time() - t0, 2)
    save_effects(pe, out / "effects.safetensors")
    provenance = {"model": lm.name, "prompt": prompt, **(provenance or {}),
                  "config": {"layers": pe.layers, "prune": prune, "amount": amount, "edge_amount": edge_amount,
                             "n_logits": n_logits, "ctx": ctx},
                  "seconds_measured": seconds}
    build = lambda a: prompt_graph_from(pe, prune=prune, amount=a, edge_amount=edge_amount, labels=labels,
                                        n_layers=lm.n_layers, provenance=provenance)
    g = build(amount)
    if progress:
        n_feat = sum(1 for _, d in g.nodes(data=True) if d["kind"] == "feature")
        print(f"{len(pe.token_ids)} tokens, {sum(len(v) for v in pe.nodes.values())} active (feature, position) "
              f"nodes measured in {seconds:.1f} s; kept {n_feat} features and {g.number_of_edges()} edges")
    batches = [prompt_batch(lm, prompt, ctx)]
    attach_scores(lm, saes, batches, g, metric=metric, at="last", curve={float(a): build(float(a)) for a in curve},
                  out=out, prune=prune, progress=progress)
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    paths = export_graph(g, out, name, formats, title=f"{lm.name}: {shown!r}")
    return g, paths
