"""The README's commands, run as a user runs them: the installed `sc-steer` script in a subprocess, in
a fresh folder, in the order the README gives them (CI runs its install and test commands).

Only the budgets are made small (tokens, prompts): ``BUDGETS`` below says how, flag by flag. Commands
that need a GPU run only where CUDA is present.
"""
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import serve_app

pytestmark = pytest.mark.slow   # every README command as a subprocess: demo, torchrun, the playground server

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# per subcommand: flag -> the small value used here (replacing the README's, or appended)
BUDGETS = {
    "demo": {"--train-tokens": "16384", "--eval-tokens": "1024",
             "--interpret-tokens": "2048"},
    "collect": {"--max-tokens": "12000"},
    "train": {"--tokens": "8192"},
    "eval": {"--max-tokens": "1500"},
    "interpret": {"--max-tokens": "3000"},
    "steerability": {"--n-prompts": "2"},
    "steer-eval": {"--n-prompts": "2", "--coeffs": "4,12", "--max-new-tokens": "8", "--seeds": "none"},
}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """Shell commands of a block: comment lines dropped, a quoted newline kept inside its command."""
    out, buf = [], ""
    for line in block.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf = f"{buf}\n{line}" if buf else line
        try:
            shlex.split(buf, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        out.append(buf)
        buf = ""
    return out


def subcommand(words: list[str]) -> str | None:
    """The sc-steer subcommand of a command line: ``sc-steer train ...`` or ``torchrun ... $(which sc-steer) train``."""
    for i, w in enumerate(words[:-1]):
        if w in ("sc-steer", "sc-steer)"):
            return words[i + 1]
    return None


def small(cmd: str) -> str:
    """The command with BUDGETS applied (flags replaced in place or appended before any comment)."""
    words = shlex.split(cmd, comments=True)
    if words[0] not in ("sc-steer", "torchrun") or subcommand(words) is None:
        return cmd
    code, _, comment = cmd.partition("  #")
    for flag, value in BUDGETS.get(subcommand(words), {}).items():
        if flag in words:
            code = re.sub(rf"{flag} \S+", f"{flag} {value}", code)
        else:
            code = f"{code.rstrip()} {flag} {value}"
    return code


def small_config(toml: str) -> str:
    return re.sub(r"^tokens = \d+", f"tokens = {BUDGETS['train']['--tokens']}", toml, flags=re.M)


def test_ci_runs_the_readme_install_and_test_commands():
    blocks = bash_blocks(README)
    install = next(b.strip() for b in blocks if "pip install" in b)
    test = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def test_command_parsing():
    block = 'sc-steer steer --run r --prompt "A.\nB" --add x:1:2\n# note\nsc-steer eval --run r  # comment\n'
    assert commands(block) == ['sc-steer steer --run r --prompt "A.\nB" --add x:1:2', "sc-steer eval --run r  # comment"]
    assert small("sc-steer eval --run r  # comment") == "sc-steer eval --run r --max-tokens 1500"
    assert small("sc-steer train --out o --tokens 2000000 --k 3") == "sc-steer train --out o --tokens 8192 --k 3"
    assert small("torchrun --nproc_per_node 2 $(which sc-steer) train --out o --tokens 409600") == \
        "torchrun --nproc_per_node 2 $(which sc-steer) train --out o --tokens 8192"


def test_every_readme_command_runs_as_written(tmp_path):
    """demo, collect, train (from disk and from the model, resume), eval, interpret, graph, steer, app."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    toml = re.search(r"```toml\n(.*?)```", README, re.S).group(1)
    (tmp_path / "my.toml").write_text(small_config(toml))  # the config file the README's train command reads
    ran, apps = [], []
    for block in bash_blocks(README):
        for cmd in commands(block):
            words = shlex.split(cmd, comments=True)
            if "pip install" in cmd or "pytest" in cmd:
                continue                          # CI runs these two (test above)
            if "--device" in words and words[words.index("--device") + 1].startswith("cuda") \
                    and not torch.cuda.is_available():
                continue
            if words[:2] == ["sc-steer", "app"]:
                apps.append(cmd)                  # long-running: served below
                continue
            r = subprocess.run(["bash", "-c", small(cmd)], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=900)
            assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stdout[-2000:], r.stderr[-4000:])
            ran.append(words[1] if words[0] == "sc-steer" else words[0])
    assert {"demo", "collect", "train", "eval", "interpret", "graph", "steer", "steerability", "steer-eval",
            "import"} <= set(ran), ran
    imported = json.loads((tmp_path / "runs" / "imported" / "run.json").read_text())
    assert imported["sites"] == [f"resid_post.{i}" for i in range(4)] and (tmp_path / "runs/imported/eval.json").exists()
    assert ran.count("train") == 3 and ran.count("torchrun") >= 3, ran

    demo = tmp_path / "runs" / "demo"
    ev = json.loads((demo / "eval.json").read_text())["sites"]
    assert set(ev) == {f"resid_post.{i}" for i in range(4)}
    # a few training steps already halve the error (FVU 0.57-0.63 and 85-98% of the CE loss recovered
    # when measured; a trainer that does not learn stays near FVU 1)
    assert all(0 < r["fvu"] < 0.8 and r["ce_recovered"] > 0.6 and r["l0"] <= 32 for r in ev.values()), ev
    for f in ("browser/index.html", "interpret.md", "graph/graph.json", "training_curves.png"):
        assert (demo / f).exists(), f
    assert json.loads((tmp_path / "runs/x/activations/manifest.json").read_text())["n_tokens"] >= 12000
    assert (tmp_path / "runs/x/eval.json").exists() and (tmp_path / "runs/y/saes/resid_post.0/cfg.json").exists()
    # torchrun: the 2-process collection is complete and merged; both splits wrote every site's SAE
    assert json.loads((tmp_path / "runs/acts2/manifest.json").read_text())["ranks"] == 2
    for run in ("layers2", "data2"):
        assert sorted(p.name for p in (tmp_path / "runs" / run / "saes").iterdir()) == [f"resid_post.{i}" for i in range(4)]
    graph = json.loads((tmp_path / "graphs/my-graph/graph.json").read_text())
    assert graph["links"] and json.loads((tmp_path / "graphs/my-graph/recipe.json").read_text())["prompts"]
    one = json.loads((tmp_path / "graphs/my-prompt/graph.json").read_text())
    assert one["graph"]["kind"] == "prompt" and {n["kind"] for n in one["nodes"]} == {"embedding", "feature", "logit"}
    scores = json.loads((demo / "features" / "resid_post.1.steerability.json").read_text())["scores"]
    assert len(scores) == 2048 and all(map(math.isfinite, scores))
    ev_steer = json.loads((demo / "steer_eval" / "steer_eval.json").read_text())
    assert {m["method"] for m in ev_steer["methods"]} == {"add", "clamp", "actadd", "mean_diff", "prompt"}
    assert (demo / "steer_eval" / "steer_eval.png").exists() and len(ev_steer["facts"]) == 8
    recipe = (tmp_path / "stage.json").read_text()
    assert json.loads(recipe)["interventions"][0]["feature"] == 1350

    # the playground, as the README starts it: answers /steer with a continuation the recipe changed
    from gradio_client import Client

    assert apps == ["sc-steer app --run runs/demo", "sc-steer app --run runs/demo --run runs/x"]
    with serve_app([], cwd=tmp_path, command=apps[0]) as url:
        base, steered = Client(url, verbose=False).predict("HAMLET.\nTo be, or not", recipe, 20, False, 1.0, 0, "",
                                                           api_name="/steer")
        assert steered and steered != base
    with serve_app([], cwd=tmp_path, command=apps[1]) as url:
        # runs/x's SAEs trained for two steps here: the recipe's feature is a near-random direction, so push it hard
        strong = json.dumps({"interventions": [{**json.loads(recipe)["interventions"][0], "coeff": 60.0}]})
        run_x = str((tmp_path / "runs" / "x").resolve())
        base, steered = Client(url, verbose=False).predict("Ge1:1 In the beginning", strong, 10, False, 1.0, 0, run_x,
                                                           api_name="/steer")
        assert base and steered != base, (base, steered)
