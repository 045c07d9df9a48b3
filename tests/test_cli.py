"""The CLI turns bad input into one `error:` line and exit status 2, never a traceback."""
import json
import subprocess
import sys

import pytest

from sc_steer.cli import main


@pytest.fixture
def good_text(tmp_path):
    p = tmp_path / "good.txt"
    p.write_text("In the beginning God created the heaven and the earth. " * 20)
    return p


def run_cli(capsys, *args):
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def bad_cases(tmp, model, good_text):
    (tmp / "empty.txt").write_text("")
    (tmp / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    other = tmp / "other_run"
    return {
        "missing model": (["--model", str(tmp / "no_such_model")], "model path"),
        "unknown site": (["--model", model, "--sites", "resid_post.99"], "unknown site 'resid_post.99'"),
        "empty text": (["--model", model, "--data", str(tmp / "empty.txt")], "is empty"),
        "jsonl field": (["--model", model, "--data", str(tmp / "nofield.jsonl")], "no field 'text'"),
        "ctx zero": (["--model", model, "--ctx", "0"], "context length 0"),
        "other run": (["--model", model, "--out", str(other), "--sites", "resid_post.1"], "holds another collection"),
    }


def test_bad_input_gives_one_line_errors(tiny_model_dirs, tmp_path, good_text, capsys):
    model = str(tiny_model_dirs["llama"])
    rc, _ = run_cli(capsys, "collect", "--model", model, "--data", str(good_text), "--sites", "resid_post.0",
                    "--out", str(tmp_path / "other_run"), "--ctx", "16")
    assert rc == 0
    for name, (args, message) in bad_cases(tmp_path, model, good_text).items():
        full = ["collect", "--data", str(good_text), "--out", str(tmp_path / f"out_{name.replace(' ', '_')}")]
        rc, err = run_cli(capsys, *(full + args))
        lines = [ln for ln in err.splitlines() if ln.strip() and "Loading weights" not in ln]
        assert rc == 2, name
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, err)


@pytest.mark.slow
def test_console_script_entry_point(tiny_model_dirs, tmp_path):
    """The installed `sc-steer` script: a bad site exits 2 with no traceback; a good run reports."""
    exe = [sys.executable, "-m", "sc_steer.cli"]
    bad = subprocess.run(exe + ["collect", "--model", str(tiny_model_dirs["gpt2"]), "--sites", "resid_post.99",
                                "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "unknown site" in bad.stderr
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question. " * 30)
    ok = subprocess.run(exe + ["collect", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(tmp_path / "t.txt"),
                               "--out", str(tmp_path / "y"), "--ctx", "32"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "collected" in ok.stdout and "resid_post.2" in ok.stdout
