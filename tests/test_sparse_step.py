"""The sparse TopK training step (sae/sparse.py) against a plain dense autograd step written here:
same loss and same gradients for every parameter, in fp32 and under bf16 autocast, with AuxK on."""
import pytest
import torch

from sc_steer.sae import SAEConfig, make_sae
from sc_steer.sae import sparse
from sc_steer.sae.base import StepInputs
from sc_steer.sae.topk import TopKSAE

from helpers import reference_loss, sparse_path_indices

D_IN, D_SAE, K, B = 48, 384, 6, 256


def make(arch="topk", seed=0, b_enc: float = 0.0):
    """``b_enc`` shifts every pre-activation: a negative shift leaves some of the top k below zero, so
    the ReLU on the selected values matters."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(arch, D_IN, D_SAE, k=K))
    with torch.no_grad():
        sae.b_enc.normal_(b_enc, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(B, D_IN) * 2
    return sae, x


def ours(sae, x, dead, k_aux, aux_coeff, autocast):
    inputs = StepInputs(aux_coeff=aux_coeff, k_aux=k_aux, dead=dead,
                        n_dead=0 if dead is None else int(dead.sum()))
    sae.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sae.train_forward(x, inputs)
    out.x_hat = out.x_hat.float()
    loss, _ = sae.loss(x, out, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}


def reference(sae, x, dead, k_aux, aux_coeff, autocast, same_selection=False):
    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    idx = aux_idx = None
    if same_selection:
        idx, aux_idx = sparse_path_indices(sae, x, K, dead, k_aux, batch_topk=sae.architecture == "batchtopk")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = reference_loss(p, x, K, dead, k_aux, aux_coeff, batch_topk=sae.architecture == "batchtopk",
                              idx=idx, aux_idx=aux_idx)
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in p.items()}


DENSE_SPLITS = {"gathers": float("inf"), "aux-dense": 12 / D_SAE, "dense": 0.0}  # sparse.DENSE_FROM per case


@pytest.mark.parametrize("path", ["torch", "autograd", "torch-aux-dense", "torch-dense"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead,k_aux,b_enc", [(0, 24, 0.0), (10, 24, 0.0), (200, 24, 0.0), (0, 24, -5.0)])
@pytest.mark.parametrize("autocast", [False, True])
def test_sparse_step_matches_the_dense_reference(arch, n_dead, k_aux, b_enc, autocast, path, monkeypatch):
    """Loss and all four gradients agree on both CPU paths (the sparse one with its PyTorch fallbacks,
    and plain autograd); n_dead < k_aux exercises AuxK's masking of live latents; b_enc = -5 puts some
    selected pre-activations below zero. The sparse path runs with row gathers only, with its dense
    products for AuxK's many entries per row (k = 6 gathers, 6 + 24 entries dense), and dense throughout."""
    if b_enc < 0 and autocast:
        pytest.skip("selected values crowd around zero, where bf16 rounding flips ReLU's mask: fp32 only")
    path, _, split = path.partition("-")
    monkeypatch.setitem(sparse.DENSE_FROM, "cpu", DENSE_SPLITS[split or "gathers"])
    monkeypatch.setenv("SC_STEER_KERNELS", path)
    sae, x = make(arch, b_enc=b_enc)
    if b_enc < 0 and arch == "topk":
        pre = sae.pre_acts(x).detach()
        assert (pre.topk(K, dim=-1).values < 0).float().mean() > 0.1
    dead = None
    if n_dead:
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    l_ours, g_ours = ours(sae, x, dead, k_aux, 0.5, autocast)
    # bf16 pre-activations have near-ties; every path rounds them once (bias added in the GEMM), so under
    # autocast the reference takes the same selection and checks the gradients given it
    same = autocast
    l_ref, g_ref = reference(sae, x, dead, k_aux, 0.5, autocast, same_selection=same)
    rtol = 2e-2 if autocast else 1e-5
    assert abs(float(l_ours) - float(l_ref)) <= rtol * float(l_ref)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        err = float((g_ours[name] - g_ref[name]).norm() / g_ref[name].norm())
        assert err <= (3e-2 if autocast else 1e-5), (name, err)
    if arch == "topk":  # the sparse step touches only the selected latents' encoder columns
        fired = g_ref["b_enc"] != 0
        assert torch.equal(g_ours["W_enc"].abs().sum(0) > 0, fired | (g_ref["W_enc"].abs().sum(0) > 0))


