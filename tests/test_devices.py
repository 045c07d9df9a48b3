"""The device contract, checked on a machine without a GPU: SAEs follow the model they are used with.

The bug this guards against: SAEs loaded on one device, the model on another (CPU vs CUDA), and
`x @ W_enc` failing deep inside torch. A CPU-only torch has a second real device to reproduce it
with: the lazy tensor device (TorchScript backend), on which a CPU tensor and a lazy tensor cannot
meet in one op. Every function that takes a model and SAEs gets SAEs parked on that device and a
model on the CPU, and must give exactly what it gives with SAEs on the CPU.

Also: a bf16 model with fp32 SAEs (the SAE computes in fp32, the model gets its own dtype back),
and the one-line errors for devices and dtypes this machine does not have.
"""
import copy
import importlib
import inspect
import json
import pkgutil
import subprocess

import pytest
import torch
from helpers import firing_sae, sc_steer_exe

import sc_steer
from sc_steer import ScSteerError, open_model
from sc_steer.cli import main
from sc_steer.data import iter_batches, iter_rows, pad_token_id
from sc_steer.devices import follow_model, resolve_device, resolve_dtype
from sc_steer.evaluate import evaluate_saes
from sc_steer.graph.attribution import attribution
from sc_steer.graph.experiments import Ablation, ablation_experiment
from sc_steer.graph.faithfulness import attach_scores, circuit_scores, faithfulness_curve
from sc_steer.graph.prompt_measure import measure_prompt
from sc_steer.graph.prompt_run import prompt_feature_graph
from sc_steer.graph.measure import measure_pair, source_means
from sc_steer.graph.naive import naive_effects
from sc_steer.graph.run import choose_sources, feature_graph
from sc_steer.interpret import interpret
from sc_steer.interpret.probe import sparse_probe, unit_means
from sc_steer.steer import (
    Intervention,
    Recipe,
    decompose,
    generate,
    generate_ids,
    measure_effects,
)
from sc_steer.steer.compare import steer_eval
from sc_steer.steer.generate import generate_batch, left_pad
from sc_steer.steer.methods import feature_facts
from sc_steer.steer.scores import Concept, score_concepts, score_continuations
from sc_steer.steer.steerability import output_scores

TEXT = "In the beginning God created the heaven and the earth. To be, or not to be: 1 2 3 4 5. " * 6
PROMPTS = ["In the beginning God created", "To be, or not to be: that is"]


