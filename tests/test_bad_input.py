"""Bad input, everywhere a user can give it: every case must exit 2 (or raise the library's error) with
one `error:` line that names the problem, no traceback, and no file changed in the workspace.

Cases are grouped by where the input comes from: CLI flags per command, config files, run folders,
SAE files, recipes, and the playground's request fields.
"""
import hashlib
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from sc_steer import ScSteerError
from sc_steer.cli import main
from helpers import firing_sae

TEXT = "In the beginning God created the heaven and the earth. To be, or not to be: that is the question. " * 12


@pytest.fixture(scope="module")
def ws(tiny_model_dirs, tmp_path_factory):
    """A workspace: a model, text, a collection, a trained run, config files, recipes, broken folders."""
    root = tmp_path_factory.mktemp("ws")
    model = str(tiny_model_dirs["llama"])
    (root / "good.txt").write_text(TEXT)
    (root / "empty.txt").write_text("")
    (root / "a_file").write_text("not a folder")
    assert main(["collect", "--model", model, "--data", str(root / "good.txt"), "--out", str(root / "acts"),
                 "--ctx", "32"]) == 0
    assert main(["train", "--activations", str(root / "acts"), "--out", str(root / "run"), "--tokens", "256",
                 "--batch-size", "128", "--expansion", "2", "--k", "4"]) == 0
    other = root / "other_run"          # a run folder that is not the one the commands would make
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"model": model, "sites": ["resid_post.0"], "dataset": {"x": 1}}))
    graph = root / "other_graph"
    graph.mkdir()
    (graph / "recipe.json").write_text(json.dumps({"run": "elsewhere", "mode": "zero"}))
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("my own file")
    (root / "existing.json").write_text("{}")
    configs = {
        "layers5.toml": "layers = 5\n", "warmup.toml": 'lr_warmup = "x"\n', "sites5.toml": "sites = 5\n",
        "seed.toml": 'seed = "abc"\n', "dead.toml": "dead_tokens = -5\n", "resample.toml": "resample_tokens = 0\n",
        "resample_flag.toml": '[sae]\nresample = "yes"\n', "btl1.toml": "[sae]\nbatchtopk_l1 = -0.5\n",
        "autocast.toml": 'autocast = "yes"\n',
        "k.toml": '[sae]\nk = "x"\n', "layerk.toml": '[layers."resid_post.0"]\nk = 0\n', "unknown.toml": "foo = 1\n",
        "sae_unknown.toml": "[sae]\nfoo = 1\n", "list.json": "[1, 2]", "broken.toml": "tokens = = 3\n",
        "lrnan.yaml": "sae:\n  lr: .nan\n", "clip.toml": "grad_clip = 0\n", "decay.toml": "lr_decay = 1.5\n",
        "batch.toml": "batch_size = 0\n", "sae_str.toml": 'sae = "topk"\n', "layer_str.toml": 'layers = {a = 3}\n',
        "config.txt": "tokens = 3\n", "emptysites.toml": "sites = []\n",
    }
    for name, text in configs.items():
        (root / name).write_text(text)
    recipes = {
        "r_bool.json": {"interventions": [{"site": "resid_post.1", "feature": True, "mode": "add", "coeff": 1.0}]},
        "r_nan.json": {"interventions": [{"site": "resid_post.1", "feature": 1, "mode": "add", "coeff": math.nan}]},
        "r_big.json": {"interventions": [{"site": "resid_post.1", "feature": 1, "mode": "add", "coeff": 1e300}]},
        "r_mode.json": {"interventions": [{"site": "resid_post.1", "feature": 1, "mode": "boost", "coeff": 1.0}]},
        "r_pos.json": {"interventions": [{"site": "resid_post.1", "feature": 1, "positions": "middle"}]},
        "r_key.json": {"interventions": [{"site": "resid_post.1", "feature": 1, "strength": 2}]},
        "r_site.json": {"interventions": [{"site": "resid_post.9", "feature": 1}]},
        "r_nosae.json": {"interventions": [{"site": "mlp_out.1", "feature": 1}]},
        "r_both.json": {"interventions": [{"site": "resid_post.1", "feature": 1, "vector": [0.0] * 32}]},
        "r_vec.json": {"interventions": [{"site": "resid_post.1", "vector": [0.0] * 7}]},
        "r_vecnan.json": {"interventions": [{"site": "resid_post.1", "vector": [math.inf] * 32}]},
        "r_vecmode.json": {"interventions": [{"site": "resid_post.1", "vector": [0.0] * 32, "mode": "remove"}]},
        "r_feat.json": {"interventions": [{"site": "resid_post.1", "feature": 10_000}]},
        "r_str.json": {"interventions": [{"site": "resid_post.1", "feature": "3"}]},
        "r_coeff_str.json": {"interventions": [{"site": "resid_post.1", "feature": 3, "coeff": "big"}]},
        "r_shape.json": {"interventions": 5},
    }
    for name, obj in recipes.items():
        (root / name).write_text(json.dumps(obj))
    (root / "r_broken.json").write_text("{not json")
    # broken run folders
    for name, info in {"run_badjson": "{", "run_nomodel": "{}", "run_list": "[1]"}.items():
        (root / name / "saes").mkdir(parents=True)
        (root / name / "run.json").write_text(info)
    (root / "run_nosaes").mkdir()
    (root / "run_nosaes" / "run.json").write_text(json.dumps({"model": model}))
    (root / "run_emptysaes" / "saes").mkdir(parents=True)
    (root / "run_emptysaes" / "run.json").write_text(json.dumps({"model": model}))
    wide = root / "run_wide"
    firing_sae(d_in=24).save(wide / "saes" / "resid_post.1")
    (wide / "run.json").write_text(json.dumps({"model": model}))
    nan_run = root / "run_nan"                  # an SAE whose weights are all NaN (a diverged training)
    broken = firing_sae()
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(math.nan)
    broken.save(nan_run / "saes" / "resid_post.1")
    (nan_run / "run.json").write_text(json.dumps({"model": model}))
    (root / "graph_list").mkdir()               # JSON files of the right name and the wrong shape
    (root / "graph_list" / "recipe.json").write_text("[1, 2]")
    (root / "acts_list").mkdir()
    (root / "acts_list" / "manifest.json").write_text("[1, 2]")
    (root / "r_list.json").write_text("[1, 2]")
    (root / "r_items.json").write_text(json.dumps({"interventions": ["resid_post.1"]}))
    (root / "r_nosite.json").write_text(json.dumps({"interventions": [{"feature": 1}]}))
    (root / "r_name.json").write_text(json.dumps({"interventions": [], "name": 5}))
    labels = root / "run_badrecords"            # interpretation records with a line that is not an object
    for i in range(3):
        firing_sae(seed=i).save(labels / "saes" / f"resid_post.{i}")
    (labels / "run.json").write_text(json.dumps({"model": model}))
    (labels / "features").mkdir()
    (labels / "features" / "resid_post.0.jsonl").write_text('{"id": 0}\n[1]\n')
    nan_model = root / "nan_model"              # a checkpoint with a NaN weight
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    hf.save_pretrained(nan_model)
    for f in Path(model).glob("tokenizer*"):
        (nan_model / f.name).write_bytes(f.read_bytes())
    with socket.socket() as taken:              # a port some other program serves on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield {"root": root, "model": model, "taken_port": taken.getsockname()[1]}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def R(ws, *parts):
    return str(ws["root"].joinpath(*parts))


