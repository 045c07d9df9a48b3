"""dictionary_learning folders as its trainer writes them: ``ae.pt`` (the state dict) and ``config.json``
(``{"trainer": {"dict_class": ..., "layer": ..., "submodule_name": ..., "lm_name": ...}}``).

    AutoEncoder          relu((x - bias) W_e^T + b_e)                               -> relu
    AutoEncoderTopK      top-k of relu((x - b_dec) W_e^T + b_e)                     -> topk
    BatchTopKSAE         relu(pre) * (relu(pre) > threshold), a scalar threshold     -> batchtopk
    JumpReluAutoEncoder  relu(pre * (pre > threshold)), pre = x W_enc + b_enc: its
                         encoder does NOT subtract b_dec (apply_b_dec_to_input is
                         False, an attribute the state dict does not carry)          -> jumprelu
    GatedAutoEncoder     pi = (x - decoder_bias) W_e^T; 1[pi + gate_bias > 0] *
                         relu(exp(r_mag) pi + mag_bias)                             -> gated
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ScSteerError
from ...files import read_json
from ..base import SAE, SAEConfig
from .common import build, fold_input_bias, need, source

ARCHS = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
         "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}


def load(path: Path) -> SAE:
    conf = read_json(path / "config.json", "dictionary_learning's config (a JSON object)") \
        if (path / "config.json").exists() else {}
    trainer = conf.get("trainer", conf)
    if not isinstance(trainer, dict):
        raise ScSteerError(f"{str(path / 'config.json')!r}: its \"trainer\" entry should be a JSON object")
    state = _state(path / "ae.pt")
    dict_class = trainer.get("dict_class") or _guess(state)
    if dict_class not in ARCHS:
        raise ScSteerError(f"{str(path)!r}: dictionary_learning class {dict_class!r} is not supported "
                           f"(supported: {', '.join(ARCHS)})")
    where = path / "ae.pt"
    try:
        t = _tensors(dict_class, state, where)
    except KeyError as e:
        raise ScSteerError(f"{str(where)!r} has no tensor {e} (dictionary_learning {dict_class})") from None
    if t["W_enc"].dim() != 2:
        raise ScSteerError(f"{str(where)!r}: the encoder weight has shape {tuple(t['W_enc'].shape)}, expected a matrix")
    arch = ARCHS[dict_class]
    k = state.get("k", trainer.get("k"))
    k = int(k) if k is not None else None
    if arch in ("topk", "batchtopk") and k is None:
        raise ScSteerError(f"{str(where)!r}: a {dict_class} needs k (in ae.pt or config.json)")
    d_in, d_sae = (int(n) for n in t["W_enc"].shape)
    if "threshold" in t:
        t["threshold"] = t["threshold"].float().reshape(-1).expand(d_sae) if t["threshold"].numel() == 1 \
            else t["threshold"].float().reshape(-1)
    layer, sub = trainer.get("layer"), trainer.get("submodule_name")
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k if arch in ("topk", "batchtopk") else None,
                    model_name=trainer.get("lm_name"), hook_module=sub,
                    extra=source("dictionary_learning", dict_class, sub, layer=layer))
    return build(cfg, t, where)


def _state(where: Path) -> dict:
    try:
        state = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses pickled code; truncated zips fail too
        raise ScSteerError(f"{str(where)!r} could not be read as a weights-only state dict "
                           f"({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ScSteerError(f"{str(where)!r} is not a state dict of tensors")
    return state


def _guess(state: dict) -> str:
    """The class of an ``ae.pt`` without a config, from its tensor names."""
    if "r_mag" in state:
        return "GatedAutoEncoder"
    if "W_enc" in state and "threshold" in state:
        return "JumpReluAutoEncoder"
    if "k" in state:
        return "AutoEncoderTopK"
    return "AutoEncoder"


def _tensors(dict_class: str, s: dict, where: Path) -> dict[str, torch.Tensor]:
    if dict_class == "JumpReluAutoEncoder":
        need(s, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), where)
        t = {k: s[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        fold_input_bias(t)
        return t
    if dict_class == "GatedAutoEncoder":
        return {"W_enc": _t(s["encoder.weight"]), "b_enc": s["gate_bias"], "W_dec": _t(s["decoder.weight"]),
                "b_dec": s["decoder_bias"], "r_mag": s["r_mag"], "b_mag": s["mag_bias"]}
    t = {"W_enc": _t(s["encoder.weight"]), "b_enc": s["encoder.bias"], "W_dec": _t(s["decoder.weight"]),
         "b_dec": s["bias"] if dict_class == "AutoEncoder" else s["b_dec"]}
    if dict_class == "BatchTopKSAE":
        t["threshold"] = s["threshold"]
    return t


def _t(w: torch.Tensor) -> torch.Tensor:
    """An ``nn.Linear`` weight as ``[in, out]`` (a tensor that is not a matrix is left for the shape check)."""
    return w.float().T if w.dim() == 2 else w.float()
