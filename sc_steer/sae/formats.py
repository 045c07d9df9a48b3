"""Read SAEs from disk: sc-steer / SAELens v6 directories and dictionary_learning ``ae.pt`` folders.

Never unpickles: safetensors everywhere, and ``torch.load(weights_only=True)`` for ``ae.pt``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..devices import resolve_device
from ..errors import ScSteerError
from ..files import read_json
from .base import ARCHITECTURES, CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, SAE, SAEConfig, make_sae

_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_FROM_DICTIONARY_LEARNING = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                             "JumpReluAutoEncoder": "jumprelu"}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ScSteerError(f"{str(path)!r} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def _check_shapes(tensors: dict[str, torch.Tensor], cfg: SAEConfig, where: Path) -> None:
    want = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,)}
    for key, shape in want.items():
        if key not in tensors:
            raise ScSteerError(f"{str(where)!r} has no tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise ScSteerError(f"{str(where)!r}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                               f"(d_in={cfg.d_in}, d_sae={cfg.d_sae})")


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by sc-steer or SAELens, or a dictionary_learning ``ae.pt`` folder.

    Weights are float32 whatever the file's dtype; ``device`` is where they go (functions that take a
    model move SAEs to the model's device themselves, see ``sc_steer.devices``)."""
    path = Path(path)
    if path.is_file() and path.name == "ae.pt":
        path = path.parent
    if not path.is_dir():
        raise ScSteerError(f"SAE path {str(path)!r} does not exist or is not a folder")
    if (path / CFG_FILE).exists():
        sae = _load_saelens_layout(path)
    elif (path / "ae.pt").exists():
        sae = _load_dictionary_learning(path)
    else:
        raise ScSteerError(f"{str(path)!r} holds no SAE (expected cfg.json + sae_weights.safetensors, "
                           "or ae.pt + config.json)")
    for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ScSteerError(f"SAE {str(path)!r}: its {name} holds NaN or infinite values (a diverged or corrupt "
                               "training); retrain it or load another")
    return sae.to(resolve_device(device)).eval()


def _load_saelens_layout(path: Path) -> SAE:
    raw = read_json(path / CFG_FILE, "a JSON object of SAE settings")
    if not (path / WEIGHTS_FILE).exists():
        raise ScSteerError(f"{str(path)!r} has cfg.json but no {WEIGHTS_FILE}")
    tensors = _read_safetensors(path / WEIGHTS_FILE)
    if "sc_steer" in raw:
        try:
            cfg = SAEConfig.from_dict(raw["sc_steer"])
        except (TypeError, AttributeError) as e:
            raise ScSteerError(f"{str(path / CFG_FILE)!r}: its sc_steer block is incomplete ({e})") from None
    else:
        arch = raw.get("architecture", "standard")
        if arch not in _FROM_SAELENS:
            raise ScSteerError(f"{str(path)!r}: SAELens architecture {arch!r} is not supported "
                               f"(supported: {', '.join(_FROM_SAELENS)})")
        meta = raw.get("metadata") or raw.get("meta") or {}
        cfg = SAEConfig(architecture=_FROM_SAELENS[arch], d_in=raw.get("d_in"), d_sae=raw.get("d_sae"),
                        k=raw.get("k"), hook_module=meta.get("hook_name", raw.get("hook_name")),
                        model_name=meta.get("model_name", raw.get("model_name")),
                        context_size=meta.get("context_size"), prepend_bos=bool(meta.get("prepend_bos", True)))
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ScSteerError(f"{str(path)!r}: normalize_activations={norm!r} needs a scaling factor that is not "
                           "stored with the SAE; fold it into the weights first")
    _check_shapes(tensors, cfg, path / WEIGHTS_FILE)
    tensors = {k: v.float() for k, v in tensors.items()}
    if not raw.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc: move b_dec's share into b_enc
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    if ARCHITECTURES[cfg.architecture].has_threshold and "threshold" not in tensors:
        raise ScSteerError(f"{str(path)!r}: a {cfg.architecture} SAE needs a 'threshold' tensor")
    sae = make_sae(cfg)
    sae.load_state(tensors)
    if (path / SPARSITY_FILE).exists():
        sae.log_firing_freq = _read_safetensors(path / SPARSITY_FILE).get("sparsity")
    return sae


def _load_dictionary_learning(path: Path) -> SAE:
    conf = read_json(path / "config.json", "dictionary_learning's config (a JSON object)") \
        if (path / "config.json").exists() else {}
    trainer = conf.get("trainer", conf)
    if not isinstance(trainer, dict):
        raise ScSteerError(f"{str(path / 'config.json')!r}: its \"trainer\" entry should be a JSON object")
    dict_class = trainer.get("dict_class", "AutoEncoder")
    if dict_class not in _FROM_DICTIONARY_LEARNING:
        raise ScSteerError(f"{str(path)!r}: dictionary_learning class {dict_class!r} is not supported "
                           f"(supported: {', '.join(_FROM_DICTIONARY_LEARNING)})")
    try:
        state = torch.load(path / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses pickled code; truncated zips fail too
        raise ScSteerError(f"{str(path / 'ae.pt')!r} could not be read as a weights-only state dict "
                           f"({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ScSteerError(f"{str(path / 'ae.pt')!r} is not a state dict of tensors")
    try:
        if "encoder.weight" in state:
            t = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                 "W_dec": state["decoder.weight"].T, "b_dec": state["bias"] if "bias" in state else state["b_dec"]}
        else:
            t = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k in state}
    except KeyError as e:
        raise ScSteerError(f"{str(path / 'ae.pt')!r} has no tensor {e}") from None
    if "threshold" in state:
        t["threshold"] = state["threshold"].float().reshape(-1)
        if t["threshold"].numel() == 1:
            t["threshold"] = t["threshold"].expand(t["W_enc"].shape[1])
    k = state.get("k", trainer.get("k"))
    k = int(k) if k is not None else None
    arch = _FROM_DICTIONARY_LEARNING[dict_class]
    if "W_enc" not in t:
        raise ScSteerError(f"{str(path / 'ae.pt')!r} has none of the expected weight names")
    if t["W_enc"].dim() != 2:
        raise ScSteerError(f"{str(path / 'ae.pt')!r}: the encoder weight has shape {tuple(t['W_enc'].shape)}, "
                           "expected a matrix")
    cfg = SAEConfig(architecture=arch, d_in=int(t["W_enc"].shape[0]), d_sae=int(t["W_enc"].shape[1]),
                    k=k if ARCHITECTURES[arch].uses_k else None, model_name=trainer.get("lm_name"),
                    hook_module=trainer.get("submodule_name"))
    _check_shapes(t, cfg, path / "ae.pt")
    sae = make_sae(cfg)
    sae.load_state({key: v.float().contiguous() for key, v in t.items()})
    return sae