def cli_cases():
    """(id, argv builder, expected text in the error line)."""
    M = lambda ws: ["--model", ws["model"]]  # noqa: E731
    good = lambda ws: ["--data", R(ws, "good.txt")]  # noqa: E731
    cases = []

    def add(name, build, msg):
        cases.append(pytest.param(build, msg, id=name))

    # collect
    base = lambda ws, *a: ["collect", *M(ws), *good(ws), "--out", R(ws, "new_acts"), *a]  # noqa: E731
    for flag, vals, msg in [("--ctx", ["0", "1", "-5", "100000"], ["context length 0", "context length 1",
                                                                   "context length -5", "at most 512 positions"]),
                            ("--batch-size", ["0", "-1"], ["batch size 0", "batch size -1"]),
                            ("--max-tokens", ["0", "-3"], ["max tokens 0", "max tokens -3"]),
                            ("--shard-tokens", ["0"], ["shard tokens 0"]),
                            ("--store-dtype", ["fp8", "int8"], ["store dtype 'fp8'", "store dtype 'int8'"]),
                            ("--sites", ["resid_post.9", "resid_pre.1", "", "resid_post.x"],
                             ["resid_post.9", "resid_pre", "site", "resid_post.x"]),
                            ("--dtype", ["fp8", "half"], ["--dtype 'fp8'", "--dtype 'half'"]),
                            ("--device", ["gpu0", "cuda"], ["--device 'gpu0'", "--device cuda"]),
                            ("--split", ["words"], ["invalid choice: 'words'"]),
                            ("--packing", ["zip"], ["invalid choice: 'zip'"]),
                            ("--remote", ["aws"], ["invalid choice: 'aws'"])]:
        for v, m in zip(vals, msg):
            add(f"collect {flag} {v!r}", lambda ws, f=flag, v=v: base(ws, f, v), m)
    add("collect missing model", lambda ws: ["collect", "--model", R(ws, "nope"), *good(ws), "--out",
                                             R(ws, "new_acts")], "model path")
    add("collect model is a file", lambda ws: ["collect", "--model", R(ws, "a_file"), *good(ws), "--out",
                                               R(ws, "new_acts")], "model path")
    add("collect empty text", lambda ws: ["collect", *M(ws), "--data", R(ws, "empty.txt"), "--out",
                                          R(ws, "new_acts")], "is empty")
    add("collect missing data", lambda ws: ["collect", *M(ws), "--data", R(ws, "nope.txt"), "--out",
                                            R(ws, "new_acts")], "nope.txt")
    add("collect --out is a file", lambda ws: ["collect", *M(ws), *good(ws), "--out", R(ws, "a_file")], "a file")
    add("collect --out under a file", lambda ws: ["collect", *M(ws), *good(ws), "--out", R(ws, "a_file", "x")],
        "a file")
    add("collect --out foreign folder", lambda ws: ["collect", *M(ws), *good(ws), "--out", R(ws, "notes")],
        "not empty")
    add("collect --out other collection", lambda ws: base(ws, "--ctx", "16")[:-2] + ["--out", R(ws, "acts"),
                                                                                    "--ctx", "16"], "holds another collection")
    add("collect --remote ndif on a local model", lambda ws: base(ws, "--remote", "ndif"), "local model")
    add("collect --ctx not a number", lambda ws: base(ws, "--ctx", "x"), "invalid int value")
    # train
    tb = lambda ws, *a, out="new_run": ["train", "--activations", R(ws, "acts"), "--out", R(ws, out),  # noqa: E731
                                        "--tokens", "256", "--batch-size", "128", *a]
    for flag, vals in [("--lr", ["inf", "nan", "0", "-1", "-inf"]), ("--l1-coeff", ["nan", "-1", "inf"]),
                       ("--l0-coeff", ["nan", "-0.5"]), ("--k", ["0", "-1"]), ("--expansion", ["0", "-2"]),
                       ("--d-sae", ["0", "-8"]), ("--seed", ["-1"]), ("--checkpoint-every", ["0"]),
                       ("--tokens", ["0", "-5", "10"]), ("--batch-size", ["0", "-1"])]:
        for v in vals:
            key = flag.lstrip("-").replace("-", "_")
            msg = "less than one batch" if (flag, v) == ("--tokens", "10") else key
            add(f"train {flag} {v}", lambda ws, f=flag, v=v: tb(ws, f, v), msg)
    add("train --architecture gated", lambda ws: tb(ws, "--architecture", "gated"), "architecture 'gated'")
    add("train --k larger than d_sae", lambda ws: tb(ws, "--d-sae", "8", "--k", "9"), "larger than d_sae")
    for cfg, msg in [("layers5.toml", "layers 5"), ("warmup.toml", "lr_warmup 'x'"), ("sites5.toml", "sites 5"),
                     ("seed.toml", "seed 'abc'"), ("dead.toml", "dead_tokens -5"), ("resample.toml", "resample_tokens 0"),
                     ("resample_flag.toml", "sae.resample 'yes'"), ("btl1.toml", "sae.batchtopk_l1 -0.5"),
                     ("autocast.toml", "autocast 'yes'"),
                     ("k.toml", "sae.k 'x'"), ("layerk.toml", "layers.resid_post.0.k 0"), ("unknown.toml", "foo"),
                     ("sae_unknown.toml", "foo"), ("list.json", "table"), ("broken.toml", "does not parse"),
                     ("lrnan.yaml", "sae.lr nan"), ("clip.toml", "grad_clip 0"), ("decay.toml", "lr_decay 1.5"),
                     ("batch.toml", "batch_size 0"), ("sae_str.toml", "'sae' must be a table"),
                     ("layer_str.toml", "layers.a 3"), ("config.txt", "expected .toml"), ("nope.toml", "does not exist"),
                     ("emptysites.toml", "sites []")]:
        add(f"train --config {cfg}", lambda ws, c=cfg: ["train", "--activations", R(ws, "acts"), "--out",
                                                        R(ws, "new_run"), "--config", R(ws, c)], msg)
    add("train missing activations", lambda ws: ["train", "--activations", R(ws, "nope"), "--out", R(ws, "new_run")],
        "not an activation collection")
    add("train fewer tokens than a batch", lambda ws: ["train", "--activations", R(ws, "acts"), "--out",
                                                       R(ws, "new_run"), "--batch-size", "100000"], "fewer than one batch")
    add("train --out is a file", lambda ws: tb(ws, out="a_file"), "a file")
    add("train --out another run", lambda ws: tb(ws, out="other_run"), "holds another run")
    add("train --out foreign folder", lambda ws: tb(ws, out="notes"), "not an sc-steer run")
    add("train --out a finished run, new config", lambda ws: ["train", "--activations", R(ws, "acts"), "--out",
                                                              R(ws, "run"), "--tokens", "512", "--batch-size", "128"],
        "holds another run")
    add("train --out a finished run, no --resume", lambda ws: ["train", "--activations", R(ws, "acts"), "--out",
                                                               R(ws, "run"), "--tokens", "256", "--batch-size", "128",
                                                               "--expansion", "2", "--k", "4"], "pass --resume")
    add("train --model --ctx too long", lambda ws: ["train", *M(ws), *good(ws), "--out", R(ws, "new_run"), "--ctx",
                                                    "4096", "--tokens", "256", "--batch-size", "128"], "at most 512")
    add("train --lr not a number", lambda ws: tb(ws, "--lr", "fast"), "invalid float value")
    # eval / interpret / graph / steer on broken runs
    for cmd in ("eval", "interpret", "graph", "steer"):
        extra = {"graph": ["--out", "G"], "steer": ["--prompt", "In the", "--add", "resid_post.1:1:4"]}.get(cmd, [])
        for run, msg in [("nope", "no run.json"), ("run_badjson", "not valid JSON"), ("run_nomodel", "does not name"),
                         ("run_list", "does not name"), ("run_nosaes", "no saes/ folder"),
                         ("run_emptysaes", "no SAE")]:
            add(f"{cmd} --run {run}", lambda ws, c=cmd, r=run, e=extra: [c, "--run", R(ws, r)] +
                [R(ws, "new_graph") if x == "G" else x for x in e], msg)
    add("eval wide SAE", lambda ws: ["eval", "--run", R(ws, "run_wide")], "d_in=24")
    add("steer wide SAE", lambda ws: ["steer", "--run", R(ws, "run_wide"), "--prompt", "In the", "--add",
                                      "resid_post.1:1:4"], "d_in=24")
    add("interpret wide SAE", lambda ws: ["interpret", "--run", R(ws, "run_wide")], "d_in=24")
    ev = lambda ws, *a: ["eval", "--run", R(ws, "run"), "--data", R(ws, "good.txt"), *a]  # noqa: E731
    for flag, v, msg in [("--max-tokens", "0", "--max-tokens 0"), ("--max-tokens", "-1", "--max-tokens -1"),
                         ("--batch-size", "0", "--batch-size 0"), ("--data", "nope.txt", "nope.txt"),
                         ("--dtype", "fp4", "--dtype 'fp4'"), ("--device", "tpu", "--device 'tpu'")]:
        add(f"eval {flag} {v}", lambda ws, f=flag, v=v: ev(ws, f, v), msg)
    add("eval empty data", lambda ws: ev(ws, "--data", R(ws, "empty.txt")), "is empty")
    it = lambda ws, *a: ["interpret", "--run", R(ws, "run"), "--data", R(ws, "good.txt"), *a]  # noqa: E731
    for flag, v, msg in [("--top-n", "0", "top_n 0"), ("--window", "-1", "window -1"), ("--min-count", "0",
                         "min_count 0"), ("--max-tokens", "0", "max_tokens 0"), ("--sites", "resid_post.7",
                         "resid_post.7"), ("--sites", "mlp_out.1", "no SAE for mlp_out.1"),
                         ("--data", "nope.txt", "nope.txt")]:
        add(f"interpret {flag} {v}", lambda ws, f=flag, v=v: it(ws, f, v), msg)
    gr = lambda ws, *a: ["graph", "--run", R(ws, "run"), "--prompts", R(ws, "good.txt"), "--out", R(ws, "new_graph"),  # noqa: E731
                         *a]
    for args, msg in [(["--layers", "2-1"], "--layers '2-1'"), (["--layers", "x"], "--layers 'x'"),
                      (["--layers", "2"], "needs a next layer"), (["--layers", "5-6"], "needs a next layer"),
                      (["--sources", "1,abc"], "--sources '1,abc'"), (["--sources", "top:0"], "top:0"),
                      (["--sources", "foo"], "foo"), (["--sources", "999"], "unknown feature id 999"),
                      (["--mode", "clamp"], "needs --value"), (["--mode", "clamp", "--value", "nan"], "--value nan"),
                      (["--mode", "clamp", "--value", "inf"], "--value inf"), (["--mode", "half"], "invalid choice"),
                      (["--amount", "0"], "--amount 0"), (["--prune", "relative", "--amount", "2"], "--amount 2"),
                      (["--prune", "cumulative", "--amount", "nan"], "--amount nan"),
                      (["--max-prompts", "0"], "--max-prompts 0"), (["--ctx", "1"], "--ctx 1"),
                      (["--ctx", "100000"], "at most 512"), (["--name", "../escaped"], "--name '../escaped'"),
                      (["--name", ""], "--name ''"), (["--name", ".hidden"], "--name '.hidden'"),
                      (["--prompts", "nope.txt"], "nope.txt"), (["--where", "some"], "invalid choice")]:
        add(f"graph {' '.join(args)}", lambda ws, a=args: gr(ws, *a) if a[0] != "--prompts" else
            ["graph", "--run", R(ws, "run"), "--prompts", R(ws, a[1]), "--out", R(ws, "new_graph")], msg)
    add("graph empty prompts", lambda ws: ["graph", "--run", R(ws, "run"), "--prompts", R(ws, "empty.txt"), "--out",
                                           R(ws, "new_graph")], "is empty")
    add("graph --out is a file", lambda ws: gr(ws)[:-2] + ["--out", R(ws, "a_file")], "a file")
    add("graph --out another graph", lambda ws: gr(ws)[:-2] + ["--out", R(ws, "other_graph")], "holds another graph")
    add("graph --out foreign folder", lambda ws: gr(ws)[:-2] + ["--out", R(ws, "notes")], "not an sc-steer graph")
    st = lambda ws, *a: ["steer", "--run", R(ws, "run"), "--prompt", "In the beginning", *a]  # noqa: E731
    for args, msg in [(["--add", "resid_post.1:3"], "SITE:FEATURE:VALUE"), (["--add", "resid_post.1:abc:1"],
                      "SITE:FEATURE:VALUE"), (["--add", "resid_post.1:3:x"], "'x' is not a number"),
                      (["--add", "resid_post.1:3:nan"], "finite"), (["--add", "resid_post.1:3:inf"], "finite"),
                      (["--add", "resid_post.1:3:1e300"], "1e+300"), (["--add", "resid_post.9:3:1"], "resid_post.9"),
                      (["--add", "resid_post.1:99999:1"], "out of range"), (["--add", "resid_post.1:-1:1"],
                      "out of range"), (["--remove", "resid_post.1"], "SITE:FEATURE"),
                      (["--remove", "resid_post.1:3:4"], "SITE:FEATURE"), (["--clamp", "resid_post.1:3"],
                      "SITE:FEATURE:VALUE"), (["--scale", "resid_post.1:3:nan"], "finite"),
                      (["--add", "mlp_out.1:3:1"], "no SAE for mlp_out.1"), ([], "nothing to steer with"),
                      (["--add", "resid_post.1:3:4", "--max-new-tokens", "0"], "max_new_tokens 0"),
                      (["--add", "resid_post.1:3:4", "--max-new-tokens", "100000"], "at most 512 positions"),
                      (["--add", "resid_post.1:3:4", "--sample", "--temperature", "0"], "temperature 0"),
                      (["--add", "resid_post.1:3:4", "--sample", "--temperature", "nan"], "temperature nan"),
                      (["--add", "resid_post.1:3:4", "--seed", "-1"], "seed -1"),
                      (["--add", "resid_post.1:3:4", "--positions", "middle"], "invalid choice"),
                      (["--recipe", "nope.json"], "does not exist")]:
        add(f"steer {' '.join(args) or 'no interventions'}", lambda ws, a=args: st(ws, *a), msg)
    for name, msg in [("r_bool.json", "feature id True"), ("r_nan.json", "nan"), ("r_big.json", "1e+300"),
                      ("r_mode.json", "'boost'"), ("r_pos.json", "'middle'"), ("r_key.json", "strength"),
                      ("r_site.json", "resid_post.9"), ("r_nosae.json", "no SAE for mlp_out.1"),
                      ("r_both.json", "exactly one of"), ("r_vec.json", "expected shape"), ("r_vecnan.json", "NaN"),
                      ("r_vecmode.json", "only be added"), ("r_feat.json", "out of range"),
                      ("r_str.json", "feature id '3'"), ("r_coeff_str.json", "'big'"), ("r_shape.json", "recipe"),
                      ("r_broken.json", "not valid JSON")]:
        add(f"steer --recipe {name}", lambda ws, n=name: st(ws, "--recipe", R(ws, n)), msg)
    se = lambda ws, *a: ["steer-eval", "--run", R(ws, "run"), *a]  # noqa: E731
    one = ["--features", "resid_post.1:3"]
    for args, msg in [(["--features", "resid_post.1:99999"], "out of range"),
                      (["--features", "resid_post.9:3"], "expected SITE:ID"), (["--features", "top:0"], "N >= 1"),
                      (["--features", "top:4"], "no steerability"), ([], "name the features"),
                      ([*one, "--prompts", "PROMPTS_EMPTY"], "holds no prompt"),
                      ([*one, "--prompts", "nope.txt"], "no such file"), ([*one, "--coeffs", "1,nan"], "finite"),
                      ([*one, "--coeffs", "1,x"], "comma-separated numbers"), ([*one, "--coeffs", ","], "at least one"),
                      ([*one, "--methods", "add,shout"], "'shout'"), ([*one, "--min-fluency", "2"], "--min-fluency"),
                      ([*one, "--seeds", "x"], "comma-separated numbers"), ([*one, "--n-prompts", "0"], "--n-prompts"),
                      (["--recipe", "nope.json"], "does not exist")]:
        add(f"steer-eval {' '.join(args) or 'no features'}",
            lambda ws, a=args: se(ws, *[R(ws, "empty.txt") if x == "PROMPTS_EMPTY" else x for x in a]), msg)
    sb = lambda ws, *a: ["steerability", "--run", R(ws, "run"), *a]  # noqa: E731
    for args, msg in [(["--scale", "0"], "--scale"), (["--scale", "nan"], "--scale"),
                      (["--sites", "resid_post.9"], "resid_post.9"), (["--n-prompts", "-1"], "--n-prompts")]:
        add(f"steerability {' '.join(args)}", lambda ws, a=args: sb(ws, *a), msg)
    add("steer --save-recipe onto a file", lambda ws: st(ws, "--add", "resid_post.1:3:4", "--save-recipe",
                                                         R(ws, "existing.json")), "already exists")
    add("steer --save-recipe onto a folder", lambda ws: st(ws, "--add", "resid_post.1:3:4", "--save-recipe",
                                                           R(ws, "notes")), "is a folder")
    add("steer empty prompt", lambda ws: ["steer", "--run", R(ws, "run"), "--prompt", "", "--add",
                                          "resid_post.1:3:4"], "prompt")
    pr = lambda ws, *a: ["probe", "--run", R(ws, "run"), *a]  # noqa: E731
    for args, msg in [(["--label", "genre"], "carries source, pos"), (["--data", "good.txt"], ".jsonl"),
                      (["--max-per-label", "1"], "--max-per-label 1"), (["--ctx", "1"], "--ctx 1"),
                      (["--ctx", "100000"], "at most 512"), (["--seed", "-1"], "seed -1"),
                      (["--data", "r_list.json"], ".jsonl")]:
        add(f"probe {' '.join(args)}", lambda ws, a=args: pr(ws, *[R(ws, x) if x.endswith((".txt", ".json")) else x
                                                                   for x in a]), msg)
    add("probe --run missing", lambda ws: ["probe", "--run", R(ws, "nope")], "no run.json")
    # integers beyond what their consumer takes, sizes no machine holds, non-finite weights, JSON of the wrong shape
    big = "99999999999999999999999"
    add("steer --seed too large", lambda ws: st(ws, "--add", "resid_post.1:3:4", "--seed", big), f"seed {big}")
    add("steer --seed above 2**32", lambda ws: st(ws, "--add", "resid_post.1:3:4", "--seed", str(2 ** 32)), "seed")
    add("train --seed too large", lambda ws: tb(ws, "--seed", big), f"seed {big}")
    add("train --tokens beyond 64 bits", lambda ws: tb(ws, "--tokens", big), "64 bits")
    add("train --checkpoint-every beyond 64 bits", lambda ws: tb(ws, "--checkpoint-every", big), "64 bits")
    add("train --expansion beyond memory", lambda ws: tb(ws, "--expansion", "100000000"), "GiB of memory")
    add("train --d-sae beyond memory", lambda ws: tb(ws, "--d-sae", str(10 ** 12)), "GiB of memory")
    add("collect --max-tokens beyond 64 bits", lambda ws: base(ws, "--max-tokens", big), "64 bits")
    add("collect --batch-size beyond memory", lambda ws: base(ws, "--ctx", "32", "--batch-size", str(10 ** 12)),
        "GiB of memory")
    add("eval --batch-size beyond memory", lambda ws: ev(ws, "--batch-size", str(10 ** 12)), "GiB of memory")
    add("interpret --top-n beyond memory", lambda ws: it(ws, "--top-n", str(10 ** 12)), "GiB of memory")
    add("interpret --window beyond memory", lambda ws: it(ws, "--window", str(10 ** 12)), "GiB of memory")
    add("graph --max-prompts beyond 64 bits", lambda ws: gr(ws, "--max-prompts", big), "64 bits")
    add("steer with a NaN SAE", lambda ws: ["steer", "--run", R(ws, "run_nan"), "--prompt", "In the", "--add",
                                             "resid_post.1:1:4"], "NaN or infinite")
    add("eval with a NaN SAE", lambda ws: ["eval", "--run", R(ws, "run_nan")], "NaN or infinite")
    add("collect a model with a NaN weight", lambda ws: ["collect", "--model", R(ws, "nan_model"), *good(ws), "--out",
                                                         R(ws, "new_acts")], "NaN or infinite")
    add("graph --out with a list for its recipe", lambda ws: gr(ws)[:-2] + ["--out", R(ws, "graph_list")],
        "expected a JSON object")
    add("collect --out with a list for its manifest", lambda ws: ["collect", *M(ws), *good(ws), "--out",
                                                                  R(ws, "acts_list")], "expected a JSON object")
    add("train --activations with a list for its manifest", lambda ws: ["train", "--activations", R(ws, "acts_list"),
                                                                        "--out", R(ws, "new_run")], "expected a JSON object")
    add("graph labels with a non-object line", lambda ws: ["graph", "--run", R(ws, "run_badrecords"), "--prompts",
                                                           R(ws, "good.txt"), "--out", R(ws, "new_graph")],
        "line 2: expected a JSON object")
    for name, msg in [("r_list.json", "expected a JSON object"), ("r_items.json", "intervention 0 is str"),
                      ("r_nosite.json", "names no site"), ("r_name.json", "name 5")]:
        add(f"steer --recipe {name}", lambda ws, n=name: st(ws, "--recipe", R(ws, n)), msg)
    # demo and app
    add("demo --train-tokens 3000 (less than a batch)", lambda ws: ["demo", "--out", R(ws, "new_demo"),
                                                                    "--train-tokens", "3000"], "fewer than one batch")
    add("demo --out is a file", lambda ws: ["demo", "--out", R(ws, "a_file")], "a file")
    add("demo --out another run", lambda ws: ["demo", "--out", R(ws, "other_run"), "--train-tokens", "4096"], "holds another run")
    add("demo --train-tokens 0", lambda ws: ["demo", "--out", R(ws, "new_demo"), "--train-tokens", "0"],
        "--train-tokens 0")
    add("demo --interpret-tokens -5", lambda ws: ["demo", "--out", R(ws, "new_demo"), "--interpret-tokens", "-5"],
        "--interpret-tokens -5")
    add("demo --dtype fp8", lambda ws: ["demo", "--out", R(ws, "new_demo"), "--dtype", "fp8"], "--dtype 'fp8'")
    for args, msg in [(["--max-new-tokens", "0"], "--max-new-tokens 0"), (["--time-limit", "0"], "--time-limit 0"),
                      (["--time-limit", "nan"], "--time-limit nan"), (["--max-prompt-tokens", "-1"],
                      "--max-prompt-tokens -1"), (["--port", "x"], "invalid int value"),
                      (["--port", "99999"], "--port 99999"), (["--port", "0"], "--port 0"), (["--port", "-1"], "--port -1"),
                      (["--host", "nohost.invalid"], "cannot serve on --host nohost.invalid"),
                      (["--host", ""], "--host ''")]:
        add(f"app {' '.join(args)}", lambda ws, a=args: ["app", "--run", R(ws, "run"), *a], msg)
    add("app --run missing", lambda ws: ["app", "--run", R(ws, "nope")], "no run.json")
    add("app --port taken", lambda ws: ["app", "--run", R(ws, "run"), "--port", str(ws["taken_port"])],
        "Address already in use")
    add("no command", lambda ws: [], "required")
    add("unknown command", lambda ws: ["fly"], "invalid choice")
    add("unknown flag", lambda ws: ["eval", "--run", R(ws, "run"), "--fast"], "unrecognized arguments")
    return cases


