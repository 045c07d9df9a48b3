"""SAE architectures: ground-truth recovery, the maps, folding, files in every supported layout."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sc_steer import ScSteerError
from sc_steer.sae import ARCHITECTURES, SAEConfig, load_sae, make_sae
from sc_steer.sae.toy import firing_probabilities, heavy_tailed_codes, make_heavy_tailed_data, make_toy_data, mean_max_cosine
from sc_steer.sae.train import train_sae


def random_sae(arch, d_in=8, d_sae=24, k=3, seed=0):
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k if ARCHITECTURES[arch].uses_k else None))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn_like(p) * 0.3)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(d_sae).mul(0.4).add(0.05).log())
    return sae


@pytest.mark.parametrize("arch, kw", [("topk", {"k": 4}), ("relu", {"l1_coeff": 1.0})])
@pytest.mark.slow
def test_recovers_known_directions_in_superposition(arch, kw):
    """Uniform frequencies, defaults but the sparsity knob. Data and SAE are seeded apart: with one
    seed the SAE's initial decoder was the true directions and this passed at any budget."""
    x, dirs = make_toy_data(40_000, 64, 256, 4, seed=0)
    sae = train_sae(x, arch, d_sae=256, seed=0, **kw)
    assert mean_max_cosine(dirs, sae.W_dec.detach()) >= 0.95


def test_toy_data_and_sae_initialisation_are_seeded_apart():
    for seed in range(3):
        _, dirs = make_toy_data(10, 64, 256, 4, seed=seed)
        torch.manual_seed(seed)   # as the trainer seeds before it builds the SAE
        sae = make_sae(SAEConfig(architecture="topk", d_in=64, d_sae=256, k=4))
        assert mean_max_cosine(dirs, sae.W_dec.detach()) < 0.6


def test_maps_match_the_formulas():
    x = torch.randn(5, 8)
    for arch in ARCHITECTURES:
        sae = random_sae(arch)
        if arch == "gated":
            with torch.no_grad():
                sae.r_mag.normal_(0, 0.5)
                sae.b_mag.normal_(0, 0.5)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = sae.encode(x)
        if arch == "relu":
            ref = pre.clamp_min(0)
        elif arch == "topk":
            kth = pre.topk(3, dim=-1).values[:, -1:]
            ref = torch.where(pre >= kth, pre.clamp_min(0), torch.zeros_like(pre))
        elif arch == "batchtopk":
            ref = torch.where(pre > 0.2, pre, torch.zeros_like(pre))
        elif arch == "gated":   # the gate opens on pre; the magnitude path has its own scale and bias
            pi = (x - sae.b_dec) @ sae.W_enc
            ref = (pre > 0).float() * torch.relu(pi * sae.r_mag.exp() + sae.b_mag)
        else:
            ref = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
        torch.testing.assert_close(f, ref)
        torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_folding_the_training_scale_gives_raw_units(arch):
    sae = random_sae(arch)
    x = torch.randn(50, 8)
    s = 3.7
    f_scaled, x_hat_scaled = sae.encode(s * x), sae(s * x)
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), f_scaled / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(x), x_hat_scaled / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_round_trip_through_our_files(tmp_path, arch):
    sae = random_sae(arch)
    sae.save(tmp_path / arch)
    back = load_sae(tmp_path / arch)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    x = torch.randn(20, 8)
    assert torch.equal(back.encode(x), sae.encode(x))
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 24 and cfg["apply_b_dec_to_input"] is True
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)


def write_saelens_dir(path, arch, tensors, d_in, d_sae, **extra):
    path.mkdir()
    save_file(tensors, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "sae_lens_version": "6.5.0"},
           **extra}
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_hand_written_saelens_directories_load_with_identical_encodings(tmp_path):
    g = torch.Generator().manual_seed(3)
    d_in, d_sae = 6, 10
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    x = torch.randn(7, d_in, generator=g)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    thr = torch.rand(d_sae, generator=g)
    write_saelens_dir(tmp_path / "std", "standard", t, d_in, d_sae)
    write_saelens_dir(tmp_path / "topk", "topk", t, d_in, d_sae, k=3)
    write_saelens_dir(tmp_path / "jump", "jumprelu", {**t, "threshold": thr}, d_in, d_sae)
    write_saelens_dir(tmp_path / "nob", "standard", t, d_in, d_sae, apply_b_dec_to_input=False)
    assert torch.allclose(load_sae(tmp_path / "std").encode(x), pre.relu(), atol=1e-6)
    kth = pre.topk(3, -1).values[:, -1:]
    assert torch.allclose(load_sae(tmp_path / "topk").encode(x), torch.where(pre >= kth, pre.relu(), 0 * pre), atol=1e-6)
    assert torch.allclose(load_sae(tmp_path / "jump").encode(x), torch.where(pre > thr, pre, 0 * pre), atol=1e-6)
    pre_nob = x @ t["W_enc"] + t["b_enc"]
    assert torch.allclose(load_sae(tmp_path / "nob").encode(x), pre_nob.relu(), atol=1e-5)
    assert load_sae(tmp_path / "std").cfg.hook_module == "blocks.3.hook_resid_post"


