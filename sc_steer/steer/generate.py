"""Generation with a recipe applied at every step (``transformers``' own ``generate`` with forward hooks,
``LM.edited``): which positions an intervention touches at each step, and the edit itself."""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import torch

from .. import validate
from ..data import pad_token_id
from ..devices import follow_model
from ..edits import add_along, edit_amount
from ..errors import ScSteerError
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .recipe import Intervention, Recipe


def bos_positions(lm: LM, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` True where the token is the tokenizer's BOS (none for tokenizers without one)."""
    bos = lm.tokenizer.bos_token_id
    if bos is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return input_ids == bos


def step_mask(it: Intervention, shape: tuple[int, int], prefill: bool, prompt_mask: torch.Tensor | None,
              device, bos: torch.Tensor | None = None) -> torch.Tensor | None:
    """Where ``it`` applies at one generation step (None: not at this step); ``bos`` marks the prompt's
    BOS positions, excluded unless ``it.include_bos``."""
    if it.positions == "prompt" and not prefill or it.positions == "generated" and prefill:
        return None
    where = torch.ones(shape, dtype=torch.bool, device=device)
    if prefill and prompt_mask is not None:
        where &= prompt_mask.to(device).bool()
    if prefill and bos is not None and not it.include_bos:
        where &= ~bos.to(device)
    if it.positions == "last":
        where[:, :-1] = False
    return where


def edit_hidden(h: torch.Tensor, items: list[Intervention], saes: dict[str, SAE],
                masks: list[torch.Tensor | None], align_start: torch.Tensor | None = None) -> torch.Tensor:
    """Apply interventions to ``h [B, T, d]``, each where its mask ``[B, T]`` is True (None: skip it).

    An ActAdd sequence ``[L, d]`` is added at positions ``align_start[b] ...`` (the first real prompt
    token of each row) and only when given ``align_start``.
    """
    out = h.float()
    B, T, _ = h.shape
    for it, where in zip(items, masks):
        if where is None:
            continue
        if it.vector is not None:
            v = torch.as_tensor(it.vector, dtype=torch.float32, device=h.device)
            if v.dim() == 1:
                out = out + it.coeff * where[..., None] * v
            elif align_start is not None:
                for b in range(B):
                    s0 = int(align_start[b])
                    n = min(len(v), T - s0)
                    out[b, s0:s0 + n] += it.coeff * v[:n] * where[b, s0:s0 + n, None]
            continue
        sae = saes[it.site]
        w = sae.W_dec[it.feature].detach().to(h.device)
        f = out.new_zeros(B, T) if it.mode == "add" else sae.encode(out)[..., it.feature]   # add reads no f
        out = add_along(out, edit_amount(f, it.mode, float(it.coeff)) * where, w)
    return out.to(h.dtype)


def tokenize_prompts(lm: LM, prompts: list[str]) -> dict:
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"].to(lm.device), "attention_mask": enc["attention_mask"].to(lm.device)}


def left_pad(lm: LM, rows: list[list[int]]) -> dict:
    """Token rows (BOS included where the model wants one) as a left-padded batch, the layout
    ``generate`` uses: every row ends at the last column."""
    if not rows or any(not r for r in rows):
        raise ScSteerError("give one or more non-empty token rows")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id(lm.tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}


def generate(lm: LM, prompts: list[str], recipe: Recipe | None = None, saes: dict[str, SAE] | None = None, *,
             max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, streamer=None, max_time: float | None = None,
             cancel: threading.Event | None = None) -> list[str]:
    """Continuations of ``prompts`` (text after each prompt), steered by ``recipe`` at every step.

    ``streamer`` is passed to ``transformers`` generate (e.g. a ``TextIteratorStreamer``) to receive
    tokens as they are produced. Generation stops early (returning what it has) after ``max_time``
    seconds or once ``cancel`` is set: how a server bounds a request.
    """
    ids, n = generate_ids(lm, prompts, recipe, saes, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, streamer=streamer,
                          max_time=max_time, cancel=cancel)
    return [lm.tokenizer.decode(row[n:], skip_special_tokens=True) for row in ids]


def generate_ids(lm: LM, prompts: list[str], recipe: Recipe | None = None, saes: dict[str, SAE] | None = None,
                 **settings) -> tuple[torch.Tensor, int]:
    """``generate``'s token ids: ``[B, n + new]`` (left-padded prompts, then the continuation) and ``n``."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ScSteerError("generate: give a list of one or more non-empty prompts")
    for p in prompts:
        validate.text("prompt", p)
    return generate_batch(lm, tokenize_prompts(lm, prompts), recipe, saes, **settings)


def generate_batch(lm: LM, inputs: dict, recipe: Recipe | None = None, saes: dict[str, SAE] | None = None, *,
                   max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int = 0, streamer=None, max_time: float | None = None,
                   cancel: threading.Event | None = None) -> tuple[torch.Tensor, int]:
    """``generate_ids`` on a batch already tokenized and left-padded (``tokenize_prompts``, ``left_pad``)."""
    saes = follow_model(saes or {}, lm)
    items = list(recipe.interventions) if recipe else []
    for it in items:
        it.check(lm, saes)
    validate.integer("max_new_tokens", max_new_tokens, 1)
    validate.seed("seed", seed)
    validate.boolean("do_sample", do_sample)
    if do_sample:
        validate.number("temperature", temperature, 0, 100, lo_open=True)
        validate.integer("top_k", top_k, 0)
        validate.number("top_p", top_p, 0, 1, lo_open=True)
    lm.check_positions(inputs["input_ids"].shape[1] + max_new_tokens, "prompt tokens + max_new_tokens")
    # raw vectors become tensors on the model's device once, not at every generation step
    items = [replace(it, vector=torch.as_tensor(it.vector, dtype=torch.float32).to(lm.device))
             if it.vector is not None else it for it in items]
    by_site: dict[Site, list[Intervention]] = {}
    for it in items:
        by_site.setdefault(Site.parse(it.site, lm.n_layers), []).append(it)
    gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                  "pad_token_id": pad_token_id(lm.tokenizer)}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if streamer is not None:  # e.g. transformers' TextIteratorStreamer, for one prompt
        gen_kwargs["streamer"] = streamer
    if max_time is not None or cancel is not None:
        gen_kwargs["stopping_criteria"] = _stop_after(max_time, cancel)
    torch.manual_seed(seed)
    mask = inputs["attention_mask"]
    bos = bos_positions(lm, inputs["input_ids"])
    start = (1 - mask).sum(1)   # each row's first real prompt token (prompts are left-padded)

    def edit(site: Site, h: torch.Tensor, call: int) -> torch.Tensor | None:
        prefill = call == 0   # the KV cache's first step holds the whole prompt, later ones one token
        masks = [step_mask(it, h.shape[:2], prefill, mask, h.device, bos) for it in by_site[site]]
        if all(m is None for m in masks):
            return None
        return edit_hidden(h, by_site[site], saes, masks, start if prefill else None)

    with torch.no_grad(), lm.edited(edit, list(by_site)):
        ids = lm.hf.generate(**inputs, **gen_kwargs)
    return ids, inputs["input_ids"].shape[1]


def _stop_after(max_time: float | None, cancel: threading.Event | None):
    """A transformers stopping criterion: the time budget is spent, or ``cancel`` was set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    deadline = None if max_time is None else time.monotonic() + validate.number("max_time", max_time, 0, lo_open=True)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = (deadline is not None and time.monotonic() > deadline) or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Stop()])
