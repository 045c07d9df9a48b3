"""The reference method the batched measurement is checked and benchmarked against: one full model
forward per ablated feature, with plain transformers forward hooks (an edit at block n, a read at
block n+1). Slow by design; used by the tests and ``bench/graph.py``."""
from __future__ import annotations

import torch

from ..devices import follow_model
from ..models import LM, rewrap, unwrap
from ..sae import SAE
from ..sites import Site


def _forward(lm: LM, layer: int, batch, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``layer``'s output (before ``edit``) and block ``layer + 1``'s output (after it)."""
    got = {}

    def edit_hook(_m, _i, out):
        got["n"] = unwrap(out)
        if edit is None:
            return None
        return rewrap(out, edit(got["n"]))

    def read_hook(_m, _i, out):
        got["h"] = unwrap(out)

    hooks = [lm.module(Site("resid_post", layer)).register_forward_hook(edit_hook),
             lm.module(Site("resid_post", layer + 1)).register_forward_hook(read_hook)]
    try:
        with torch.no_grad():
            lm.hf(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device))
    finally:
        for h in hooks:
            h.remove()
    return got["n"], got["h"]


@torch.no_grad()
def naive_effects(lm: LM, layer: int, sae_n: SAE, sae_next: SAE, batches: list, sources: list[int],
                  value: float | None = None, *, means: dict[int, float] | None = None,
                  where: str = "all") -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]]:
    """{source: (mean effect [J], std [J], mean pre-activation delta [J], positions, skip [J])}.

    Zero ablation, or clamp to ``value``, or mean ablation to ``means[source]``; ``where="active"`` edits
    only positions where the source fires. ``skip``: the effect if block n+1's output were moved by the
    same edit with block n+1's own computation left as it was."""
    follow_model((sae_n, sae_next), lm)
    clean = [_forward(lm, layer, b) for b in batches]
    out = {}
    for i in sources:
        diffs, pres, skips = [], [], []
        for b, (hn, hc) in zip(batches, clean):
            keep = b.keep.to(hc.device)

            def amount(h, i=i, keep=keep):
                f = sae_n.encode(h.float())[..., i]
                if means is not None:
                    v = torch.full_like(f, float(means[i]))
                else:
                    v = torch.zeros_like(f) if value is None else torch.full_like(f, value)
                a = (v - f) * keep
                return a * (f > 0) if where == "active" else a

            def edit(h, i=i):
                return (h.float() + amount(h)[..., None] * sae_n.W_dec[i]).to(h.dtype)

            _, ha = _forward(lm, layer, b, edit)
            diffs.append((sae_next.encode(ha.float()) - sae_next.encode(hc.float()))[keep])
            pres.append((sae_next.pre_acts(ha.float()) - sae_next.pre_acts(hc.float()))[keep])
            moved = hc.float() + amount(hn)[..., None] * sae_n.W_dec[i]
            skips.append((sae_next.encode(moved) - sae_next.encode(hc.float()))[keep])
        d, p, k = torch.cat(diffs), torch.cat(pres), torch.cat(skips)
        out[i] = (d.mean(0), d.std(0, unbiased=False), p.mean(0), len(d), k.mean(0))
    return out

