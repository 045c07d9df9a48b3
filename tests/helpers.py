"""Helpers shared by the tests."""
import torch

from sc_steer.sae import SAEConfig, make_sae


def firing_sae(arch: str = "relu", d_in: int = 32, d_sae: int = 40, seed: int = 5, k: int | None = None,
               gain: float = 8.0, bias: float = -0.1):
    """A random SAE scaled so that its features fire on a tiny model's small activations."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.W_enc.mul_(gain)
        sae.b_enc.fill_(bias)
    return sae


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def launch_chromium(playwright):
    """Debian's headless Chromium (playwright cannot download its own browser here)."""
    import shutil

    import pytest

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is needed for the browser tests: apt-get install -y chromium")
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
