"""Sparse autoencoders: one file per architecture, a shared base, file formats, training, metrics."""
from . import batchtopk, gated, jumprelu, relu, topk  # noqa: F401  (registers the architectures)
from .base import ARCHITECTURES, SAE, SAEConfig, make_sae
from .formats import load_sae

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "load_sae", "make_sae"]
