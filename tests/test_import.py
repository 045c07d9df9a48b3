"""``sc-steer import``: published SAEs (written by SAELens, dictionary_learning and sparsify's own code;
Gemma Scope and Llama Scope laid out as documented) become a run of the tests' tiny Llama, and eval,
interpret, graph and steer run on it through the CLI."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_peer_formats import FIXTURES, gemma_scope, llama_scope

from sc_steer.cli import main
from sc_steer.rundir import load_run_saes
from sc_steer.sae import load_sae

TEXT = "In the beginning God created the heaven and the earth. To be, or not to be: that is the question. " * 12


@pytest.fixture(scope="module")
def imported(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("imp")
    (root / "text.txt").write_text(TEXT)
    peers = root / "peers"
    shutil.copytree(FIXTURES / "sparsify-topk", peers / "sparsify")                  # layers.0 -> resid_post.0
    shutil.copytree(FIXTURES / "saelens-topk", peers / "saelens")                    # blocks.2.hook_resid_pre
    shutil.copytree(FIXTURES / "dictionary_learning-JumpReluAutoEncoder", peers / "dl")   # layer 2
    shutil.copytree(FIXTURES / "saelens-gated", peers / "gated")                      # blocks.1.hook_mlp_out
    gemma, _ = gemma_scope(root / "gemma")                                            # placed by --site
    llama, _, _ = llama_scope(root / "llama", hook_in="blocks.0.hook_mlp_out")        # mlp_out.0
    model = str(tiny_model_dirs["llama"])
    argv = ["import", "--model", model, "--out", str(root / "run"), str(peers / "sparsify"), str(peers / "saelens"),
            str(peers / "dl"), str(peers / "gated"), str(llama), "--site", f"attn_out.2={gemma}"]
    assert main(argv) == 0
    return root, model, peers


def test_every_sae_lands_at_its_site_and_encodes_as_its_writer_did(imported):
    root, _, peers = imported
    info = json.loads((root / "run" / "run.json").read_text())
    assert info["sites"] == ["mlp_out.0", "resid_post.0", "mlp_out.1", "resid_post.1", "attn_out.2", "resid_post.2"]
    assert {s: r["format"] for s, r in info["imported"].items()} == {
        "resid_post.0": "sparsify", "mlp_out.0": "llama_scope", "mlp_out.1": "saelens", "resid_post.1": "saelens",
        "attn_out.2": "gemma_scope", "resid_post.2": "dictionary_learning"}
    assert info["imported"]["resid_post.1"]["hook"] == "blocks.2.hook_resid_pre"
    saes = load_run_saes(root / "run")
    for site, src in (("resid_post.0", peers / "sparsify" / "layers.0"), ("resid_post.1", peers / "saelens"),
                      ("resid_post.2", peers / "dl"), ("mlp_out.1", peers / "gated")):
        ref = load_file(str(src / "reference.safetensors"))
        with torch.no_grad():
            torch.testing.assert_close(saes[site].encode(ref["x"]), ref["f"], rtol=1e-5, atol=1e-5)
        assert saes[site].cfg.site == site


def test_eval_interpret_graph_and_steer_run_on_the_imported_run(imported, capsys):
    root, _, _ = imported
    run, text = str(root / "run"), str(root / "text.txt")
    assert main(["eval", "--run", run, "--data", text, "--max-tokens", "300"]) == 0
    ev = json.loads((root / "run" / "eval.json").read_text())["sites"]
    assert len(ev) == 6 and all(0 <= v["l0"] <= 64 for v in ev.values())
    assert main(["interpret", "--run", run, "--data", text, "--max-tokens", "400", "--min-count", "1"]) == 0
    assert (root / "run" / "features" / "attn_out.2.jsonl").exists()
    assert main(["graph", "--run", run, "--prompts", text, "--out", str(root / "graph"), "--ctx", "32",
                 "--max-prompts", "4", "--sources", "top:4"]) == 0
    graph = json.loads((root / "graph" / "graph.json").read_text())
    assert graph["nodes"]
    capsys.readouterr()
    assert main(["steer", "--run", run, "--prompt", "In the beginning", "--add", "resid_post.1:3:8",
                 "--max-new-tokens", "5"]) == 0
    assert "steered" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("nothing", "holds no SAE"), ("missing", "does not exist"), ("duplicate", "two SAEs for resid_post.2"),
    ("unmapped", "maps to no sc-steer site"), ("no hook", "names no hook point"), ("bad --site", "expected SITE=PATH"),
    ("wide", "d_in=32"), ("other run", "holds another run"), ("no model", "name the model"),
])
def test_bad_imports_get_one_line(imported, tmp_path, case, message, capsys, tiny_model_dirs):
    root, model, peers = imported
    empty = tmp_path / "empty"
    empty.mkdir()
    unmapped = tmp_path / "unmapped"
    shutil.copytree(FIXTURES / "saelens-jumprelu", unmapped)
    cfg = json.loads((unmapped / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_mid"
    (unmapped / "cfg.json").write_text(json.dumps(cfg))
    nohook = tmp_path / "nohook"
    shutil.copytree(FIXTURES / "saelens-jumprelu", nohook)
    cfg["metadata"]["hook_name"] = None
    (nohook / "cfg.json").write_text(json.dumps(cfg))
    base = ["import", "--model", model, "--out", str(tmp_path / "new")]
    argv = {"nothing": base + [str(empty)], "missing": base + [str(tmp_path / "nope")],
            "duplicate": base + [str(peers / "dl"), str(FIXTURES / "saelens-jumprelu")],
            "unmapped": base + [str(unmapped)], "no hook": base + [str(nohook)],
            "bad --site": base + ["--site", "resid_post.1"],
            "wide": ["import", "--model", "demo", "--out", str(tmp_path / "new"), str(peers / "saelens")],
            "other run": ["import", "--model", model, "--out", str(root / "run"), str(peers / "dl")],
            "no model": ["import", "--out", str(tmp_path / "new"), str(peers / "dl")]}[case]
    before = sorted(p.name for p in (root / "run").rglob("*"))
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.strip() and "Loading weights" not in ln and "%|" not in ln]   # progress bars
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (root / "run").rglob("*")) == before


def test_an_imported_sae_saved_by_sc_steer_keeps_its_provenance(imported):
    root, _, _ = imported
    sae = load_sae(root / "run" / "saes" / "mlp_out.0")
    assert sae.cfg.extra["source"]["format"] == "llama_scope" and sae.cfg.architecture == "jumprelu"
    assert Path(json.loads((root / "run" / "run.json").read_text())["imported"]["mlp_out.0"]["path"]).is_dir()
