"""`sc-steer demo` as a user meets it: killed at every stage and rerun, it ends where an uninterrupted
demo ends; a finished demo returns without redoing anything; a changed budget redoes its stage and
the ones after it. Small budgets; real subprocesses and SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sc_steer.demo.run import DEMO_JSON, STAGES, budgets, stage_settings

SMALL = ["--train-tokens", "16384", "--eval-tokens", "1024", "--interpret-tokens", "2048"]
CLI = [sys.executable, "-m", "sc_steer.cli", "demo"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run(CLI + ["--out", str(out), *SMALL, *extra], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def recorded(out: Path) -> list[str]:
    try:
        return list(json.loads((out / DEMO_JSON).read_text())["stages"])
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def outputs(out: Path) -> dict:
    """What the demo leaves that must not depend on where it was stopped."""
    ev = json.loads((out / "eval.json").read_text())["sites"]
    graph = json.loads((out / "graph" / "graph.json").read_text())
    return {"eval": ev, "features": {p.name: p.read_text() for p in sorted((out / "features").glob("*.jsonl"))},
            "neurons": {p.name: p.read_text() for p in sorted((out / "neurons").glob("*.jsonl"))},
            "links": sorted(json.dumps(e, sort_keys=True) for e in graph["links"])}


def kill_when(out: Path, ready, what: str) -> None:
    """Start the demo and SIGKILL it once ``ready()`` holds (then it is inside the stage after that)."""
    proc = subprocess.Popen(CLI + ["--out", str(out), *SMALL], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t = time.time()
    while not ready():
        assert proc.poll() is None, f"the demo ended before {what}"
        assert time.time() - t < 600, f"never reached {what}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_demo_killed_at_every_stage_ends_where_an_uninterrupted_one_ends(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    first = demo(whole)
    assert recorded(whole) == list(STAGES)
    assert "| train |" in first.stdout and "next:" in first.stdout and f"sc-steer app --run {whole}" in first.stdout
    assert not (whole / "checkpoint.safetensors").exists() and not (whole / "activations").exists()

    # inside training (its run.json is written), then inside each later stage
    kill_when(killed, lambda: (killed / "run.json").exists(), "training")
    for i, stage in enumerate(STAGES[:-1]):
        kill_when(killed, lambda i=i: len(recorded(killed)) > i, f"the stage after {stage}")
        assert recorded(killed)[:i + 1] == list(STAGES[:i + 1])
    demo(killed)
    assert recorded(killed) == list(STAGES)
    assert outputs(killed) == outputs(whole)

    # finished: nothing is redone, the summary is printed again
    stamp = {p: p.stat().st_mtime_ns for p in (whole / "eval.json", whole / DEMO_JSON, whole / "interpret.json")}
    again = demo(whole)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert f"demo run: {whole}\n" in first.stdout and again.stdout.startswith(f"demo run: {whole}\n")

    # another interpretation budget: interpret and graph are redone, training and evaluation are not
    demo(whole, "--interpret-tokens", "1536")
    st = json.loads((whole / DEMO_JSON).read_text())["stages"]
    assert st["interpret"]["settings"]["tokens"] == 1536 and list(st) == list(STAGES)
    assert (whole / "eval.json").stat().st_mtime_ns == stamp[whole / "eval.json"]
    assert json.loads((whole / "interpret.json").read_text())["n_tokens"] < 2048


def test_budgets_and_what_each_stage_depends_on():
    assert budgets() == {"train_tokens": 819_200, "eval_tokens": 25_000, "interpret_tokens": 100_000}
    assert budgets(full=True) == {"train_tokens": 1_228_800, "eval_tokens": 50_000, "interpret_tokens": 200_000}
    assert budgets(full=True, eval_tokens=7)["eval_tokens"] == 7
    s = stage_settings(budgets(), {"tokens": 819_200})
    assert list(s) == list(STAGES) and s["interpret"]["tokens"] == 100_000 and s["eval"]["tokens"] == 25_000
    with pytest.raises(Exception, match="--eval-tokens 0"):
        budgets(eval_tokens=0)