@pytest.mark.parametrize("path", ["torch", "autograd"])
def test_aux_changes_the_gradient_only_of_dead_latents(path, monkeypatch):
    """A check that can fail: with AuxK on, dead latents' encoder columns get gradient (they did not fire)."""
    monkeypatch.setenv("SC_STEER_KERNELS", path)
    sae, x = make()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:50] = True
    _, g_no = ours(sae, x, None, 24, 0.5, False)
    _, g_aux = ours(sae, x, dead, 24, 0.5, False)
    changed = (g_aux["W_enc"] - g_no["W_enc"]).abs().sum(0) > 0
    assert changed[:50].any() and not changed[50:].any()


def test_scatter_rows_and_gather_dot_against_dense_products():
    torch.manual_seed(3)
    idx = torch.randn(40, 100).topk(7, dim=1).indices
    idx[:, 0] = 5                       # one latent on every row (a repeated index just adds up)
    coef, dense, W = torch.randn(40, 7), torch.randn(40, 33), torch.randn(100, 33)
    F = torch.zeros(40, 100).scatter_add_(1, idx, coef)
    torch.testing.assert_close(sparse.scatter_rows(idx, coef, dense, 100), F.T @ dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.gather_dot(idx, W, dense), (dense @ W.T).gather(1, idx), rtol=1e-5, atol=1e-5)


def test_chunked_torch_paths_agree_with_one_chunk(monkeypatch):
    torch.manual_seed(4)
    idx = torch.randn(64, 50).topk(5, dim=1).indices
    coef, dense = torch.randn(64, 5), torch.randn(64, 16)
    whole = sparse.scatter_rows_torch(idx, coef, dense, 50)
    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 5 * 16 * 3)  # 3 rows a chunk
    torch.testing.assert_close(sparse.scatter_rows_torch(idx, coef, dense, 50), whole, rtol=1e-6, atol=1e-6)


def test_kernel_choice_is_checked(monkeypatch):
    from sc_steer.errors import ScSteerError

    monkeypatch.setenv("SC_STEER_KERNELS", "cuda-please")
    with pytest.raises(ScSteerError, match="SC_STEER_KERNELS"):
        sparse.kernels(torch.device("cpu"))
    monkeypatch.setenv("SC_STEER_KERNELS", "triton")
    assert sparse.kernels(torch.device("cpu")) == "torch"   # the kernel is for CUDA tensors only
    monkeypatch.setenv("SC_STEER_KERNELS", "auto")
    assert sparse.kernels(torch.device("cpu")) == "torch"
    monkeypatch.setenv("SC_STEER_KERNELS", "torch")
    assert sparse.kernels(torch.device("cpu")) == "torch"


def test_training_with_the_sparse_step_still_learns():
    """End to end: a TopK SAE trained by the trainer reconstructs data drawn from known sparse features."""
    from sc_steer.sae.train import train_sae

    torch.manual_seed(0)
    feats = torch.randn(64, 16)
    feats /= feats.norm(dim=1, keepdim=True)
    codes = (torch.rand(8192, 64) < 0.05) * torch.rand(8192, 64) * 3
    x = codes @ feats
    sae = train_sae(x, "topk", d_sae=128, k=4, tokens=8192 * 15, batch_size=512)
    assert isinstance(sae, TopKSAE)
    with torch.no_grad():
        fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.25, fvu


def test_a_stale_dead_count_gives_the_exact_result(monkeypatch):
    """The host's dead count may be larger than the mask (it sizes AuxK); extra picks are live latents
    and must be dropped, so the step equals the one with the exact count."""
    monkeypatch.setenv("SC_STEER_KERNELS", "torch")
    sae, x = make()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:10] = True
    exact = ours(sae, x, dead, 24, 0.5, False)
    inputs = StepInputs(aux_coeff=0.5, k_aux=24, dead=dead, n_dead=24)   # says 24, 10 are dead
    sae.zero_grad(set_to_none=True)
    out = sae.train_forward(x, inputs)
    loss, _ = sae.loss(x, out, inputs)
    loss.backward()
    assert float(loss) == pytest.approx(float(exact[0]), rel=1e-6)
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, exact[1][n], rtol=1e-5, atol=1e-7)