@pytest.fixture(scope="module")
def elsewhere():
    """Returns a function that puts copies of SAEs on the lazy device (a device other than the model's).

    Only on machines without CUDA: where CUDA is present, torch's lazy backend computes on the GPU and
    is no longer a clean second device; tests/test_gpu.py checks the real CPU/GPU pairing there."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: tests/test_gpu.py checks the model/SAE device pairing for real")
    from torch._lazy import ts_backend

    ts_backend.init()

    def park(saes: dict) -> dict:
        out = {k: copy.deepcopy(v).to("lazy") for k, v in saes.items()}
        assert all(s.W_enc.device.type == "lazy" for s in out.values())
        return out

    return park


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    lm = open_model(str(tiny_model_dirs["llama"]))
    saes = {f"resid_post.{i}": firing_sae(seed=20 + i) for i in range(3)}
    text = tmp_path_factory.mktemp("dev") / "t.txt"
    text.write_text(TEXT)
    batches = list(iter_batches(iter_rows([TEXT[:200], TEXT[200:400]], lm.tokenizer, 32), 2, 32,
                                pad_token_id(lm.tokenizer)))
    return lm, saes, str(text), batches


def test_lazy_sae_really_is_on_another_device(setup, elsewhere):
    """The premise: without follow_model, the crash the GPU users saw happens here too."""
    lm, saes, _, _ = setup
    parked = elsewhere(saes)["resid_post.1"]
    with pytest.raises(RuntimeError, match="lazy"):
        parked.encode(torch.randn(3, 32))
    follow_model(parked, lm)
    torch.testing.assert_close(parked.encode(torch.randn(3, 32, generator=torch.Generator().manual_seed(0))),
                               saes["resid_post.1"].encode(torch.randn(3, 32, generator=torch.Generator().manual_seed(0))))


def _calls(lm, text, batches, tmp_path, saes):
    """name -> a call taking SAEs (dict) and returning something comparable (``saes``, on the CPU, choose
    features that the steering methods can be built for)."""
    rec = Recipe([Intervention("resid_post.1", 3, "add", 6.0), Intervention("resid_post.2", 5, "remove")])
    rows = [[lm.tokenizer.bos_token_id] + lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    cont = torch.tensor([[5, 9, 11, 2], [7, 7, 8, 9]])
    candidates = [("resid_post.1", i) for i in range(saes["resid_post.1"].cfg.d_sae)]
    usable = [(f.site, f.feature) for f in feature_facts(lm, saes, candidates, text, max_tokens=400, ctx=32,
                                                            progress=False)[0]][:2]
    assert usable
    return {
        "evaluate_saes": lambda s: {k: {m: v[m] for m in ("l0", "fvu", "ce_spliced", "kl")}
                                    for k, v in evaluate_saes(lm, s, text, ctx=32, max_tokens=200,
                                                              progress=False).items()},
        "interpret": lambda s: interpret(lm, s, text, tmp_path / f"i{id(s)}", ctx=32, top_n=5, min_count=1,
                                         neurons=False, progress=False)["sets"],
        "source_means": lambda s: source_means(lm, 0, s["resid_post.0"], batches),
        "measure_pair": lambda s: measure_pair(lm, 0, s["resid_post.0"], s["resid_post.1"], batches,
                                               [1, 2, 3, 4]).effect,
        "attribution": lambda s: attribution(lm, 0, s["resid_post.0"], s["resid_post.1"], batches,
                                             torch.tensor([1, 2, 3]), torch.tensor([0, 5])),
        "choose_sources": lambda s: choose_sources(lm, 0, s["resid_post.0"], s["resid_post.1"], batches, "attr:3"),
        "feature_graph": lambda s: sorted((u, v, d["weight"], d.get("attribution", 0.0)) for u, v, d in feature_graph(
            lm, s, text, tmp_path / f"g{id(s)}", layers=[0, 1], sources=[1, 2, 3], ctx=32, formats=("json",),
            progress=False)[0].edges(data=True)),
        "naive_effects": lambda s: naive_effects(lm, 0, s["resid_post.0"], s["resid_post.1"], batches, [2])[2][0],
        "ablation_experiment": lambda s: ablation_experiment(lm, s, PROMPTS, [Ablation(1, 3)],
                                                             targets=[(2, 5)])["targets"],
        "generate": lambda s: generate(lm, PROMPTS, rec, s, max_new_tokens=6),
        "generate_ids": lambda s: generate_ids(lm, PROMPTS, rec, s, max_new_tokens=6)[0],
        "measure_effects": lambda s: measure_effects(lm, PROMPTS[:1], rec, s, max_new_tokens=4,
                                                     watch=[("resid_post.2", 5)])["prompts"][0]["kl_per_step"],
        "unit_means": lambda s: unit_means(lm, s, PROMPTS, ctx=16, progress=False),
        "sparse_probe": lambda s: sparse_probe(lm, s, [(p, str(i % 2)) for i, p in enumerate(PROMPTS * 4)], ctx=16,
                                               progress=False),
        "decompose": lambda s: decompose(torch.randn(32, generator=torch.Generator().manual_seed(1)),
                                         s["resid_post.1"]),
        "circuit_scores": lambda s: circuit_scores(lm, s, batches, {0: [1, 2], 1: [3, 4]}),
        "faithfulness_curve": lambda s: faithfulness_curve(lm, s, batches, {1.0: _two_node_graph()}),
        "measure_prompt": lambda s: (lambda pe: (pe.edges, pe.logit_edges, pe.embed_edges))(
            measure_prompt(lm, s, PROMPTS[0])),
        "prompt_feature_graph": lambda s: sorted((u, v, d["weight"]) for u, v, d in prompt_feature_graph(
            lm, s, PROMPTS[0], tmp_path / f"p{id(s)}", formats=("json",), progress=False)[0].edges(data=True)),
        "attach_scores": lambda s: (lambda g: (attach_scores(lm, s, batches, g), g.graph)[1])(_two_node_graph()),
        "generate_batch": lambda s: generate_batch(lm, left_pad(lm, rows), rec, s, max_new_tokens=5)[0],
        "score_continuations": lambda s: score_continuations(
            lm, s, Concept.of_feature(lm, s, "resid_post.1", 3), rows, cont, items=rec.interventions),
        "score_concepts": lambda s: score_concepts(
            lm, s, [Concept.of_feature(lm, s, "resid_post.1", 3), Concept.of_feature(lm, s, "resid_post.2", 5)], rows,
            cont, items=rec.interventions),
        "output_scores": lambda s: output_scores(lm, s["resid_post.1"], "resid_post.1", PROMPTS, features=[1, 2, 3],
                                                 progress=False)["scores"],
        "feature_facts": lambda s: [(f.peak, f.on_topic, f.mean_diff, f.actadd, f.top_window) for f in feature_facts(
            lm, s, usable, text, max_tokens=400, ctx=32, progress=False)[0]],
        "steer_eval": lambda s: steer_eval(lm, s, usable[:1], PROMPTS, methods=("add", "actadd"), coeffs=[3.0],
                                           max_new_tokens=3, seeds=(), vector_data=text, vector_tokens=400,
                                           progress=False)["table"],
    }


def _two_node_graph():
    import networkx as nx

    g = nx.DiGraph()
    g.add_node("L0/F1", layer=0, feature=1)
    g.add_node("L1/F3", layer=1, feature=3)
    g.add_edge("L0/F1", "L1/F3", weight=0.5)
    return g


def _same(a, b):
    if torch.is_tensor(a):
        torch.testing.assert_close(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    else:
        assert a == b


def test_every_function_taking_a_model_and_saes_moves_them_to_the_model(setup, elsewhere, tmp_path):
    lm, saes, text, batches = setup
    for name, call in _calls(lm, text, batches, tmp_path, saes).items():
        want = call(saes)
        parked = elsewhere(saes)
        got = call(parked)
        _same(want, got)


# functions with a model and an SAE argument that never compute with both: shape checks, or directions
# taken to the CPU for the logit lens
EXEMPT = {"check_pair", "check_sae_fits", "_check", "unit_sets", "unit_directions", "unit_records", "follow_model",
          "_one", "teacher_forced", "_metric_values", "check_model", "_block_edges",
          "_logit_edges"}  # only called by functions that move the SAEs first


def test_the_contract_test_covers_every_such_function(setup, tmp_path):
    """A new public function taking ``lm`` and SAEs must be added to the contract test above."""
    lm, saes, text, batches = setup
    covered = set(_calls(lm, text, batches, tmp_path, saes)) - {"decompose"}  # takes a vector and an SAE, no model
    found = set()
    for m in pkgutil.walk_packages(sc_steer.__path__, "sc_steer."):
        if m.name.startswith("sc_steer.demo"):
            continue
        mod = importlib.import_module(m.name)
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            params = list(inspect.signature(fn).parameters)
            if fn.__module__ == m.name and "lm" in params and any(p.startswith(("sae", "next_sae")) for p in params):
                found.add(name)
    assert found - EXEMPT == covered, (found - EXEMPT) ^ covered


def test_playground_state_loads_saes_on_the_model_device(setup, tiny_model_dirs, tmp_path):
    from sc_steer_apps.serving import Playground

    _, saes, _, _ = setup
    saes["resid_post.1"].save(tmp_path / "saes" / "resid_post.1")
    (tmp_path / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    pg = Playground(tmp_path)
    assert pg.saes["resid_post.1"].W_enc.device == pg.lm.device
    assert pg.heatmap("In the beginning", "resid_post.1", 3)


# -- dtypes ---------------------------------------------------------------------------------------
def test_fp32_saes_on_a_bf16_model(setup, tiny_model_dirs):
    """The SAE computes in fp32 and hands the model back its own dtype; results track the fp32 model."""
    lm32, saes, text, batches = setup
    lm16 = open_model(str(tiny_model_dirs["llama"]), dtype="bfloat16")
    assert lm16.dtype == torch.bfloat16 and saes["resid_post.1"].W_enc.dtype == torch.float32
    e32 = evaluate_saes(lm32, saes, text, ctx=32, max_tokens=200, progress=False)
    e16 = evaluate_saes(lm16, saes, text, ctx=32, max_tokens=200, progress=False)
    for s in e32:
        assert e16[s]["fvu"] == pytest.approx(e32[s]["fvu"], rel=0.05, abs=0.01)
        assert e16[s]["ce_spliced"] == pytest.approx(e32[s]["ce_spliced"], rel=0.02)
    rec = Recipe([Intervention("resid_post.1", 3, "add", 6.0), Intervention("resid_post.1", 7, "clamp", 1.0)])
    out = generate(lm16, PROMPTS, rec, saes, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    eff = measure_pair(lm16, 0, saes["resid_post.0"], saes["resid_post.1"], batches, [1, 2, 3])
    ref = measure_pair(lm32, 0, saes["resid_post.0"], saes["resid_post.1"], batches, [1, 2, 3])
    assert torch.isfinite(eff.effect).all()
    assert (eff.effect - ref.effect).abs().max() <= 0.05 * ref.effect.abs().max() + 1e-3


def test_an_sae_file_in_half_precision_loads_as_fp32(tmp_path):
    from safetensors.torch import load_file, save_file

    from sc_steer.sae import load_sae

    ref = firing_sae(seed=3)
    ref.save(tmp_path / "s")
    w = tmp_path / "s" / "sae_weights.safetensors"
    save_file({k: v.to(torch.float16) for k, v in load_file(str(w)).items()}, str(w))
    sae = load_sae(tmp_path / "s")
    assert sae.W_enc.dtype == torch.float32
    x = torch.randn(4, 32)
    torch.testing.assert_close(sae.encode(x), ref.encode(x), atol=0.05, rtol=0.01)


# -- errors -----------------------------------------------------------------------------------------
def test_device_and_dtype_errors_name_the_argument():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    with pytest.raises(ScSteerError, match="--device 'gpu0': expected cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(ScSteerError, match="--dtype 'fp8'"):
        resolve_dtype("fp8")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:7"):
            with pytest.raises(ScSteerError, match=f"--device {spec}: CUDA is not available"):
                resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_device_errors_are_one_line(tiny_model_dirs, tmp_path, capsys):
    """Every command that runs a model refuses --device cuda here with one line, before any work."""
    run = tmp_path / "run"
    firing_sae().save(run / "saes" / "resid_post.1")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    commands = [["collect", "--model", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "c")],
                ["eval", "--run", str(run)], ["interpret", "--run", str(run)],
                ["graph", "--run", str(run), "--out", str(tmp_path / "g")],
                ["steer", "--run", str(run), "--prompt", "In the", "--add", "resid_post.1:3:4"],
                ["demo", "--out", str(tmp_path / "d")], ["app", "--run", str(run)],
                ["train", "--activations", str(tmp_path / "c"), "--out", str(tmp_path / "t")],
                ["train", "--model", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "t")]]
    for args in commands:
        device = "cuda:7" if args[0] == "eval" else "cuda"
        if args[0] == "steer":  # one as a user runs it, the installed script in a subprocess
            r = subprocess.run([sc_steer_exe(), *args, "--device", device], capture_output=True, text=True,
                               timeout=300)
            rc, err = r.returncode, r.stderr
        else:
            rc, err = main([*args, "--device", device]), capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip() and "Loading weights" not in ln]
        assert rc == 2 and len(lines) == 1, (args, device, err)
        assert lines[0].startswith(f"error: --device {device}: CUDA is not available"), (args, err)
    assert not any((tmp_path / d).exists() for d in ("c", "d", "g", "t"))


def test_cli_runs_a_bf16_model_with_fp32_sae_files(tiny_model_dirs, tmp_path, capsys):
    """`--dtype bfloat16` against SAE files written in float32: a normal run, not an error."""
    run = tmp_path / "run"
    firing_sae().save(run / "saes" / "resid_post.1")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "--run", str(run), "--data", str(text), "--dtype", "bfloat16", "--max-tokens", "200"]) == 0
    assert main(["steer", "--run", str(run), "--prompt", "In the beginning", "--add", "resid_post.1:3:6",
                 "--dtype", "bfloat16", "--max-new-tokens", "4"]) == 0
    assert "steered" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["sites"]["resid_post.1"]["l0"] > 0
