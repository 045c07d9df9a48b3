"""The whole pipeline on a CUDA GPU, against the same steps on the CPU (run with `python -m pytest -m gpu`).

collect -> train -> eval -> interpret -> graph -> steer -> the playground's /steer, on the demo model,
each compared with the CPU result within float tolerance (fp32, TF32 off), plus a bf16 model with
fp32 SAEs and the CLI with --device cuda. Skipped where there is no CUDA device.

``SC_STEER_GPU_TESTS_DEVICE=cpu python -m pytest -m gpu`` dry-runs the same checks with the CPU in the
GPU's place (to try them before a GPU machine is lent).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

CUDA = os.environ.get("SC_STEER_GPU_TESTS_DEVICE", "cuda")
BF16 = "bfloat16" if CUDA.startswith("cuda") else "float32"  # bf16 matmuls crawl on a CPU (the dry run)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TRAIN = {"sites": ["resid_post.*"], "batch_size": 2048, "tokens": 40_960, "checkpoint_every": 1000,
         "sae": {"architecture": "topk", "expansion": 4, "k": 16, "lr": 2e-3}}


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def models():
    from sc_steer import open_model

    return {"cpu": open_model("demo"), "cuda": open_model("demo", device=CUDA)}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """The same small demo run, collected and trained on each device."""
    from sc_steer.activations import collect
    from sc_steer.pipeline import train_from_store
    from sc_steer.sae.config import config_from_dict

    out = {}
    for dev, lm in models.items():
        run = tmp_path_factory.mktemp(f"run_{dev}")
        collect(lm, "resid_post.*", "demo", run / "activations", ctx=128, max_tokens=20_000, progress=False)
        saes = train_from_store(run / "activations", config_from_dict(TRAIN), run, device=lm.device, progress=False)
        out[dev] = {"run": run, "saes": saes}
    return out


def test_collection_on_cuda_matches_cpu(runs):
    from sc_steer.store import ActivationStore

    a, b = (ActivationStore(runs[d]["run"] / "activations") for d in ("cpu", "cuda"))
    assert a.manifest["n_tokens"] == b.manifest["n_tokens"]
    for site in a.sites:
        x, y = a.load(site), b.load(site)
        assert (x - y).norm() / x.norm() < 1e-4, site


def test_training_on_cuda_returns_saes_on_cuda_that_match_cpu_quality(runs, models):
    from sc_steer import train_sae
    from sc_steer.evaluate import evaluate_saes

    dev = torch.device(CUDA).type
    for sae in runs["cuda"]["saes"].values():
        assert sae.W_enc.device.type == dev
    x = torch.randn(4096, 64)
    assert train_sae(x, "topk", d_sae=128, k=8, tokens=8192, device=CUDA).W_dec.device.type == dev
    ev = {d: evaluate_saes(models["cpu"], runs[d]["saes"], "demo:heldout", ctx=128, max_tokens=4000, progress=False)
          for d in ("cpu", "cuda")}
    for site, r in ev["cpu"].items():
        assert abs(ev["cuda"][site]["fvu"] - r["fvu"]) < 0.05, (site, ev["cuda"][site]["fvu"], r["fvu"])


def test_eval_on_cuda_matches_cpu(runs, models):
    from sc_steer.pipeline import eval_run

    run = runs["cpu"]["run"]
    cpu = eval_run(run, "demo:heldout", lm=models["cpu"], max_tokens=4000, progress=False)
    gpu = eval_run(run, "demo:heldout", lm=models["cuda"], max_tokens=4000, progress=False)
    for site, r in cpu.items():
        for key in ("l0", "fvu", "ce_clean", "ce_spliced", "ce_zero", "kl"):
            assert gpu[site][key] == pytest.approx(r[key], rel=2e-3, abs=2e-4), (site, key)


def test_interpret_on_cuda_matches_cpu(runs, models, tmp_path):
    import shutil

    from sc_steer.pipeline import interpret_run

    recs = {}
    for dev in ("cpu", "cuda"):
        run = tmp_path / dev
        shutil.copytree(runs["cpu"]["run"], run, ignore=shutil.ignore_patterns("activations"))
        interpret_run(run, "demo:heldout", lm=models[dev], max_tokens=6000, sites=["resid_post.1"], progress=False)
        recs[dev] = [json.loads(line) for line in (run / "features" / "resid_post.1.jsonl").read_text().splitlines()]
    assert len(recs["cpu"]) == len(recs["cuda"])
    agree = 0
    for a, b in zip(recs["cpu"], recs["cuda"]):
        assert abs(a["density"] - b["density"]) < 2e-3
        assert a["max_act"] == pytest.approx(b["max_act"], rel=1e-3, abs=1e-4)
        agree += [t["id"] for t in a["top_tokens"][:3]] == [t["id"] for t in b["top_tokens"][:3]]
    assert agree >= 0.95 * len(recs["cpu"])


def test_graph_on_cuda_matches_cpu(runs, models, tmp_path):
    from safetensors.torch import load_file

    from sc_steer.graph.export import FORMATS
    from sc_steer.pipeline import graph_run

    formats = tuple(f for f in FORMATS if f != "dot") if _missing("pydot") else FORMATS
    eff = {}
    for dev in ("cpu", "cuda"):
        graph_run(runs["cpu"]["run"], "demo:heldout", tmp_path / dev, lm=models[dev], layers=[1], sources="top:6",
                  max_prompts=8, formats=formats, progress=False)
        eff[dev] = load_file(str(tmp_path / dev / "effects_L1.safetensors"))
    assert torch.equal(eff["cpu"]["sources"], eff["cuda"]["sources"])
    for key in ("effect", "skip", "pre_delta"):
        diff = (eff["cuda"][key] - eff["cpu"][key]).abs()
        # A TopK boundary flip (two pre-activations within rounding of each other) at one position moves
        # one mean by about value / positions; anything beyond a handful of those is a real difference.
        assert (diff > 2e-4 + 1e-3 * eff["cpu"][key].abs()).float().mean() < 1e-3, key
        assert diff.max() < 0.05, key


def test_prompt_graph_on_cuda_matches_cpu(runs, models, tmp_path):
    """The per-prompt graph's nodes and every edge on CUDA against the CPU, from the same SAEs. A TopK
    boundary flip (two pre-activations within rounding) can swap a node; edges are compared on the
    nodes both have."""
    from sc_steer.graph.prompt_measure import measure_prompt
    from sc_steer.rundir import load_run_saes

    prompt = "And the children of Israel did evil in the sight of the"
    pe = {dev: measure_prompt(models[dev], load_run_saes(runs["cpu"]["run"], device=models[dev].device), prompt)
          for dev in ("cpu", "cuda")}
    cpu, gpu = pe["cpu"], pe["cuda"]
    assert torch.equal(cpu.logit_ids, gpu.logit_ids)
    common = {}
    for n in cpu.layers:
        a = {tuple(x): i for i, x in enumerate(cpu.nodes[n].tolist())}
        b = {tuple(x): i for i, x in enumerate(gpu.nodes[n].tolist())}
        both = sorted(set(a) & set(b))
        assert len(both) >= 0.99 * max(len(a), len(b)), n
        common[n] = (torch.tensor([a[k] for k in both]), torch.tensor([b[k] for k in both]))
    pairs = [(cpu.edges[n][common[n][0]][:, common[n + 1][0]], gpu.edges[n][common[n][1]][:, common[n + 1][1]])
             for n in cpu.layers[:-1]]
    top = cpu.layers[-1]
    pairs.append((cpu.logit_edges[common[top][0]], gpu.logit_edges[common[top][1]]))
    pairs.append((cpu.embed_edges[:, common[0][0]], gpu.embed_edges[:, common[0][1]]))
    for c, g in pairs:
        diff = (g - c).abs()
        assert (diff > 1e-3 + 1e-3 * c.abs()).float().mean() < 1e-3 and diff.max() < 0.1


def test_steering_on_cuda_matches_cpu_and_runs_in_bf16(runs, models):
    from sc_steer import open_model
    from sc_steer.steer import Intervention, Recipe, generate

    saes = runs["cpu"]["saes"]
    prompts = ["HAMLET.\nTo be, or not", "Ge1:1 In the beginning"]
    add = Recipe([Intervention("resid_post.1", 7, "add", 12.0)])
    out = {d: generate(models[d], prompts, add, saes, max_new_tokens=16) for d in ("cpu", "cuda")}
    assert out["cuda"] == out["cpu"]
    # remove/clamp encode with a TopK SAE: a boundary flip could change a token, so these check behaviour
    edit = Recipe([Intervention("resid_post.2", 3, "remove"), Intervention("resid_post.1", 5, "clamp", 6.0)])
    base = generate(models["cuda"], prompts, None, saes, max_new_tokens=16)
    assert generate(models["cuda"], prompts, edit, saes, max_new_tokens=16) != base
    lm16 = open_model("demo", device=CUDA, dtype=BF16)
    for recipe in (add, edit):
        assert all(t.strip() for t in generate(lm16, prompts, recipe, saes, max_new_tokens=16))


def test_playground_steer_on_cuda(runs, models):
    from sc_steer.steer import Intervention, Recipe, generate
    from sc_steer_apps.serving import Playground

    pg = Playground(runs["cpu"]["run"], device=CUDA)
    assert all(s.W_enc.device.type == torch.device(CUDA).type for s in pg.saes.values())
    recipe = Recipe([Intervention("resid_post.1", 7, "add", 12.0)])
    base, steered = pg.steer("HAMLET.\nTo be, or not", recipe, 20, False, 1.0, 0)
    assert steered == generate(models["cuda"], ["HAMLET.\nTo be, or not"], recipe, pg.saes, max_new_tokens=20)[0]
    assert steered != base
    assert pg.heatmap("HAMLET.\nTo be, or not", "resid_post.1", 7)


def test_steering_scores_and_steerability_on_cuda_match_cpu(runs, models):
    """steer-eval's table and the output scores on the GPU, against the CPU, with the same SAEs (greedy:
    the same tokens)."""
    import copy

    from sc_steer.steer import output_scores, steer_eval

    got = {}
    for dev, lm in models.items():
        saes = copy.deepcopy(runs["cpu"]["saes"])
        res = steer_eval(lm, saes, [("resid_post.1", 7), ("resid_post.2", 3)], ["In the beginning", "HAMLET.\nTo be"],
                         coeffs=[4.0, 12.0], max_new_tokens=8, seeds=(), vector_tokens=5000, progress=False)
        got[dev] = (res["table"], output_scores(lm, saes["resid_post.1"], "resid_post.1", ["In the beginning"],
                                                features=list(range(64)), progress=False)["scores"])
    for a, b in zip(got["cpu"][0], got["cuda"][0]):
        assert (a["method"], a["coeff"]) == (b["method"], b["coeff"])
        for k in ("concept", "logprob", "kl", "C", "F"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), (a["method"], a["coeff"], k)
    assert got["cpu"][1] == pytest.approx(got["cuda"][1], rel=1e-3, abs=1e-5)


def test_cli_on_cuda(runs, tmp_path):
    """The commands as users type them, with --device cuda (and the demo in bf16)."""
    cli = [sys.executable, "-m", "sc_steer.cli"]
    run = str(runs["cpu"]["run"])
    steps = [["eval", "--run", run, "--device", CUDA, "--max-tokens", "2000"],
             ["steer", "--run", run, "--device", CUDA, "--prompt", "In the beginning", "--add", "resid_post.1:7:12"],
             ["demo", "--out", str(tmp_path / "demo"), "--device", CUDA, "--dtype", BF16,
              "--train-tokens", "16384", "--eval-tokens", "1024", "--interpret-tokens", "2048"]]
    for args in steps:
        r = subprocess.run(cli + args, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (args, r.stderr[-3000:])
    ev = json.loads((tmp_path / "demo" / "eval.json").read_text())["sites"]
    assert all(0 < v["fvu"] < 1 for v in ev.values())
    if not CUDA.startswith("cuda"):
        return
    n = torch.cuda.device_count()
    bad = subprocess.run(cli + ["eval", "--run", run, "--device", f"cuda:{n}"], capture_output=True, text=True)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert bad.returncode == 2 and len(lines) == 1 and f"this machine has {n} CUDA device" in lines[0], bad.stderr


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_collection_on_cuda_equals_forward_hooks_bitwise(models, tmp_path):
    """The asynchronous path (pinned shard buffers, copies that do not wait, the tokenizer on a thread)
    stores exactly what plain forward hooks on the same device see, in fp32, over several shards."""
    from helpers import hook_activations

    from sc_steer.activations import collect
    from sc_steer.store import ActivationStore
    from sc_steer.data import iter_batches, iter_documents, iter_rows, pad_token_id

    lm = models["cuda"]
    sites = lm.sites("resid_post.*")
    collect(lm, sites, "demo:heldout", tmp_path / "acts", ctx=64, batch_size=8, max_tokens=3000, shard_tokens=700,
            progress=False)
    store = ActivationStore(tmp_path / "acts")
    assert len(store.shards) > 2
    expected = {str(s): [] for s in sites}
    for b in iter_batches(iter_rows(iter_documents("demo:heldout"), lm.tokenizer, 64), 8, 64,
                          pad_token_id(lm.tokenizer)):
        ref = hook_activations(lm.hf, {str(s): lm.module(s) for s in sites}, b.input_ids.to(lm.device),
                               b.attention_mask.to(lm.device))
        for s in expected:
            expected[s].append(ref[s][b.keep.to(lm.device)].cpu())
        if sum(len(e) for e in expected[str(sites[0])]) >= store.n_tokens:
            break
    for s in expected:
        want = torch.cat(expected[s])
        assert torch.equal(store.load(s), want), s
        assert abs(store.mean_norm(s) - float(want.double().norm(dim=-1).mean())) < 1e-9 * store.mean_norm(s), s
