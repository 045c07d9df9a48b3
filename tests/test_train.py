"""The multi-site trainer: resume after SIGTERM, config validation, evaluation against hooks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sc_steer import ScSteerError, collect, open_model
from sc_steer.cli import main
from sc_steer.data import iter_batches, iter_documents, iter_rows, pad_token_id
from sc_steer.sae import SAEConfig, make_sae
from sc_steer.sae.config import config_from_dict, load_config
from sc_steer.evaluate import evaluate_saes


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    text = root / "t.txt"
    text.write_text(" ".join(f"Ge{i}:{j} And God said, Let there be light: and there was light." for i in range(30)
                             for j in range(12)))
    lm = open_model(str(tiny_model_dirs["llama"]))
    collect(lm, "resid_post.*", str(text), root / "acts", ctx=64, progress=False)
    return {"model": str(tiny_model_dirs["llama"]), "acts": root / "acts", "text": str(text), "root": root}


TRAIN = ["--tokens", "40960", "--batch-size", "256", "--expansion", "2", "--k", "4", "--checkpoint-every", "5"]


def _weights(run):
    return {s: load_file(str(run / "saes" / s / "sae_weights.safetensors")) for s in
            ("resid_post.0", "resid_post.1", "resid_post.2")}


@pytest.mark.parametrize("arch", ["topk", "relu"])
@pytest.mark.slow
def test_sigterm_then_resume_ends_where_an_uninterrupted_run_ends(tiny_run, tmp_path, arch):
    """ReLU + L1 resamples dead and duplicated latents (here every step: the dead window of this short
    run is less than a batch), so the resumed run must also draw the same residuals."""
    cli = [sys.executable, "-m", "sc_steer.cli", "train", "--activations", str(tiny_run["acts"]),
           "--architecture", arch] + TRAIN
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cli + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen(cli + ["--out", str(part)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (part / "train_log.jsonl").exists():
        time.sleep(0.01)
    while time.time() < deadline:
        lines = (part / "train_log.jsonl").read_text().splitlines()
        if lines and json.loads(lines[-1])["step"] >= 30:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err.decode()
    assert not (part / "saes").exists(), "the run finished before it could be interrupted"
    done = subprocess.run(cli + ["--out", str(part), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = _weights(tmp_path / "whole"), _weights(part)
    for site in a:
        for key in a[site]:
            torch.testing.assert_close(a[site][key], b[site][key], rtol=1e-5, atol=1e-6)
    assert (part / "training_curves.png").stat().st_size > 10_000
    log = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["site"] == "resid_post.0"] == list(range(10, 161, 10))


def test_resume_with_a_different_config_is_refused(tiny_run, tmp_path, capsys):
    args = ["train", "--activations", str(tiny_run["acts"]), "--out", str(tmp_path / "r")] + TRAIN
    args[args.index("--tokens") + 1] = "2560"
    assert main(args) == 0
    rc = main(args + ["--resume", "--k", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another run (its train_config differ)" in err
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err
    # --force starts over there with the new config; the SAEs are replaced as a set
    assert main(args + ["--k", "5", "--force"]) == 0
    assert json.loads((tmp_path / "r" / "saes" / "resid_post.0" / "cfg.json").read_text())["sc_steer"]["k"] == 5
    assert not list((tmp_path / "r").glob(".saes-*"))


@pytest.mark.parametrize("flags, message", [
    (["--k", "-1"], "k -1"),
    (["--d-sae", "0"], "d_sae 0"),
    (["--architecture", "gated"], "architecture 'gated'"),
    (["--tokens", "10"], "less than one batch"),
])
def test_bad_flags_give_one_line_errors(tiny_run, tmp_path, capsys, flags, message):
    rc = main(["train", "--activations", str(tiny_run["acts"]), "--out", str(tmp_path / "x"), "--tokens", "4096",
               "--batch-size", "256"] + flags)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text('tokens = 8192\nbatch_size = 512\n[sae]\narchitecture = "relu"\n'
                                     'l1_coeff = 2.0\n[layers."resid_post.1"]\nl1_coeff = 4.0\n')
    cfg = load_config(tmp_path / "a.toml")
    assert cfg.for_site("resid_post.0").l1_coeff == 2.0 and cfg.for_site("resid_post.1").l1_coeff == 4.0
    (tmp_path / "b.yaml").write_text("tokens: 8192\nsae:\n  architecture: topk\n  k: 16\n")
    assert load_config(tmp_path / "b.yaml").sae.k == 16
    (tmp_path / "c.toml").write_text("tokenz = 3\n")
    with pytest.raises(ScSteerError, match="unknown key.*tokenz"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('[sae]\nkk = 3\n')
    with pytest.raises(ScSteerError, match=r"unknown key.*\[sae\]: kk"):
        load_config(tmp_path / "d.toml")
    with pytest.raises(ScSteerError, match=r"layers.resid_post.2.*wrong"):
        config_from_dict({"layers": {"resid_post.2": {"wrong": 1}}})


def test_eval_metrics_match_an_independent_hook_computation(tiny_run):
    lm = open_model(tiny_run["model"])
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(architecture="relu", d_in=32, d_sae=64))
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    res = evaluate_saes(lm, {"resid_post.1": sae}, tiny_run["text"], ctx=64, batch_size=4, max_tokens=400,
                        progress=False)["resid_post.1"]
    block = lm.hf.model.layers[1]
    xs, ce = [], {"clean": [], "spliced": [], "zero": []}
    rows = iter_rows(iter_documents(tiny_run["text"]), lm.tokenizer, 64)
    seen = 0
    for b in iter_batches(rows, 4, 64, pad_token_id(lm.tokenizer)):
        for mode in ("clean", "spliced", "zero"):
            def hook(_m, _i, out, mode=mode, keep=b.keep):
                h = out[0] if isinstance(out, tuple) else out
                if mode == "clean":
                    xs.append(h[keep].clone())
                    return None
                new = h.clone()
                new[keep] = sae(h[keep]) if mode == "spliced" else 0.0
                return (new,) + out[1:] if isinstance(out, tuple) else new
            hd = block.register_forward_hook(hook)
            with torch.no_grad():
                logits = lm.hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            hd.remove()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
            ce[mode].append(-lp[b.keep[:, 1:]])
        seen += int(b.keep.sum())
        if seen >= 400:
            break
    x = torch.cat(xs)
    f = sae.encode(x)
    fvu = ((sae.decode(f) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    c = {m: torch.cat(v).mean().item() for m, v in ce.items()}
    assert res["n_tokens"] == len(x)
    assert res["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert res["l0"] == pytest.approx((f > 0).sum(-1).float().mean().item(), rel=1e-6)
    assert res["dead_frac"] == pytest.approx(((f > 0).sum(0) == 0).float().mean().item())
    for m in ("clean", "spliced", "zero"):
        assert res[f"ce_{m}"] == pytest.approx(c[m], rel=1e-5)
    assert res["ce_recovered"] == pytest.approx((c["zero"] - c["spliced"]) / (c["zero"] - c["clean"]), rel=1e-4)


def test_eval_refuses_an_sae_of_the_wrong_width(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    make_sae(SAEConfig(architecture="topk", d_in=48, d_sae=96, k=4)).save(run / "saes" / "resid_post.0")
    (run / "run.json").write_text(json.dumps({"model": tiny_run["model"]}))
    rc = main(["eval", "--run", str(run), "--data", tiny_run["text"]])
    err = capsys.readouterr().err
    assert rc == 2 and "d_in=48" in err and "32 wide" in err


def test_train_streaming_from_the_model_without_a_cache(tiny_run, tmp_path):
    from sc_steer.pipeline import train_from_model
    from sc_steer.sae.config import TrainConfig

    lm = open_model(tiny_run["model"])
    cfg = config_from_dict({"sites": ["resid_post.2"], "tokens": 2048, "batch_size": 256, "sae": {"k": 4}})
    assert isinstance(cfg, TrainConfig)
    saes = train_from_model(lm, tiny_run["text"], cfg, tmp_path / "s", ctx=64, progress=False)
    assert saes["resid_post.2"].cfg.d_in == 32
    assert (tmp_path / "s" / "saes" / "resid_post.2" / "cfg.json").exists()


def test_model_source_hands_out_each_collected_row_once(tiny_run):
    """The streaming shuffle buffer (slots reused as batches leave) yields real activations only, each
    token at most once while the data's first pass lasts, from every site of the same tokens."""
    import itertools

    from sc_steer.store import ActivationStore
    from sc_steer.sae.sources import model_source

    lm = open_model(tiny_run["model"])
    sites = lm.sites("resid_post.0,resid_post.2")
    store = ActivationStore(tiny_run["acts"])   # the same text, ctx 64, collected by nnsight
    ref = {str(s): store.load(str(s)) for s in sites}
    unused: dict[tuple, list[int]] = {}   # repeated text gives repeated rows: each copy may be drawn once
    for i, r in enumerate(ref["resid_post.0"]):
        unused.setdefault(tuple(r.tolist()), []).append(i)
    batches = model_source(lm, sites, tiny_run["text"], 100, 0, ctx=64, rows_per_pass=2, buffer_tokens=400)(0)
    drawn = 0
    for b in itertools.islice(batches, 30):
        for row0, row2 in zip(b["resid_post.0"], b["resid_post.2"]):
            copies = unused[tuple(row0.tolist())]    # a KeyError: a row no forward produced (a stale slot)
            assert copies, "a token handed out twice"
            assert any(torch.equal(row2, ref["resid_post.2"][i]) for i in copies)   # both sites, same token
            copies.pop()
            drawn += 1
    assert drawn == 3000 < store.n_tokens


def test_divergence_stops_with_one_line_and_keeps_no_broken_weights(tiny_run, tmp_path, capsys):
    out = tmp_path / "div"
    args = ["train", "--activations", str(tiny_run["acts"]), "--out", str(out), "--tokens", "5120",
            "--batch-size", "256", "--lr", "1e30", "--checkpoint-every", "1"]
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "train SAEs" not in ln]
    assert len(err) == 1 and "diverged at step" in err[0] and "lower lr" in err[0], err
    assert not (out / "saes").exists()
    if (out / "checkpoint.safetensors").exists():
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint.safetensors")).values())


def test_resume_survives_a_torn_last_log_line(tiny_run, tmp_path, capsys):
    """A kill can cut the last train-log line short; --resume drops it instead of failing on it."""
    args = ["train", "--activations", str(tiny_run["acts"]), "--out", str(tmp_path / "t")] + TRAIN
    args[args.index("--tokens") + 1] = "2560"
    assert main(args) == 0
    log = tmp_path / "t" / "train_log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 99, "site": "resid_po')
    assert main(args + ["--resume"]) == 0
    assert log.read_text() == good