@pytest.mark.parametrize("build, message", cli_cases())
def test_cli_bad_input(ws, build, message, capsys):
    argv = build(ws)
    before = snapshot(ws["root"])
    try:
        rc = main(argv)
    except SystemExit as e:   # argparse usage errors exit through SystemExit
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "Loading weights" not in ln and "Writing model" not in ln]
    assert rc == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
    assert message in lines[0], (message, lines[0])
    assert "Traceback" not in err
    assert snapshot(ws["root"]) == before, "a file in the workspace changed"
    for new in ("new_acts", "new_run", "new_graph", "new_demo"):
        assert not (ws["root"] / new).exists(), new


# -- SAE files -----------------------------------------------------------------------------------
def sae_file_cases():
    from safetensors.torch import save_file

    def saelens(d, cfg, tensors):
        d.mkdir()
        (d / "cfg.json").write_text(json.dumps(cfg))
        if tensors is not None:
            save_file(tensors, str(d / "sae_weights.safetensors"))

    def sparsify(d, cfg):
        d.mkdir()
        (d / "cfg.json").write_text(json.dumps(cfg))
        save_file({"encoder.weight": torch.zeros(6, 4), "encoder.bias": torch.zeros(6), "W_dec": torch.zeros(6, 4),
                   "b_dec": torch.zeros(4)}, str(d / "sae.safetensors"))

    def llama(d, hp):
        (d / "checkpoints").mkdir(parents=True)
        (d / "hyperparams.json").write_text(json.dumps(hp))
        save_file({"encoder.weight": torch.zeros(6, 4), "encoder.bias": torch.zeros(6),
                   "decoder.weight": torch.zeros(4, 6), "decoder.bias": torch.zeros(4)},
                  str(d / "checkpoints" / "final.safetensors"))

    W = {"W_enc": torch.zeros(4, 6), "b_enc": torch.zeros(6), "W_dec": torch.zeros(6, 4), "b_dec": torch.zeros(4)}
    ok = {"architecture": "standard", "d_in": 4, "d_sae": 6}
    dl_state = {"encoder.weight": torch.zeros(6, 4), "encoder.bias": torch.zeros(6), "decoder.weight": torch.zeros(4, 6),
                "bias": torch.zeros(4)}
    cases = {
        "no cfg or weights": (lambda d: d.mkdir(), "holds no SAE"),
        "cfg not json": (lambda d: (d.mkdir(), (d / "cfg.json").write_text("{")), "not valid JSON"),
        "cfg a list": (lambda d: saelens(d, [1], W), "JSON object"),
        "no weights file": (lambda d: saelens(d, ok, None), "no sae_weights"),
        "missing d_in": (lambda d: saelens(d, {"architecture": "standard", "d_sae": 6}, W), "d_in None"),
        "d_sae a string": (lambda d: saelens(d, {**ok, "d_sae": "6"}, W), "d_sae '6'"),
        "unknown arch": (lambda d: saelens(d, {**ok, "architecture": "matching_pursuit"}, W),
                         "'matching_pursuit' is not supported"),
        "gated without r_mag": (lambda d: saelens(d, {**ok, "architecture": "gated"}, W), "'r_mag'"),
        "layer_norm inputs": (lambda d: saelens(d, {**ok, "normalize_activations": "layer_norm"}, W),
                              "rescales each token"),
        "hook_z": (lambda d: saelens(d, {**ok, "reshape_activations": "hook_z"}, W), "hook_z"),
        "sparsify transcoder": (lambda d: sparsify(d, {"d_in": 4, "k": 2, "transcode": True}), "transcoder"),
        "sparsify groupmax": (lambda d: sparsify(d, {"d_in": 4, "k": 2, "activation": "groupmax"}), "'groupmax'"),
        "sparsify skip without W_skip": (lambda d: sparsify(d, {"d_in": 4, "k": 2, "skip_connection": True}), "W_skip"),
        "sparsify no k": (lambda d: sparsify(d, {"d_in": 4}), "integer 'k'"),
        "npz a pickle": (lambda d: (d.mkdir(), np.savez(d / "params.npz", W_enc=np.array([object()], dtype=object))),
                         "could not be read"),
        "npz no threshold": (lambda d: (d.mkdir(), np.savez(d / "params.npz", **{k: v.numpy() for k, v in W.items()})),
                             "'threshold'"),
        "llama scope transcoder": (lambda d: llama(d, {"hook_point_in": "blocks.1.hook_resid_mid",
                                                        "hook_point_out": "blocks.1.hook_mlp_out"}), "transcoder"),
        "llama scope no norm": (lambda d: llama(d, {"d_model": 4, "d_sae": 6, "jump_relu_threshold": 0.1}),
                                "dataset_average_activation_norm"),
        "topk without k": (lambda d: saelens(d, {**ok, "architecture": "topk"}, W), "needs an integer 'k'"),
        "wrong shape": (lambda d: saelens(d, ok, {**W, "W_enc": torch.zeros(5, 6)}), "W_enc has shape"),
        "missing tensor": (lambda d: saelens(d, ok, {k: v for k, v in W.items() if k != "b_dec"}), "'b_dec'"),
        "jumprelu no threshold": (lambda d: saelens(d, {**ok, "architecture": "jumprelu"}, W), "threshold"),
        "normalized": (lambda d: saelens(d, {**ok, "normalize_activations": "expected_average_only_in"}, W),
                       "normalize_activations"),
        "incomplete sc_steer block": (lambda d: saelens(d, {"sc_steer": {"architecture": "relu"}}, W), "incomplete"),
        "truncated weights": (lambda d: (saelens(d, ok, W), (d / "sae_weights.safetensors").write_bytes(b"\x00" * 9)),
                              "corrupt or truncated"),
        "ae.pt garbage": (lambda d: (d.mkdir(), (d / "ae.pt").write_bytes(b"garbage")), "weights-only state dict"),
        "ae.pt 1-d encoder": (lambda d: (d.mkdir(), torch.save({"encoder.weight": torch.zeros(6), "encoder.bias":
                              torch.zeros(6), "decoder.weight": torch.zeros(4, 6), "bias": torch.zeros(4)},
                              d / "ae.pt")), "expected a matrix"),
        "ae.pt no bias": (lambda d: (d.mkdir(), torch.save({"encoder.weight": torch.zeros(6, 4), "encoder.bias":
                          torch.zeros(6), "decoder.weight": torch.zeros(4, 6)}, d / "ae.pt")), "no tensor 'bias'"),
        "ae.pt wrong decoder": (lambda d: (d.mkdir(), torch.save({"encoder.weight": torch.zeros(6, 4), "encoder.bias":
                                torch.zeros(6), "decoder.weight": torch.zeros(5, 6), "bias": torch.zeros(4)},
                                d / "ae.pt")), "W_dec has shape"),
        "ae.pt unknown class": (lambda d: (d.mkdir(), torch.save({"encoder.weight": torch.zeros(6, 4)}, d / "ae.pt"),
                                (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "Gated"}}))),
                                "'Gated' is not supported"),
        "ae.pt topk without k": (lambda d: (d.mkdir(), torch.save({**dl_state, "b_dec": torch.zeros(4)}, d / "ae.pt"),
                                 (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))),
                                 "needs k"),
        "ae.pt not a dict": (lambda d: (d.mkdir(), torch.save([torch.zeros(2)], d / "ae.pt")), "state dict"),
        "ae.pt config a list": (lambda d: (d.mkdir(), torch.save(dl_state, d / "ae.pt"),
                                (d / "config.json").write_text("[1, 2]")), "expected a JSON object"),
        "ae.pt trainer a list": (lambda d: (d.mkdir(), torch.save(dl_state, d / "ae.pt"),
                                 (d / "config.json").write_text(json.dumps({"trainer": [1]}))), "\"trainer\" entry"),
        "ae.pt NaN weights": (lambda d: (d.mkdir(), torch.save({**dl_state, "encoder.weight": torch.full((6, 4), math.nan)},
                              d / "ae.pt")), "NaN or infinite"),
        "NaN weights": (lambda d: saelens(d, ok, {**W, "W_dec": torch.full((6, 4), math.nan)}), "NaN or infinite"),
        "infinite bias": (lambda d: saelens(d, ok, {**W, "b_enc": torch.full((6,), math.inf)}), "NaN or infinite"),
        "NaN threshold": (lambda d: saelens(d, {**ok, "architecture": "jumprelu"},
                                            {**W, "threshold": torch.full((6,), math.nan)}), "NaN or infinite"),
    }
    return [pytest.param(make, msg, id=name) for name, (make, msg) in cases.items()]


