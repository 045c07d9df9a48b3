"""Gemma Scope and Llama Scope, the two big JumpReLU releases, read as their documentation describes.

Gemma Scope: ``params.npz`` with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` and
a per-latent ``threshold``; ``pre = x W_enc + b_enc`` (no ``- b_dec``), ``f = relu(pre) * (pre >
threshold)``. The file names no hook point: the release's folder names do (``layer_12``, ``...-res``,
``-mlp``, ``-att``), or ``sc-steer import --site`` says.

Llama Scope: ``hyperparams.json`` (``d_model``, ``d_sae``, ``hook_point_in``/``_out``, a scalar
``jump_relu_threshold``, ``dataset_average_activation_norm``) and ``checkpoints/final.safetensors``
(``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``decoder.weight [d_in, d_sae]``, ``decoder.bias``).
Its inputs were scaled by ``s = sqrt(d_model) / norm_in`` and its encoder does not subtract
``decoder.bias``; folded here as SAELens's Llama Scope loader folds them (``W_enc * s``, ``W_dec / s``,
``b_dec / s``, the threshold ``* s``). A transcoder (``hook_point_in != hook_point_out``) is refused.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from ...errors import ScSteerError
from ...files import read_json
from ..base import SAE, SAEConfig
from .common import build, fold_input_bias, need, read_safetensors, source

GEMMA_FILE = "params.npz"
LLAMA_CFG = "hyperparams.json"
_KINDS = (("res", "hook_resid_post"), ("mlp", "hook_mlp_out"), ("att", "hook_attn_out"))


def load_gemma_scope(path: Path) -> SAE:
    where = path / GEMMA_FILE
    try:
        with np.load(where, allow_pickle=False) as z:
            t = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
    except (OSError, ValueError) as e:
        raise ScSteerError(f"{str(where)!r} could not be read as an .npz of arrays ({str(e).splitlines()[0]})") from None
    need(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), where)
    fold_input_bias(t)
    d_in, d_sae = (int(n) for n in t["W_enc"].shape)
    hook = _gemma_hook(path)
    return build(SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_module=hook,
                           extra=source("gemma_scope", "JumpReLU", hook)), t, where)


def _gemma_hook(path: Path) -> str | None:
    """``blocks.L.hook_...`` from the release's folder names (``.../gemma-scope-2b-pt-res/layer_12/...``)."""
    parts = [p.lower() for p in path.resolve().parts]
    layer = next((int(m[1]) for p in reversed(parts) if (m := re.fullmatch(r"layer_(\d+)", p))), None)
    kinds = {hook for p in parts for key, hook in _KINDS if re.search(rf"(^|[-_]){key}([-_]|$)", p)}
    return f"blocks.{layer}.{kinds.pop()}" if layer is not None and len(kinds) == 1 else None


def load_llama_scope(path: Path) -> SAE:
    hp = read_json(path / LLAMA_CFG, "Llama Scope's hyperparams (a JSON object)")
    ckpt = path / "checkpoints"
    files = sorted(ckpt.glob("*.safetensors")) if ckpt.is_dir() else []
    where = ckpt / "final.safetensors" if (ckpt / "final.safetensors").exists() else (files[0] if len(files) == 1 else None)
    if where is None:
        raise ScSteerError(f"{str(path)!r}: expected checkpoints/final.safetensors beside hyperparams.json")
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in != hook_out:
        raise ScSteerError(f"{str(path)!r}: a transcoder ({hook_in} -> {hook_out}); sc-steer reads SAEs")
    try:
        d_in, d_sae, thr = int(hp["d_model"]), int(hp["d_sae"]), float(hp["jump_relu_threshold"])
        norm_in = float(hp["dataset_average_activation_norm"]["in"])
    except (KeyError, TypeError, ValueError) as e:
        raise ScSteerError(f"{str(path / LLAMA_CFG)!r}: missing or malformed {e} (expected d_model, d_sae, "
                           "jump_relu_threshold, dataset_average_activation_norm.in)") from None
    s = read_safetensors(where)
    need(s, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), where)
    scale = math.sqrt(d_in) / norm_in
    t = {"W_enc": s["encoder.weight"].float().T * scale, "b_enc": s["encoder.bias"].float(),
         "W_dec": s["decoder.weight"].float().T / scale, "b_dec": s["decoder.bias"].float() / scale,
         "threshold": torch.full((d_sae,), thr * scale)}
    fold_input_bias(t)
    return build(SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_module=hook_in,
                           extra=source("llama_scope", "JumpReLU", hook_in)), t, where)
