"""What every reader shares: safe tensor files, shape checks, folding a bias-free input into ``b_enc``,
and building the SAE."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import ScSteerError
from ..base import ARCHITECTURES, SAE, SAEConfig, make_sae


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ScSteerError(f"{str(path)!r} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def need(tensors: dict, keys, where: Path) -> None:
    for k in keys:
        if k not in tensors:
            raise ScSteerError(f"{str(where)!r} has no tensor {k!r}")


def check_shapes(tensors: dict[str, torch.Tensor], cfg: SAEConfig, where: Path) -> None:
    d_in, d_sae = cfg.d_in, cfg.d_sae
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
            "threshold": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,), "W_skip": (d_in, d_in)}
    need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    for key, shape in want.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ScSteerError(f"{str(where)!r}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                               f"(d_in={d_in}, d_sae={d_sae})")


def fold_input_bias(t: dict[str, torch.Tensor]) -> None:
    """A writer whose encoder reads ``x W_enc + b_enc`` (no ``- b_dec``): sc-steer's ``(x - b_dec) W_enc +
    b_enc'`` equals it with ``b_enc' = b_enc + b_dec W_enc`` (gated: the magnitude path's bias too)."""
    shift = t["b_dec"] @ t["W_enc"]
    t["b_enc"] = t["b_enc"] + shift
    if "r_mag" in t:
        t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()


def fold_decoder_norm(t: dict[str, torch.Tensor]) -> None:
    """A writer that scales pre-activations by each decoder row's norm and divides activations by it
    before decoding: the same SAE with unit rows, ``W_enc`` and ``b_enc`` scaled by the norms."""
    n = t["W_dec"].norm(dim=1)
    t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]


def build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: Path) -> SAE:
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    check_shapes(tensors, cfg, where)
    cls = ARCHITECTURES[cfg.architecture]
    if cls.has_threshold and "threshold" not in tensors:
        raise ScSteerError(f"{str(where)!r}: a {cfg.architecture} SAE needs a 'threshold' tensor")
    if cfg.architecture == "gated":
        need(tensors, ("r_mag", "b_mag"), where)
    sae = make_sae(cfg)
    sae.load_state(tensors)
    return sae


def source(fmt: str, cls: str, hook: str | None = None, **more) -> dict:
    """``cfg.extra["source"]``: which writer, which of its classes, and its name for the hook point."""
    return {"source": {"format": fmt, "class": cls, "hook": hook, **{k: v for k, v in more.items() if v is not None}}}
