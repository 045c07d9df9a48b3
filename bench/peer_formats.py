"""How exactly sc-steer reads each published SAE format: for every fixture written by a peer library's
own code (tests/fixtures/peer_saes/, made by tests/fixtures/make_peer_saes.py), the largest difference
between sc-steer's encode / reconstruction and the writer's own, on the writer's fixed inputs.

    python bench/peer_formats.py
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sc_steer.sae import load_sae

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "peer_saes"


def main() -> None:
    versions = json.loads((FIXTURES / "versions.json").read_text())
    print("written by " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    print("| writer / class | loaded as | max abs diff f | max abs diff x_hat | max abs f | same active set |")
    print("|---|---|---|---|---|---|")
    for ref_file in sorted(FIXTURES.rglob("reference.safetensors")):
        folder = ref_file.parent
        ref = load_file(str(ref_file))
        sae = load_sae(folder)
        with torch.no_grad():
            f = sae.encode(ref["x"])
            x_hat = sae.reconstruct(ref["x"])
        print(f"| {folder.relative_to(FIXTURES)} | {sae.cfg.architecture} | {float((f - ref['f']).abs().max()):.1e} | "
              f"{float((x_hat - ref['x_hat']).abs().max()):.1e} | {float(ref['f'].abs().max()):.1f} | "
              f"{bool(torch.equal(f > 0, ref['f'] > 0))} |")


if __name__ == "__main__":
    main()
