"""The GPU training step (run with `python -m pytest -m gpu`): the Triton kernel against the PyTorch
fallback, the sparse step against the dense reference, no host syncs, and resume with fused Adam.

``SC_STEER_GPU_TESTS_DEVICE=cpu`` runs what does not need Triton on the CPU (a dry run).
"""
import os

import pytest
import torch

from helpers import reference_loss, sparse_path_indices
from sc_steer.sae import SAEConfig, make_sae
from sc_steer.sae import sparse
from sc_steer.sae.base import StepInputs

DEV = os.environ.get("SC_STEER_GPU_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def triton_ok() -> bool:
    from sc_steer.sae import triton_kernels

    return DEV.startswith("cuda") and triton_kernels.available()


@pytest.mark.parametrize("shape", [(4096, 64, 4096, 65536), (300, 7, 1000, 5000)])
def test_triton_scatter_rows_matches_the_torch_fallback(shape):
    if not triton_ok():
        pytest.skip("needs Triton on CUDA")
    from sc_steer.sae.triton_kernels import scatter_rows

    B, k, d, s = shape
    g = torch.Generator(device=DEV).manual_seed(0)
    idx = torch.randn(B, s, device=DEV, generator=g).topk(k, dim=1).indices
    idx[:, 0] = 11  # one latent on every row: the longest segment (a repeated index just adds up)
    coef = torch.randn(B, k, device=DEV, generator=g).to(torch.bfloat16)
    dense = torch.randn(B, d, device=DEV, generator=g).to(torch.bfloat16)
    a = scatter_rows(idx, coef, dense, s)
    b = sparse.scatter_rows_torch(idx, coef, dense, s)
    assert a.dtype == torch.float32 and a.shape == (s, d)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,dtype", [((4096, 65536), torch.bfloat16), ((301, 5003), torch.float32)])
def test_triton_row_dot_matches_an_fp64_product(shape, dtype):
    """b_dec's gradient ``W_enc @ g_sum``: the Triton row kernel against a float64 product."""
    if not triton_ok():
        pytest.skip("needs Triton on CUDA")
    from sc_steer.sae.triton_kernels import row_dot

    g = torch.Generator(device=DEV).manual_seed(1)
    W = torch.randn(*shape, device=DEV, generator=g).to(dtype)
    v = torch.randn(shape[1], device=DEV, generator=g)
    want = W.double() @ v.double()
    got = row_dot(W, v)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape", [(4096, 64, 4096, 65536), (300, 7, 1000, 5000)])
def test_triton_gather_dot_matches_the_torch_fallback(shape):
    if not triton_ok():
        pytest.skip("needs Triton on CUDA")
    from sc_steer.sae.triton_kernels import gather_dot

    B, k, d, s = shape
    g = torch.Generator(device=DEV).manual_seed(2)
    idx = torch.randn(B, s, device=DEV, generator=g).topk(k, dim=1).indices
    W = torch.randn(s, d, device=DEV, generator=g).to(torch.bfloat16)
    grad = torch.randn(B, d, device=DEV, generator=g).to(torch.bfloat16)
    want = (W.double()[idx] * grad.double()[:, None, :]).sum(-1) if B * k * d <= 1 << 28 else None
    got = gather_dot(idx, W, grad)
    ref = sparse.gather_dot_torch(idx, W, grad).float()
    assert got.dtype == torch.float32 and got.shape == (B, k)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-1)   # the fallback's output is rounded to bf16
    if want is not None:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def _step(sae, x, inputs, autocast=True):
    sae.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = sae.train_forward(x, inputs)
    out.x_hat = out.x_hat.float()
    loss, _ = sae.loss(x, out, inputs)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("split", ["gathers", "auto"])  # row gathers throughout; dense where entries are many
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_gpu_step_matches_torch_kernels_and_the_dense_reference(arch, split, monkeypatch):
    if split == "gathers":
        monkeypatch.setitem(sparse.DENSE_FROM, torch.device(DEV).type, float("inf"))
    torch.manual_seed(0)
    d_in, d_sae, k, B = 256, 4096, 32, 1024
    sae = make_sae(SAEConfig(arch, d_in, d_sae, k=k)).to(DEV)
    x = torch.randn(B, d_in, device=DEV) * 3
    dead = torch.zeros(d_sae, dtype=torch.bool, device=DEV)
    dead[:300] = True
    inputs = StepInputs(aux_coeff=1 / 32, k_aux=128, dead=dead, n_dead=300)
    loss, grads = _step(sae, x, inputs)
    default = sparse.kernels(x.device)
    if default == "triton":
        monkeypatch.setenv("SC_STEER_KERNELS", "torch")   # the Triton kernel against the PyTorch fallback
        loss_t, grads_t = _step(sae, x, inputs)
        assert abs(loss - loss_t) <= 1e-5 * abs(loss_t)
        for n in grads:
            torch.testing.assert_close(grads[n], grads_t[n], rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("SC_STEER_KERNELS", "autograd")  # fp32 pre-activations: a few bf16 near-ties differ
    loss_a, _ = _step(sae, x, inputs)
    assert abs(loss - loss_a) <= 1e-2 * abs(loss_a)
    monkeypatch.delenv("SC_STEER_KERNELS")
    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    idx = aux_idx = None
    if default != "autograd":
        idx, aux_idx = sparse_path_indices(sae, x, k, dead, 128, batch_topk=arch == "batchtopk")
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        ref = reference_loss(p, x, k, dead, 128, 1 / 32, batch_topk=arch == "batchtopk", idx=idx, aux_idx=aux_idx)
    ref.backward()
    assert abs(loss - float(ref)) <= 2e-2 * float(ref)
    for n, t in p.items():
        err = float((grads[n] - t.grad).norm() / t.grad.norm())
        assert err <= 3e-2, (n, err)


def test_a_topk_training_step_makes_no_host_sync(tmp_path):
    """With AuxK off, a whole trainer step (forward, backward, clipping, fused Adam, bookkeeping) runs
    without waiting for the GPU; logging reads the values later."""
    if not DEV.startswith("cuda"):
        pytest.skip("sync detection needs CUDA")
    from sc_steer.sae.config import config_from_dict
    from sc_steer.sae.sources import tensor_source
    from sc_steer.sae.train import Trainer

    x = torch.randn(4096, 128)
    cfg = config_from_dict({"sites": ["x"], "batch_size": 1024, "tokens": 1024 * 20, "autocast": True,
                            "sae": {"architecture": "topk", "d_sae": 2048, "k": 16, "aux_coeff": 0.0}})
    tr = Trainer(cfg, tensor_source({"x": x}, 1024, 0), tmp_path, {"x": {"d": 128, "mean_norm": 11.3}},
                 device=DEV, progress=False)
    tr._init_states({"x": x})
    st = tr.states["x"]
    batch = x[:1024].to(DEV)
    tr._step_site(st, batch)  # first step: Adam allocates its state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = tr._step_site(st, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(stats["l0"]) > 0


def test_resume_with_fused_adam_ends_where_an_uninterrupted_run_ends(tmp_path):
    from sc_steer.sae.config import config_from_dict
    from sc_steer.sae.sources import tensor_source
    from sc_steer.sae.train import Trainer

    x = torch.randn(4096, 64)
    cfg = config_from_dict({"sites": ["x"], "batch_size": 512, "tokens": 512 * 8, "checkpoint_every": 3,
                            "autocast": DEV.startswith("cuda"), "sae": {"architecture": "topk", "d_sae": 512, "k": 8}})
    info = {"x": {"d": 64, "mean_norm": float(x.norm(dim=-1).mean())}}
    whole = Trainer(cfg, tensor_source({"x": x}, 512, 0), tmp_path / "a", info, device=DEV, progress=False).run()
    if DEV.startswith("cuda"):
        assert whole["x"].W_dec.device.type == "cuda"

    part = Trainer(cfg, tensor_source({"x": x}, 512, 0), tmp_path / "b", info, device=DEV, progress=False)
    source = part.source

    def stop_after_three(start):
        for i, b in enumerate(source(start)):
            if i == 2:
                part._stop = True
            yield b

    part.source = stop_after_three
    with pytest.raises(KeyboardInterrupt):
        part.run()
    resumed = Trainer(cfg, tensor_source({"x": x}, 512, 0), tmp_path / "b", info, device=DEV,
                      progress=False).run(resume=True)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(resumed["x"], name), getattr(whole["x"], name), rtol=1e-5, atol=1e-6)
