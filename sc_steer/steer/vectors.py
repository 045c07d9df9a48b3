"""Steering vectors that are not one feature: ActAdd differences of two prompts, and which SAE features
a vector is made of."""
from __future__ import annotations

import torch

from ..models import LM
from ..sae import SAE
from ..sites import Site


def actadd_vector(lm: LM, site: str, positive: str, negative: str) -> torch.Tensor:
    """ActAdd: activations of ``positive`` minus ``negative`` at ``site``, position by position ``[L, d]``
    (the shorter prompt is padded with space tokens, as in the original method)."""
    tok = lm.tokenizer
    return contrast_vector(lm, site, tok(positive)["input_ids"], tok(negative)["input_ids"])


def contrast_vector(lm: LM, site: str, positive: list[int], negative: list[int]) -> torch.Tensor:
    """``actadd_vector`` of two token rows (BOS included where the model wants one)."""
    import nnsight

    tok = lm.tokenizer
    a, b = list(positive), list(negative)
    space = tok(" ", add_special_tokens=False)["input_ids"] or [tok.pad_token_id]
    n = max(len(a), len(b))
    a, b = a + space * (n - len(a)), b + space * (n - len(b))
    ids = torch.tensor([a, b], device=lm.device)
    s = Site.parse(site, lm.n_layers)
    with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}) as tracer:
        h = nnsight.save(lm.site_value(s))
        tracer.stop()
    return (h[0] - h[1]).float().cpu()


def decompose(vector: torch.Tensor, sae: SAE, k: int = 10) -> dict:
    """Which SAE features make up a steering vector: by cosine with decoder rows and by encoder projection,
    the most positively aligned (``by_cosine``, ``by_encoder``: features the vector adds) and the most
    negatively aligned (``against_by_cosine``, ``against_by_encoder``: features it suppresses, e.g. the
    negative prompt's side of an ActAdd difference)."""
    W = sae.W_dec.detach().float()
    v = torch.as_tensor(vector).to(W.device, torch.float32)
    if v.dim() == 2:
        v = v.sum(0)
    cos = (W @ v) / (W.norm(dim=1) * v.norm()).clamp_min(1e-12)
    proj = v @ sae.W_enc.detach().float()

    def ranked(x: torch.Tensor, sign: int) -> list:
        top = (sign * x).topk(min(k, len(x)))
        return [[int(i), float(sign * c)] for c, i in zip(top.values, top.indices)]

    return {"by_cosine": ranked(cos, 1), "by_encoder": ranked(proj, 1),
            "against_by_cosine": ranked(cos, -1), "against_by_encoder": ranked(proj, -1)}