@pytest.mark.parametrize("make, message", sae_file_cases())
def test_bad_sae_files(make, message, tmp_path):
    from sc_steer.sae import load_sae

    make(tmp_path / "sae")
    with pytest.raises(ScSteerError, match=None) as e:
        load_sae(tmp_path / "sae")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_stray_folder_in_saes_is_left_alone(ws):
    from sc_steer.rundir import load_run_saes

    stray = ws["root"] / "run" / "saes" / "backup"
    stray.mkdir()
    try:
        assert list(load_run_saes(ws["root"] / "run")) == ["resid_post.0", "resid_post.1", "resid_post.2"]
    finally:
        stray.rmdir()


# -- the playground's request fields ----------------------------------------------------------------
@pytest.fixture(scope="module")
def playground(ws):
    from sc_steer_apps.serving import Limits, Playground

    return Playground(ws["root"] / "run", limits=Limits(max_new_tokens=20, max_prompt_tokens=50, seconds=5))


def api_cases():
    rec = json.dumps({"interventions": [{"site": "resid_post.1", "feature": 3, "mode": "add", "coeff": 4.0}]})
    return [pytest.param(*c, id=c[-1]) for c in [
        ("In the", rec, 100000, False, 1.0, 0, "max_new_tokens 100000"),
        ("In the", rec, 0, False, 1.0, 0, "max_new_tokens 0"),
        ("In the", rec, 1.5, False, 1.0, 0, "max_new_tokens 1.5"),
        ("In the", rec, math.nan, False, 1.0, 0, "max_new_tokens nan"),
        ("In the", rec, "5", False, 1.0, 0, "max_new_tokens '5'"),
        ("In the", rec, True, False, 1.0, 0, "max_new_tokens True"),
        ("word " * 400, rec, 5, False, 1.0, 0, "limit of 400"),
        ("word " * 60, rec, 5, False, 1.0, 0, "limit of 50"),
        ("", rec, 5, False, 1.0, 0, "prompt ''"),
        (None, rec, 5, False, 1.0, 0, "prompt None"),
        ("In the", rec, 5, True, 0.0, 0, "temperature 0.0"),
        ("In the", rec, 5, True, math.inf, 0, "temperature inf"),
        ("In the", rec, 5, True, -1.0, 0, "temperature -1.0"),
        ("In the", rec, 5, "yes", 1.0, 0, "sample 'yes'"),
        ("In the", rec, 5, False, 1.0, -1, "seed -1"),
        ("In the", rec, 5, False, 1.0, 0.5, "seed 0.5"),
        ("In the", "{", 5, False, 1.0, 0, "not valid JSON"),
        ("In the", "", 5, False, 1.0, 0, "recipe ''"),
        ("In the", "x" * 300_000, 5, False, 1.0, 0, "limit of 200,000"),
        ("In the", json.dumps({"interventions": [{"site": "resid_post.1", "feature": 3, "coeff": math.nan}]}), 5,
         False, 1.0, 0, "coefficient"),
        ("In the", json.dumps({"interventions": [{"site": "resid_post.1", "feature": True}]}), 5, False, 1.0, 0,
         "feature id True"),
        ("In the", json.dumps({"interventions": [{"site": "../../etc", "feature": 1}]}), 5, False, 1.0, 0, "site"),
        ("In the", json.dumps({"interventions": [{"site": "resid_post.1", "feature": 99999}]}), 5, False, 1.0, 0,
         "out of range"),
    ]]


@pytest.mark.parametrize("prompt, recipe, n, sample, temp, seed, message", api_cases())
def test_api_fields(playground, prompt, recipe, n, sample, temp, seed, message):
    with pytest.raises(ScSteerError) as e:
        playground.steer(prompt, playground.parse_recipe(recipe), n, sample, temp, seed)
    assert message in str(e.value), str(e.value)
    assert not playground.lock.locked()


def test_heatmap_fields(playground):
    for site, feature, message in [("resid_post.7", 1, "site 'resid_post.7'"), ("resid_post.1", -1, "feature id -1"),
                                   ("resid_post.1", 1e9, "feature id"), ("resid_post.1", "x", "feature id 'x'")]:
        with pytest.raises(ScSteerError, match="") as e:
            playground.heatmap("In the beginning", site, feature)
        assert message in str(e.value)