def test_learning_rate_schedule_by_hand():
    from sc_steer.sae.optim import lr_factor

    # 100 steps, 10% warm-up (10 steps), 20% linear decay (the last 20 steps)
    got = [lr_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert got[:3] == pytest.approx([0.1, 0.2, 0.3]) and got[9] == pytest.approx(1.0)
    assert got[10:80] == pytest.approx([1.0] * 70)
    assert got[80] == pytest.approx(1.0) and got[90] == pytest.approx(0.5) and got[99] == pytest.approx(0.05)
    assert lr_factor(0, 100_000, 0.5, 0.0) == pytest.approx(1 / 1000)   # warm-up is capped at 1,000 steps


def test_firing_bookkeeping():
    from sc_steer.sae.state import SiteState, record_firing

    st = SiteState("x", None, None, None, 1.0, torch.tensor([5.0, 5.0, 5.0, 0.0], dtype=torch.float64),
                   torch.zeros(4, dtype=torch.float64))
    record_firing(st, torch.tensor([0, 1, 7, 0]), 100)
    assert st.since_fired.tolist() == [105, 0, 0, 100]        # one firing is enough to reset
    assert st.fire_count.tolist() == [0, 1, 7, 0]


def test_jumprelu_pseudo_gradients_by_hand():
    """Straight-through estimators with a rectangle kernel of width eps around theta (hand-computed):
    d f / d theta = -(theta / eps) * sum K((h - theta) / eps) g, d H / d theta = -(1 / eps) * sum K g."""
    from sc_steer.sae.jumprelu import _JumpReLU, _Step

    h = torch.tensor([[1.8], [2.6], [2.3]], requires_grad=True)   # (h - theta) / eps = -0.2, 0.6, 0.3
    theta = torch.tensor([2.0], requires_grad=True)
    g = torch.tensor([[1.0], [1.0], [2.0]])
    f = _JumpReLU.apply(h, theta, 1.0)
    assert f.detach().flatten().tolist() == pytest.approx([0.0, 2.6, 2.3])
    f.backward(g)
    assert theta.grad.item() == pytest.approx(-2.0 * (1.0 + 2.0))   # kernel covers rows 0 and 2
    assert h.grad.flatten().tolist() == pytest.approx([0.0, 1.0, 2.0])
    theta.grad = None
    _Step.apply(h.detach(), theta, 1.0).backward(g)
    assert theta.grad.item() == pytest.approx(-1.0 * (1.0 + 2.0))


def two_token_case(arch: str, k: int = 1):
    """The worked example of the two tests below: decoder rows e1, e2, (e1+e2)/sqrt2, (e1-e2)/sqrt2, tied
    encoder, zero biases, k = 1 (unless given), and x = [[2, 1], [0, -1]]."""
    r = 2 ** -0.5
    sae = make_sae(SAEConfig(arch, 2, 4, k=k))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [r, r], [r, -r]]))
        sae.W_enc.copy_(sae.W_dec.T)
        for p in (sae.b_enc, sae.b_dec):
            p.zero_()
    return sae, torch.tensor([[2.0, 1.0], [0.0, -1.0]])


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("path", ["torch", "autograd"])
def test_auxk_by_hand(arch, path, monkeypatch):
    """A two-token example worked on paper: decoder rows e1, e2, (e1+e2)/sqrt2, (e1-e2)/sqrt2 (tied
    encoder, zero biases), k = 1, latents 2 and 3 dead, k_aux = 1, x = [[2, 1], [0, -1]].
    Top-1: latent 2 (3/sqrt2) on the first token, latent 3 (1/sqrt2) on the second, so x_hat =
    [[1.5, 1.5], [0.5, -0.5]] and the residual e = [[0.5, -0.5], [-0.5, -0.5]]; the variance about the
    batch mean is 4, so FVU = 1/4. AuxK picks the same dead latents: e_hat = x_hat (no b_dec), error
    [[1, 2], [1, 0]], squared 6; e about its mean [0, -0.5] is [[0.5, 0], [-0.5, 0]], energy 1/2, so
    AuxK = 12 and loss = 1/4 + aux_coeff * 12.
    BatchTopK keeps the two largest of the batch instead, both on the first token (3/sqrt2 and 2):
    x_hat = [[3.5, 1.5], [0, 0]], e = [[-1.5, -0.5], [0, -1]], FVU = 3.5/4; AuxK's e_hat is the same as
    above, error [[3, 2], [0.5, 0.5]], squared 13.5; e about its mean has energy 1.25, AuxK = 10.8."""
    monkeypatch.setenv("SC_STEER_KERNELS", path)
    sae, x = two_token_case(arch)
    dead = torch.tensor([False, False, True, True])
    inputs = StepInputs(aux_coeff=1 / 32, k_aux=1, dead=dead, n_dead=2)
    out = sae.train_forward(x, inputs)
    x_hat, fvu, auxk = {"topk": ([[1.5, 1.5], [0.5, -0.5]], 0.25, 12.0),
                        "batchtopk": ([[3.5, 1.5], [0.0, 0.0]], 0.875, 10.8)}[arch]
    torch.testing.assert_close(out.x_hat, torch.tensor(x_hat))
    torch.testing.assert_close(out.aux, torch.tensor([[1.5, 1.5], [0.5, -0.5]]))
    loss, parts = sae.loss(x, out, inputs)
    assert abs(float(parts["fvu"]) - fvu) < 1e-6 and abs(float(parts["auxk"]) - auxk) < 1e-5
    assert abs(float(loss) - (fvu + auxk / 32)) < 1e-5


