"""sc-steer: sparse autoencoders on language-model activations, from collection to steering.

The data flows one way: model (``models``) -> activations (``activations``) -> SAEs -> features ->
graph / steering. See README.md for the pipeline and the CLI.
"""
from .version import __version__  # noqa: E402
from .activations import collect  # noqa: E402
from .errors import ScSteerError  # noqa: E402
from .models import LM, open_model  # noqa: E402
from .sae import SAE, SAEConfig, load_sae  # noqa: E402
from .sae.train import train_sae  # noqa: E402
from .sites import Site, parse_sites  # noqa: E402
from .store import ActivationStore  # noqa: E402

__all__ = ["ActivationStore", "LM", "SAE", "SAEConfig", "ScSteerError", "Site", "collect", "load_sae", "open_model",
           "parse_sites", "train_sae", "__version__"]
