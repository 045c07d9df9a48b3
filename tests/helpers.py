"""Helpers shared by the tests."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def sc_steer_exe() -> str:
    """The installed `sc-steer` console script of this interpreter's environment (as users call it)."""
    exe = Path(sys.executable).parent / "sc-steer"
    return str(exe) if exe.exists() else shutil.which("sc-steer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Until ``url`` answers 200; fails early (with the server's output) if the server exits."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def serve_app(args: list[str], cwd: Path, command: str | None = None):
    """Start `sc-steer app ARGS --port P` (or the shell ``command`` plus ``--port P``) as a subprocess,
    wait until it serves HTTP on 127.0.0.1, yield its URL, then stop it."""
    port = free_port()
    log = Path(cwd) / f"app-{port}.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with log.open("w") as out:
        if command is None:
            cmd = [sc_steer_exe(), "app", *args, "--port", str(port)]
        else:
            cmd = ["bash", "-c", f"{command} --port {port}"]
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_for_http(url, proc, log)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def reference_loss(p: dict, x: torch.Tensor, k: int, dead: torch.Tensor | None, k_aux: int, aux_coeff: float,
                   batch_topk: bool = False, idx: torch.Tensor | None = None, aux_idx: torch.Tensor | None = None):
    """TopK / BatchTopK loss with AuxK, dense and plain: every product is a full matmul. ``idx`` /
    ``aux_idx`` fix which latents are selected (so a bf16 step can be checked without depending on how
    near-ties among bf16 pre-activations fall)."""
    pre = x @ p["W_enc"] + (p["b_enc"] - p["b_dec"] @ p["W_enc"])  # the formula of SAE.pre_acts
    if batch_topk:
        flat = pre.relu().flatten()
        i = flat.topk(k * x.shape[0]).indices if idx is None else idx
        f = torch.zeros_like(flat).scatter(0, i, flat[i]).view_as(pre)
    else:
        i = pre.topk(k, dim=-1).indices if idx is None else idx
        f = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i).relu())
    x_hat = (f @ p["W_dec"] + p["b_dec"]).float()
    var = (x - x.mean(0)).pow(2).sum()
    loss = (x_hat - x).pow(2).sum() / var
    if dead is not None:
        masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
        i = masked.topk(min(k_aux, int(dead.sum())), dim=-1).indices if aux_idx is None else aux_idx
        f_aux = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i).relu() * dead[i])
        e_hat = (f_aux @ p["W_dec"]).float()
        e = (x - x_hat).detach()
        loss = loss + aux_coeff * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss


def sparse_path_indices(sae, x, k: int, dead, k_aux: int, batch_topk: bool = False):
    """The latents a TopK (or BatchTopK: flat indices) step selects under bf16 autocast, where the
    pre-activations are bf16, rounded once with the bias added in the GEMM (on every path)."""
    from sc_steer.sae.sparse import low_precision_pre_acts
    from sc_steer.sae.topk import dead_topk

    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        pre, _ = low_precision_pre_acts(x, sae.W_enc, sae.b_enc, sae.b_dec)
        assert torch.equal(pre, sae.pre_acts(x))  # the dense path rounds the same way
    if batch_topk:
        idx = pre.relu().flatten().topk(k * x.shape[0]).indices
    else:
        idx = pre.topk(k, dim=-1, sorted=False).indices
    aux = dead_topk(pre, dead, min(k_aux, int(dead.sum()))) if dead is not None and dead.any() else None
    return idx, aux


def hook_activations(hf, modules, input_ids, attention_mask, inputs_of=()):
    """Independent reference: forward hooks on the given modules during a plain forward (for names in
    ``inputs_of``, the module's input instead of its output)."""
    got, handles = {}, []
    for name, mod in modules.items():
        def hook(_m, inp, out, name=name):
            val = inp if name in inputs_of else out
            got[name] = (val[0] if isinstance(val, tuple) else val).detach().clone()
        handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        hf(input_ids=input_ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    return got