def test_dictionary_learning_ae_pt(tmp_path):
    g = torch.Generator().manual_seed(4)
    d_in, d_sae = 6, 12
    state = {"encoder.weight": torch.randn(d_sae, d_in, generator=g), "encoder.bias": torch.randn(d_sae, generator=g),
             "decoder.weight": torch.randn(d_in, d_sae, generator=g), "bias": torch.randn(d_in, generator=g)}
    (tmp_path / "std").mkdir()
    torch.save(state, tmp_path / "std" / "ae.pt")
    (tmp_path / "std" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    x = torch.randn(9, d_in, generator=g)
    ref_f = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
    sae = load_sae(tmp_path / "std" / "ae.pt")
    assert torch.allclose(sae.encode(x), ref_f, atol=1e-6)
    assert torch.allclose(sae(x), ref_f @ state["decoder.weight"].T + state["bias"], atol=1e-5)
    topk = {"encoder.weight": state["encoder.weight"], "encoder.bias": state["encoder.bias"],
            "decoder.weight": state["decoder.weight"], "b_dec": state["bias"], "k": torch.tensor(2)}
    (tmp_path / "tk").mkdir()
    torch.save(topk, tmp_path / "tk" / "ae.pt")
    (tmp_path / "tk" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    f = load_sae(tmp_path / "tk").encode(x)
    assert ((f > 0).sum(-1) <= 2).all() and load_sae(tmp_path / "tk").cfg.k == 2


def test_pickled_code_is_never_loaded(tmp_path):
    (tmp_path / "evil").mkdir()
    torch.save({"encoder.weight": torch.zeros(2, 2), "payload": object()}, tmp_path / "evil" / "ae.pt")
    with pytest.raises(ScSteerError, match="weights-only"):
        load_sae(tmp_path / "evil")


@pytest.mark.parametrize("kwargs, message", [
    ({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": -1}, "k -1"),
    ({"architecture": "relu", "d_in": 8, "d_sae": 0}, "d_sae 0"),
    ({"architecture": "mystery", "d_in": 8, "d_sae": 16}, "unknown SAE architecture 'mystery'"),
    ({"architecture": "topk", "d_in": 8, "d_sae": 4, "k": 5}, "larger than d_sae"),
])
def test_bad_sae_configs(kwargs, message):
    with pytest.raises(ScSteerError, match=message):
        SAEConfig(**kwargs)


def test_corrupt_and_truncated_files(tmp_path):
    sae = random_sae("topk")
    sae.save(tmp_path / "a")
    w = tmp_path / "a" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ScSteerError, match="corrupt or truncated"):
        load_sae(tmp_path / "a")
    sae.save(tmp_path / "b")
    (tmp_path / "b" / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ScSteerError, match="corrupt or truncated"):
        load_sae(tmp_path / "b")
    with pytest.raises(ScSteerError, match="holds no SAE"):
        load_sae(tmp_path)


def test_decoder_constraint_removes_parallel_gradient():
    sae = random_sae("topk")
    sae.normalize_decoder()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(24), atol=1e-6)


@pytest.mark.parametrize("steps", [80, 500])
def test_batchtopk_inference_l0_matches_k_at_the_end_of_any_run(steps):
    """The EMA threshold lags on short runs (inference L0 1.5 for k = 3 after 80 steps); the
    end-of-run calibration puts the inference L0 within 5% of k, on data it was not fitted to."""
    x, _ = make_heavy_tailed_data(60_000, 16, 48, 3, 0.97, seed=2)
    sae = train_sae(x[:50_000], "batchtopk", d_sae=48, k=3, tokens=steps * 500, batch_size=500, lr=3e-3)
    l0 = float((sae.encode(x[50_000:]) > 0).sum(-1).float().mean())
    assert 0 < float(sae.threshold) and abs(l0 - 3) <= 0.05 * 3, l0


def test_calibration_is_the_cut_batchtopk_itself_makes():
    sae = random_sae("batchtopk", k=3)
    xs = [torch.randn(40, 8) for _ in range(3)]
    sae.calibrate(xs)
    cuts = [torch.relu(sae.pre_acts(x)).flatten().sort(descending=True).values[3 * 40 - 1] for x in xs]
    torch.testing.assert_close(sae.threshold, torch.stack(cuts).mean())


@pytest.mark.parametrize("arch", sorted(a for a, c in ARCHITECTURES.items() if c.trainable))
def test_saved_saes_take_raw_activations_with_a_large_mean(arch):
    """Activations far from the origin (mean 40 per dimension, spread 1): the trainer scales them to
    norm sqrt(d) and folds the scale back on save; the saved SAE on raw x must equal the trained one on
    s * x, divided by s, and still reconstruct the spread about the mean."""
    from sc_steer.sae.config import TrainConfig
    from sc_steer.sae.sources import tensor_source
    from sc_steer.sae.train import Trainer
    from sc_steer.sae.config import SAETrainConfig

    x, _ = make_toy_data(20_000, 16, 48, 3, seed=4)
    x = x + 40.0
    cfg = TrainConfig(sites=["x"], batch_size=500, tokens=150_000, checkpoint_every=1 << 30,
                      sae=SAETrainConfig(architecture=arch, d_sae=48, k=3, lr=3e-3, l1_coeff=0.3, l0_coeff=0.02))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tensor_source({"x": x}, 500, 0), tmp,
                          {"x": {"d": 16, "mean_norm": float(x.norm(dim=-1).mean())}}, progress=False)
        saved = trainer.run()["x"]
        trained, s = trainer.states["x"].sae, trainer.states["x"].scale
        with torch.no_grad():
            # a pre-activation within rounding of a threshold may flip: allow 1 in 10,000 entries
            close = torch.isclose(saved.encode(x), trained.encode(s * x) / s, rtol=1e-4, atol=1e-4)
            assert close.float().mean() > 1 - 1e-4
            close = torch.isclose(saved(x), trained(s * x) / s, rtol=1e-4, atol=1e-2)
            assert close.all(dim=1).float().mean() > 1 - 1e-3
            reloaded = load_sae(Path(tmp) / "saes" / "x")
            torch.testing.assert_close(reloaded(x), saved(x))
            fvu = ((saved(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert s < 0.2
    # in training units this spread is about 0.1 of a unit: ReLU's L1 and JumpReLU's threshold (1.0
    # at the start) silence every latent in so short a run, so only TopK-style SAEs are held to a
    # reconstruction here (a known limitation of scaling by the mean norm, which includes the mean)
    assert arch not in ("topk", "batchtopk") or fvu < 0.5, fvu


@pytest.fixture(scope="module", params=["topk", "batchtopk", "relu"])
def heavy_tailed_recovery(request):
    """Rare features (firing probability proportional to 0.98**i, 170x between the most and the least
    frequent) in 2x superposition: the benchmark's 1x setting (bench/toy_recovery.py), data seed 1,
    the trainer with its defaults only (SAE seed 0); ReLU + L1 with its own sparsity default."""
    x, dirs = make_heavy_tailed_data(100_000, 128, 256, 5, 0.98, seed=1)
    sae = train_sae(x, request.param, d_sae=256, k=5)
    return request.param, mean_max_cosine(dirs, sae.W_dec.detach())


@pytest.mark.slow
def test_heavy_tailed_recovery_with_defaults(heavy_tailed_recovery):
    """TopK: 0.66 with the defaults before the AuxK normaliser, the dead window, the step count and the LR
    were measured; 0.94 after the first three, 0.986 on this pair now (the benchmark's mean over three
    seeds is 0.988: bench/toy_recovery_results.md). ReLU + L1: 0.74 (three seeds) at l1_coeff 5
    without resampling, which left 44 latents dead and 95 with a twin; 0.977 now. BatchTopK: 0.968 on this pair
    without its small L1 on the kept activations (sae/batchtopk.py), 0.982 with it (the benchmark's mean
    0.983); one run carries about +-0.005 of rounding noise, hence the margin below."""
    arch, mmcs = heavy_tailed_recovery
    assert mmcs >= {"topk": 0.98, "batchtopk": 0.975, "relu": 0.95}[arch], mmcs


@pytest.mark.parametrize("corr", [0.0, 0.5])
def test_heavy_tailed_codes_fire_as_often_as_promised(corr):
    p = firing_probabilities(16, 2, 0.8)
    assert abs(float(p.sum()) - 2) < 1e-9 and abs(float(p[10] / p[0]) - 0.8 ** 10) < 1e-9
    n = 200_000
    fires = (heavy_tailed_codes(n, p, torch.Generator().manual_seed(0), correlation=corr, group=4) > 0).double()
    sd = (p * (1 - p) / n).sqrt()
    assert ((fires.mean(0) - p).abs() < 5 * sd + 1e-4).all()      # the copula keeps each marginal
    both = (fires[:, 0] * fires[:, 1]).mean() - fires[:, 0].mean() * fires[:, 1].mean()  # same group
    other = (fires[:, 0] * fires[:, 4]).mean() - fires[:, 0].mean() * fires[:, 4].mean()  # next group
    assert abs(float(other)) < 5 * float(sd[0] * 2)
    assert (float(both) > 0.02) == (corr > 0)
