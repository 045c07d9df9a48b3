"""Exact effects inside one prompt, position by position, down to the logits.

Nodes are the SAE features active at each text position of each layer (``(position, feature)``), the
token embeddings (when the graph starts at layer 0) and the model's most likely next tokens at the
last position. Every edge is one exact intervention:

* feature ``(n, t, i)`` -> feature ``(n + 1, u, j)``: feature i is removed at position t only
  (error-preserving, ``h_n[t] -= f_i W_dec[i]``), block n+1 is rerun, and ``weight = g_j(clean) -
  g_j(ablated)`` at position u (zero for u < t: attention is causal). Positive: i supports j.
* embedding ``t`` -> feature ``(first, u, j)``: the input of block 0 at position t (the token's
  embedding, with the position embedding where the model adds one) is zeroed and block 0 rerun.
* feature ``(top, t, i)`` -> logit ``k``: the same removal at the graph's top layer, the rest of the
  model run, ``weight = logit_k(clean) - logit_k(ablated)`` at the last position.

Targets are the features active in the clean run; a feature an ablation switches on is no node. Every
removal of one layer is rerun as one batch row (``max_rows`` rows at a time), so a layer pair costs
``active sources / max_rows`` block passes, not one model forward per source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import TokenBatch, collate, iter_rows, pad_token_id
from ..devices import follow_model, to_device
from ..errors import ScSteerError
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .measure import capture_block_inputs, run_block


@dataclass
class PromptEffects:
    """Everything a per-prompt graph is pruned from (dense, unpruned, on the CPU)."""

    token_ids: list[int]
    tokens: list[str]
    keep: torch.Tensor                          # [T] bool: text positions
    layers: list[int]
    nodes: dict[int, torch.Tensor]              # layer -> [N, 2] (position, feature) of active features
    acts: dict[int, torch.Tensor]               # layer -> [N] clean activations
    edges: dict[int, torch.Tensor]              # n -> [N_n, N_{n+1}] weights from layer n to layer n+1
    logit_ids: torch.Tensor                     # [K] the most likely next tokens at the last position
    logit_probs: torch.Tensor                   # [K]
    logit_tokens: list[str]
    logit_edges: torch.Tensor                   # [N_top, K] logit change when a top-layer node is removed
    embed_pos: torch.Tensor | None = None       # [E] positions of embedding nodes (graph starts at layer 0)
    embed_edges: torch.Tensor | None = None     # [E, N_first]
    config: dict = field(default_factory=dict)

    @property
    def last(self) -> int:
        return len(self.token_ids) - 1


def prompt_batch(lm: LM, prompt: str, ctx: int) -> TokenBatch:
    """The prompt as a one-row batch (BOS first), refused if empty or longer than ``ctx`` tokens."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ScSteerError("--prompt: expected a non-empty text")
    rows = list(iter_rows([prompt], lm.tokenizer, ctx))
    if len(rows) != 1:
        n = len(lm.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])
        raise ScSteerError(f"--prompt has {n} tokens; a per-prompt graph reads at most {ctx - 1} after BOS "
                           "(raise --ctx or shorten the prompt)")
    return collate(rows, 0, ctx, pad_token_id(lm.tokenizer))


def top_logits(probs: torch.Tensor, n_logits: int, min_prob: float) -> torch.Tensor:
    """The fewest most likely tokens whose probabilities reach ``min_prob`` in total, at most ``n_logits``."""
    p, ids = probs.sort(descending=True)
    n = int((p.cumsum(0) < min_prob).sum()) + 1
    return ids[:max(1, min(n, n_logits))]


