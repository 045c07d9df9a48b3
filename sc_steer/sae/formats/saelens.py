"""sc-steer's own SAE folders and SAELens's (v6 ``save_model``: ``cfg.json`` + ``sae_weights.safetensors``
+ optional ``sparsity.safetensors``): standard, topk, jumprelu and gated.

SAELens computes ``sae_in = x - b_dec * apply_b_dec_to_input``, then per architecture ``relu``,
``topk`` (optionally ranking by ``pre * |W_dec row|`` and decoding ``f / |W_dec row|``:
``rescale_acts_by_decoder_norm``), ``relu(pre) * (pre > threshold)`` or the gated pair; both flags are
folded into the weights here. Its run-time normalisations (``constant_norm_rescale``, ``layer_norm``)
rescale each token by its own norm, which no fixed weights reproduce, and ``expected_average_only_in``
needs a factor the folder does not hold unless ``norm_scaling_factor`` is in ``cfg.json``: all refused
with the reason rather than loaded wrong.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import ScSteerError
from ...files import read_json
from ..base import CFG_FILE, SAE, SPARSITY_FILE, WEIGHTS_FILE, SAEConfig
from .common import build, fold_decoder_norm, fold_input_bias, read_safetensors, source

ARCHS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


def load(path: Path) -> SAE:
    raw = read_json(path / CFG_FILE, "a JSON object of SAE settings")
    if not (path / WEIGHTS_FILE).exists():
        raise ScSteerError(f"{str(path)!r} has cfg.json but no {WEIGHTS_FILE}")
    t = read_safetensors(path / WEIGHTS_FILE)
    if "sc_steer" in raw:
        try:
            cfg = SAEConfig.from_dict(raw["sc_steer"])
        except (TypeError, AttributeError) as e:
            raise ScSteerError(f"{str(path / CFG_FILE)!r}: its sc_steer block is incomplete ({e})") from None
    else:
        cfg = _config(raw, path)
        t = dict(t)
        if "b_gate" in t:                     # the gate's bias is sc-steer's b_enc
            t["b_enc"] = t.pop("b_gate")
        scale = raw.get("norm_scaling_factor")
        if scale is not None:                 # x * s was what it saw: fold s in (as SAELens does)
            t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * scale, t["W_dec"] / scale, t["b_dec"] / scale
        if not raw.get("apply_b_dec_to_input", True):
            fold_input_bias(t)
        if raw.get("rescale_acts_by_decoder_norm"):
            fold_decoder_norm(t)
    sae = build(cfg, t, path / WEIGHTS_FILE)
    if (path / SPARSITY_FILE).exists():
        sae.log_firing_freq = read_safetensors(path / SPARSITY_FILE).get("sparsity")
    return sae


def _config(raw: dict, path: Path) -> SAEConfig:
    arch = raw.get("architecture", "standard")
    if arch not in ARCHS:
        raise ScSteerError(f"{str(path)!r}: SAELens architecture {arch!r} is not supported "
                           f"(supported: {', '.join(ARCHS)})")
    norm = raw.get("normalize_activations", "none")
    if norm == "expected_average_only_in" and raw.get("norm_scaling_factor") is None:
        raise ScSteerError(f"{str(path)!r}: normalize_activations='expected_average_only_in' scales inputs by a "
                           "factor this folder does not hold; add it to cfg.json as norm_scaling_factor")
    if norm not in ("none", None, False, "expected_average_only_in"):
        raise ScSteerError(f"{str(path)!r}: normalize_activations={norm!r} rescales each token by its own norm, "
                           "which sc-steer's SAEs cannot compute; fold it away or use another SAE")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise ScSteerError(f"{str(path)!r}: reshape_activations={raw['reshape_activations']!r} (attention heads' "
                           "hook_z) has no sc-steer site")
    if arch == "topk" and not isinstance(raw.get("k"), int):
        raise ScSteerError(f"{str(path / CFG_FILE)!r}: a topk SAE needs an integer 'k'")
    meta = raw.get("metadata") or raw.get("meta") or {}
    hook = meta.get("hook_name", raw.get("hook_name"))
    return SAEConfig(architecture=ARCHS[arch], d_in=raw.get("d_in"), d_sae=raw.get("d_sae"),
                     k=raw.get("k") if arch == "topk" else None, hook_module=hook,
                     model_name=meta.get("model_name", raw.get("model_name")), context_size=meta.get("context_size"),
                     prepend_bos=bool(meta.get("prepend_bos", True)), extra=source("saelens", arch, hook))
