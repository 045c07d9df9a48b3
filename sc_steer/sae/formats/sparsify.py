"""EleutherAI sparsify's ``SparseCoder.save_to_disk``: ``cfg.json`` (its ``SparseCoderConfig`` plus
``d_in``) and ``sae.safetensors`` (``encoder.weight [n, d_in]``, ``encoder.bias``, ``W_dec [n, d_in]``,
``b_dec``, and ``W_skip [d_in, d_in]`` with a skip connection), one folder per hookpoint named after
it (``layers.12``, ``layers.12.mlp``).

    f     = the top-k of relu((x - b_dec) W_e^T + b_e)                          -> topk
    x_hat = f W_dec + b_dec (+ x W_skip^T)                                      -> reconstruct()

GroupMax activations and transcoders (which predict a module's output from its input) are refused.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import ScSteerError
from ...files import read_json
from ..base import CFG_FILE, SAE, SAEConfig
from .common import build, need, read_safetensors, source

WEIGHTS = "sae.safetensors"


def load(path: Path) -> SAE:
    raw = read_json(path / CFG_FILE, "sparsify's SparseCoderConfig (a JSON object)")
    where = path / WEIGHTS
    if raw.get("transcode"):
        raise ScSteerError(f"{str(path)!r}: a sparsify transcoder (transcode=true) maps a module's input to its "
                           "output; sc-steer reads SAEs, which reconstruct their input")
    if raw.get("activation", "topk") != "topk":
        raise ScSteerError(f"{str(path)!r}: sparsify activation {raw.get('activation')!r} is not supported "
                           "(supported: topk)")
    s = read_safetensors(where)
    need(s, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    k, d_in = raw.get("k"), raw.get("d_in")
    if not isinstance(k, int) or not isinstance(d_in, int):
        raise ScSteerError(f"{str(path / CFG_FILE)!r}: expected integer 'k' and 'd_in'")
    t = {"W_enc": s["encoder.weight"].float().T, "b_enc": s["encoder.bias"], "W_dec": s["W_dec"], "b_dec": s["b_dec"]}
    if s.get("W_skip") is not None:
        t["W_skip"] = s["W_skip"]
    elif raw.get("skip_connection"):
        raise ScSteerError(f"{str(where)!r}: cfg.json says skip_connection but there is no W_skip tensor")
    hook = path.name       # save_to_disk's folder per hookpoint
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=int(t["W_enc"].shape[1]), k=k, hook_module=hook,
                    extra=source("sparsify", "SparseCoder", hook, skip_connection=bool(raw.get("skip_connection"))))
    return build(cfg, t, where)