def _removal_rows(h: torch.Tensor, pos: torch.Tensor, amount: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``[m, T, d]`` copies of ``h [1, T, d]``, row r with ``amount[r] * direction[r]`` subtracted at ``pos[r]``."""
    rows = h.float().expand(len(pos), -1, -1).clone()
    rows[torch.arange(len(pos), device=h.device), pos] -= amount[:, None] * direction
    return rows.to(h.dtype)


def _read_targets(sae: SAE, out: torch.Tensor, clean: torch.Tensor, tgt: torch.Tensor, src_pos: torch.Tensor) -> torch.Tensor:
    """``clean - ablated`` activations of the target nodes ``tgt [N, 2]`` in each rerun row of ``out``;
    targets before a row's source position are exactly zero (causal attention)."""
    g = sae.encode(out.float())[:, tgt[:, 0], tgt[:, 1]]                    # [m, N]
    w = clean[None] - g
    return w * (tgt[None, :, 0] >= src_pos[:, None])


def _block_edges(lm: LM, block: int, captured: tuple, sae: SAE, pos: torch.Tensor, amount: torch.Tensor,
                 direction: torch.Tensor, tgt: torch.Tensor, clean: torch.Tensor, max_rows: int) -> torch.Tensor:
    """``[R, N]`` edges of R removals (``amount[r] * direction[r]`` subtracted from block ``block``'s
    ``captured`` input at ``pos[r]``) onto the target nodes ``tgt`` of the block's output SAE,
    ``max_rows`` reruns at a time."""
    args, kwargs, _ = captured
    w = torch.zeros(len(pos), len(tgt), device=lm.device)
    for lo in range(0, len(pos), max_rows):
        sl = slice(lo, lo + max_rows)
        hin = _removal_rows(args[0], pos[sl], amount[sl], direction[sl])
        out = run_block(lm, block, args, kwargs, hin, torch.zeros(len(hin), dtype=torch.long))
        w[sl] = _read_targets(sae, out, clean, tgt, pos[sl])
    return w.cpu()


@torch.no_grad()
def measure_prompt(lm: LM, saes: dict[str, SAE], prompt: str, *, layers: list[int] | None = None, ctx: int = 64,
                   n_logits: int = 10, logit_prob: float = 0.95, embeddings: bool = True,
                   max_rows: int = 128, progress: bool = False) -> PromptEffects:
    """Measure every edge of ``prompt``'s graph over the ``resid_post`` SAEs of ``layers`` (consecutive;
    default: every layer with an SAE in ``saes``)."""
    if layers is None:
        layers = sorted(int(s.split(".")[1]) for s in saes if s.startswith("resid_post."))
    layers = list(layers)
    if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
        raise ScSteerError(f"a per-prompt graph needs SAEs at consecutive resid_post layers; got {layers}")
    for n in layers:
        if not 0 <= n < lm.n_layers:
            raise ScSteerError(f"layer {n}: the model has layers 0-{lm.n_layers - 1}")
        if f"resid_post.{n}" not in saes:
            raise ScSteerError(f"no SAE for resid_post.{n}")
        lm.check_sae(Site("resid_post", n), saes[f"resid_post.{n}"])
    follow_model(saes, lm)
    b = prompt_batch(lm, prompt, ctx)
    keep = to_device(b.keep[0], lm.device)
    ids = b.input_ids[0].tolist()
    tokens = [lm.tokenizer.decode([t]) for t in ids]
    dev = lm.device

    # clean pass: every layer's stream and the last position's next-token distribution
    streams = {}

    def grab(site, h, _call):
        streams[site.layer] = h.detach()

    with lm.edited(grab, [Site("resid_post", n) for n in layers]):
        logits = lm.hf(input_ids=to_device(b.input_ids, dev), attention_mask=to_device(b.attention_mask, dev)).logits
    probs = torch.softmax(logits[0, -1].float(), -1)
    logit_ids = top_logits(probs, n_logits, logit_prob)
    clean_logits = logits[0, -1, logit_ids].float()

    nodes, acts = {}, {}
    for n in layers:
        f = saes[f"resid_post.{n}"].encode(streams[n].float())[0] * keep[:, None]       # [T, S]
        nodes[n] = (f > 0).nonzero()                                                     # (position, feature)
        acts[n] = f[nodes[n][:, 0], nodes[n][:, 1]]

    edges = {}
    for n in layers[:-1]:
        src = nodes[n]
        edges[n] = _block_edges(lm, n + 1, capture_block_inputs(lm, n + 1, b), saes[f"resid_post.{n + 1}"],
                                src[:, 0], acts[n], saes[f"resid_post.{n}"].W_dec[src[:, 1]], nodes[n + 1],
                                acts[n + 1], max_rows)
        if progress:
            print(f"layer {n} -> {n + 1}: {len(src)} x {len(nodes[n + 1])} (position, feature) nodes")

    embed_pos = embed_edges = None
    if embeddings and layers[0] == 0:    # an embedding's removal zeroes the block-0 input at its position
        embed_pos = keep.nonzero()[:, 0]
        captured = capture_block_inputs(lm, 0, b)
        h = captured[0][0]
        embed_edges = _block_edges(lm, 0, captured, saes["resid_post.0"], embed_pos,
                                   torch.ones(len(embed_pos), device=dev), h[0, embed_pos].float(), nodes[0], acts[0],
                                   max_rows)
        embed_pos = embed_pos.cpu()

    logit_edges = _logit_edges(lm, saes[f"resid_post.{layers[-1]}"], b, layers[-1], nodes[layers[-1]],
                               acts[layers[-1]], logit_ids, clean_logits, max_rows)
    return PromptEffects(token_ids=ids, tokens=tokens, keep=b.keep[0], layers=layers,
                         nodes={n: v.cpu() for n, v in nodes.items()}, acts={n: v.cpu() for n, v in acts.items()},
                         edges=edges, logit_ids=logit_ids.cpu(), logit_probs=probs[logit_ids].cpu(),
                         logit_tokens=[lm.tokenizer.decode([int(t)]) for t in logit_ids],
                         logit_edges=logit_edges, embed_pos=embed_pos, embed_edges=embed_edges,
                         config={"ctx": ctx, "n_logits": n_logits, "logit_prob": logit_prob, "max_rows": max_rows})


def _logit_edges(lm: LM, sae: SAE, b: TokenBatch, top: int, src: torch.Tensor, act: torch.Tensor,
                 logit_ids: torch.Tensor, clean: torch.Tensor, max_rows: int) -> torch.Tensor:
    """``[N_top, K]`` logit changes at the last position when each top-layer node is removed; the rest
    of the model runs on the edited stream (after the model's last layer only the last position's own
    nodes can move its logits, so only those are rerun). ``sae`` is already on the model's device."""
    last = b.input_ids.shape[1] - 1
    out = torch.zeros(len(src), len(logit_ids))
    todo = (src[:, 0] == last).nonzero()[:, 0] if top == lm.n_layers - 1 else torch.arange(len(src), device=src.device)
    site = Site("resid_post", top)
    dev = lm.device
    for lo in range(0, len(todo), max_rows):
        rows = todo[lo:lo + max_rows]
        s = src[rows]

        def remove(_site, h, _call, s=s, a=act[rows]):
            return _removal_rows(h[:1], s[:, 0], a, sae.W_dec[s[:, 1]])

        m = len(rows)
        with lm.edited(remove, [site]):
            logits = lm.hf(input_ids=to_device(b.input_ids, dev).expand(m, -1),
                           attention_mask=to_device(b.attention_mask, dev).expand(m, -1)).logits
        out[rows.cpu()] = (clean[None] - logits[:, last, logit_ids].float()).cpu()
    return out
