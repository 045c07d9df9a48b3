"""Read SAEs from the files the field publishes, computing exactly what their writers compute.

One module per writer; ``load_sae`` tells them apart by the files in the folder:

    cfg.json + sae_weights.safetensors       sc-steer, SAELens                  (saelens.py)
    ae.pt (+ config.json)                    dictionary_learning                (dictionary_learning.py)
    cfg.json + sae.safetensors               EleutherAI sparsify                (sparsify.py)
    params.npz                               Gemma Scope                        (scope.py)
    hyperparams.json + checkpoints/*.safetensors   Llama Scope                  (scope.py)

Every loader turns its writer's weights into one of sc-steer's architectures (``sae/*.py``), folding
what its writer does differently into the weights (an encoder that does not subtract ``b_dec``,
decoder-norm rescaling), and records where the SAE came from in ``cfg.extra["source"]`` (format,
class, the writer's hook name), which ``sc-steer import`` reads to find the SAE's site. What a writer
does that no sc-steer architecture can compute exactly (a per-token normalisation, a GroupMax
activation, a transcoder) is refused with one line naming it, never loaded approximately. Nothing is
unpickled: safetensors and ``.npz`` without pickles, and ``torch.load(weights_only=True)`` for ``ae.pt``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...devices import resolve_device
from ...errors import ScSteerError
from ..base import CFG_FILE, SAE, WEIGHTS_FILE
from . import dictionary_learning, saelens, scope, sparsify

LAYOUTS = ("cfg.json + sae_weights.safetensors (sc-steer, SAELens)", "ae.pt + config.json (dictionary_learning)",
           "cfg.json + sae.safetensors (sparsify)", "params.npz (Gemma Scope)",
           "hyperparams.json + checkpoints/final.safetensors (Llama Scope)")


def detect(path: Path) -> str | None:
    """Which writer's layout the folder ``path`` holds (None: no SAE)."""
    if (path / CFG_FILE).exists() and (path / WEIGHTS_FILE).exists():
        return "saelens"
    if (path / "ae.pt").exists():
        return "dictionary_learning"
    if (path / CFG_FILE).exists() and (path / sparsify.WEIGHTS).exists():
        return "sparsify"
    if (path / scope.GEMMA_FILE).exists():
        return "gemma_scope"
    if (path / scope.LLAMA_CFG).exists():
        return "llama_scope"
    if (path / CFG_FILE).exists():
        return "saelens"   # its loader names the missing weights file
    return None


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder (or its ``ae.pt`` / ``params.npz``) in any layout above.

    Weights are float32 whatever the file's dtype; ``device`` is where they go (functions that take a
    model move SAEs to the model's device themselves, see ``sc_steer.devices``)."""
    path = Path(path)
    if path.is_file() and path.name in ("ae.pt", scope.GEMMA_FILE):
        path = path.parent
    if not path.is_dir():
        raise ScSteerError(f"SAE path {str(path)!r} does not exist or is not a folder")
    kind = detect(path)
    if kind is None:
        raise ScSteerError(f"{str(path)!r} holds no SAE (expected one of: {'; '.join(LAYOUTS)})")
    sae = {"saelens": saelens.load, "dictionary_learning": dictionary_learning.load, "sparsify": sparsify.load,
           "gemma_scope": scope.load_gemma_scope, "llama_scope": scope.load_llama_scope}[kind](path)
    for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ScSteerError(f"SAE {str(path)!r}: its {name} holds NaN or infinite values (a diverged or corrupt "
                               "training); retrain it or load another")
    return sae.to(resolve_device(device)).eval()


__all__ = ["LAYOUTS", "detect", "load_sae"]