def test_batchtopk_l1_by_hand():
    """The same two tokens as ``test_auxk_by_hand``, BatchTopK without AuxK and batchtopk_l1 = 0.1: the kept
    activations 3/sqrt2 and 2 sum to 4.1213 over 2 tokens, mean 2.0607; the inputs' energy about their
    mean is 4, RMS norm sqrt(4 / 2); L1 term 2.0607 / sqrt2 = 1.4571, halved at sparsity_scale 0.5.
    Its gradient reaches the two kept pre-activations only, 0.1 * 0.5 / (2 sqrt2) each. The divisor has
    sqrt(k): at k = 4 every positive activation is kept, 2 + 1 + 3/sqrt2 + 1/sqrt2 on the first token and
    1/sqrt2 on the second, mean 3.2678, and the term is 3.2678 / (sqrt2 * 2) = 1.1554."""
    r = 2 ** -0.5
    sae, x = two_token_case("batchtopk")
    grads = []
    for coeff in (0.1, 0.0):
        inputs = StepInputs(aux_coeff=0.0, batchtopk_l1=coeff, sparsity_scale=0.5)
        out = sae.train_forward(x, inputs)
        out.pre.retain_grad()
        loss, parts = sae.loss(x, out, inputs)
        loss.backward()
        grads.append(out.pre.grad)
        if coeff:
            l1 = (3 * r + 2) / 2 / 2 ** 0.5
            assert abs(float(parts["l1"]) - l1) < 1e-5 and abs(float(loss) - (0.875 + 0.05 * l1)) < 1e-5
        else:
            assert "l1" not in parts and abs(float(loss) - 0.875) < 1e-6
    g = torch.zeros(2, 4)
    g[0, 0] = g[0, 2] = 0.05 / (2 * 2 ** 0.5)
    sae4, _ = two_token_case("batchtopk", k=4)
    inputs = StepInputs(aux_coeff=0.0, batchtopk_l1=0.1, sparsity_scale=1.0)
    _, parts = sae4.loss(x, sae4.train_forward(x, inputs), inputs)
    assert abs(float(parts["l1"]) - (3 + 5 * r) / 2 / (2 ** 0.5 * 2)) < 1e-5
    torch.testing.assert_close(grads[0] - grads[1], g)


@pytest.mark.parametrize("grad_size", [1e-3, 1e3])  # below the clip (no scaling) and far above it
def test_clipping_inside_fused_adam_equals_clip_grad_norm(grad_size):
    """``clip_gradients`` hands the clip to fused Adam (its ``grad_scale``) instead of scaling every gradient
    first: the parameters after a few steps equal those of ``clip_grad_norm_`` + the same Adam. Fused Adam
    runs on the CPU too, so this guards the GPU's path here."""
    from sc_steer.sae.optim import clip_gradients

    runs = []
    for fused in (False, True):
        sae, x = make(seed=3)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=fused)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            for i, p in enumerate(sae.parameters()):
                g = torch.Generator().manual_seed(100 * step + i)
                p.grad = torch.randn(p.shape, generator=g) * grad_size * (1.0, 50.0, 0.02)[step]  # Adam is not
                # invariant to a scale that changes between steps: a clip that did nothing would show
            clip_gradients(opt, sae.parameters(), 1.0)
            if not fused:
                assert torch.nn.utils.get_total_norm([p.grad for p in sae.parameters()]) <= 1.0 + 1e-5
            opt.step()
        runs.append([p.detach().clone() for p in sae.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
