"""Published SAE formats load exactly: each fixture under tests/fixtures/peer_saes/ was written by the
peer library's own class and save function, beside that library's own encode / decode of fixed inputs
(tests/fixtures/make_peer_saes.py; versions in versions.json). Gemma Scope and Llama Scope files are
written here as their documentation lays them out, with the documented formula as the reference."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sc_steer import ScSteerError
from sc_steer.sae import load_sae
from sc_steer.sae.base import SAEConfig
from sc_steer.sae.jumprelu import JumpReLUSAE
from sc_steer.sites import Site, site_from_hook

FIXTURES = Path(__file__).parent / "fixtures" / "peer_saes"
CASES = sorted(p.parent for p in FIXTURES.rglob("reference.safetensors"))
# the writer's hook name -> the site it means on the tests' tiny Llama
SITES = {"saelens-standard": "resid_post.1", "saelens-standard-nobdec": "resid_post.1", "saelens-topk": "resid_post.1",
         "saelens-topk-rescaled": "resid_post.0", "saelens-jumprelu": "resid_post.2", "saelens-gated": "mlp_out.1",
         "saelens-gated-nobdec": "resid_post.0", "dictionary_learning-AutoEncoder": "resid_post.0",
         "dictionary_learning-AutoEncoderTopK": "resid_post.1", "dictionary_learning-BatchTopKSAE": "resid_post.2",
         "dictionary_learning-JumpReluAutoEncoder": "resid_post.2", "dictionary_learning-GatedAutoEncoder": "mlp_out.1",
         "sparsify-topk/layers.0": "resid_post.0", "sparsify-skip/layers.2": "resid_post.2"}
TOL = 1e-5


def name(folder: Path) -> str:
    return str(folder.relative_to(FIXTURES))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference as a share of the reference's scale."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def test_every_writer_and_class_has_a_fixture():
    assert {name(c) for c in CASES} == set(SITES)
    versions = json.loads((FIXTURES / "versions.json").read_text())
    assert set(versions) == {"sae-lens", "dictionary-learning", "eai-sparsify", "torch"}


@pytest.mark.parametrize("folder", CASES, ids=name)
def test_a_fixture_encodes_and_decodes_as_its_writer_did(folder):
    ref = load_file(str(folder / "reference.safetensors"))
    sae = load_sae(folder)
    with torch.no_grad():
        f = sae.encode(ref["x"])
        assert torch.equal(f > 0, ref["f"] > 0), "a different set of active latents"
        assert max_rel_diff(f, ref["f"]) < TOL
        assert max_rel_diff(sae.reconstruct(ref["x"]), ref["x_hat"]) < TOL
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    src = sae.cfg.extra["source"]
    assert str(site_from_hook(src["hook"], 3, src.get("layer"))) == SITES[name(folder)]


def test_the_dictionary_learning_jumprelu_fixture_catches_the_old_reading():
    """Read as before (the encoder subtracting b_dec, as sc-steer's own does), the fixture's features are
    far off: the test above fails on that loader."""
    folder = FIXTURES / "dictionary_learning-JumpReluAutoEncoder"
    state = torch.load(folder / "ae.pt", weights_only=True)
    ref = load_file(str(folder / "reference.safetensors"))
    old = JumpReLUSAE(SAEConfig("jumprelu", 32, 64))
    old.load_state({k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")})
    with torch.no_grad():
        assert max_rel_diff(old.encode(ref["x"]), ref["f"]) > 0.05
        assert max_rel_diff(load_sae(folder).encode(ref["x"]), ref["f"]) < TOL


def gemma_scope(root: Path, layer: int = 1, d_in: int = 32, d_sae: int = 64, seed: int = 0) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    p = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
         "b_enc": torch.randn(d_sae, generator=g) * 0.5, "b_dec": torch.randn(d_in, generator=g) * 0.5,
         "threshold": torch.rand(d_sae, generator=g) * 0.5 + 0.05}
    folder = root / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    return folder, p


def test_gemma_scope_params_npz(tmp_path):
    """Gemma Scope's JumpReLU: pre = x W_enc + b_enc (no b_dec subtracted), f = relu(pre) * (pre > threshold)."""
    folder, p = gemma_scope(tmp_path)
    x = torch.randn(20, 32) * 3 + 1
    pre = x @ p["W_enc"] + p["b_enc"]
    f = torch.relu(pre) * (pre > p["threshold"])
    sae = load_sae(folder / "params.npz")
    with torch.no_grad():
        assert max_rel_diff(sae.encode(x), f) < TOL
        assert max_rel_diff(sae.reconstruct(x), f @ p["W_dec"] + p["b_dec"]) < TOL
    assert site_from_hook(sae.cfg.extra["source"]["hook"]) == Site("resid_post", 1)


def llama_scope(root: Path, hook_in="blocks.2.hook_resid_post", hook_out=None, seed: int = 1) -> tuple[Path, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    w = {"encoder.weight": torch.randn(64, 32, generator=g) * 0.3, "encoder.bias": torch.randn(64, generator=g) * 0.5,
         "decoder.weight": torch.randn(32, 64, generator=g) * 0.3, "decoder.bias": torch.randn(32, generator=g) * 0.5}
    hp = {"d_model": 32, "d_sae": 64, "hook_point_in": hook_in, "hook_point_out": hook_out or hook_in,
          "jump_relu_threshold": 0.2, "dataset_average_activation_norm": {"in": 12.0, "out": 12.0}}
    folder = root / "Llama3_1-8B-Base-L2R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    return folder, w, hp


def test_llama_scope_layout(tmp_path):
    """Llama Scope as SAELens's Llama Scope loader reads it: inputs scaled by s = sqrt(d) / norm_in,
    no b_dec subtracted, a scalar threshold (x s), outputs back in raw units."""
    folder, w, _ = llama_scope(tmp_path)
    s = math.sqrt(32) / 12.0
    x = torch.randn(20, 32) * 3 + 1
    pre = (x * s) @ w["encoder.weight"].T + w["encoder.bias"]
    f = torch.relu(pre) * (pre > 0.2 * s)
    x_hat = (f @ w["decoder.weight"].T + w["decoder.bias"]) / s
    sae = load_sae(folder)
    with torch.no_grad():
        assert max_rel_diff(sae.encode(x), f) < TOL
        assert max_rel_diff(sae.reconstruct(x), x_hat) < TOL
    assert site_from_hook(sae.cfg.extra["source"]["hook"]) == Site("resid_post", 2)


def test_a_sparsify_skip_connection_is_part_of_the_reconstruction_not_of_a_feature():
    folder = FIXTURES / "sparsify-skip" / "layers.2"
    sae = load_sae(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        no_skip = sae.decode(sae.encode(ref["x"]))
        assert max_rel_diff(no_skip, ref["x_hat"]) > 0.05      # the skip term matters here
    assert sae.W_skip is not None and sae.cfg.extra["source"]["skip_connection"] is True


def test_resaved_in_sc_steer_layout_the_sae_is_the_same(tmp_path):
    """What sc-steer import writes: every peer SAE saved in sc-steer's layout loads back identically."""
    for folder in CASES:
        sae = load_sae(folder)
        sae.save(tmp_path / name(folder).replace("/", "_"))
        back = load_sae(tmp_path / name(folder).replace("/", "_"))
        x = load_file(str(folder / "reference.safetensors"))["x"]
        with torch.no_grad():
            assert torch.equal(back.encode(x), sae.encode(x)), name(folder)
            assert torch.equal(back.reconstruct(x), sae.reconstruct(x)), name(folder)
        assert back.cfg.extra == sae.cfg.extra


@pytest.mark.parametrize("hook, message", [("blocks.0.hook_resid_pre", "embeddings"),
                                           ("blocks.1.attn.hook_z", "maps to no sc-steer site"),
                                           ("blocks.7.hook_resid_post", "layers 0-2"), ("encoder", "maps to no")])
def test_hook_names_that_map_to_no_site(hook, message):
    with pytest.raises(ScSteerError, match=message):
        site_from_hook(hook, 3)
