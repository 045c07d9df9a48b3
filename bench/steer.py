"""Per-token latency of steered against unsteered generation on the demo model, side by side.

    OMP_NUM_THREADS=1 python bench/steer.py --run runs/demo

Unsteered: ``transformers`` ``generate`` with the KV cache. Steered: ``sc_steer.steer.generate``, the
same ``generate`` with the edit hooked in, one feature added at one site at every step (and, second,
three interventions at three sites: an add, a remove and a clamp, the last two encoding with the SAE).
Greedy, fixed ``--new-tokens`` (min_new_tokens forces the length); alternating repeats, medians. The
unsteered run is also timed on a copy of the model that nnsight does not wrap (what a plain
transformers user runs).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from sc_steer.models import demo_model_path, open_model
from sc_steer.rundir import load_run_saes, read_run
from sc_steer.steer import Intervention, Recipe, generate
from sc_steer.steer.generate import tokenize_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    name = read_run(args.run)["model"]
    lm = open_model(name)
    # nnsight installs its own forward on every module of the model it wraps (a few microseconds a call,
    # outside traces too): generate is timed on a plain copy as well
    plain_model = AutoModelForCausalLM.from_pretrained(demo_model_path() if name == "demo" else name).eval()
    saes = load_run_saes(args.run)
    prompt = ["Ge1:1 In the beginning God created the heaven and the earth."]
    one = Recipe([Intervention("resid_post.1", 837, "add", 8.0)])
    three = Recipe([Intervention("resid_post.0", 5, "add", 4.0), Intervention("resid_post.1", 837, "remove"),
                    Intervention("resid_post.2", 12, "clamp", 2.0)])
    n = args.new_tokens
    kw = dict(max_new_tokens=n)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) / n

    def plain(model):
        with torch.no_grad():
            model.generate(**tokenize_prompts(lm, prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=lm.tokenizer.pad_token_id)

    for model in (lm.hf, plain_model):
        model.generation_config.min_new_tokens = n  # the same length for every variant
    variants = {"unsteered (transformers generate)": lambda: plain(lm.hf),
                "the same, model not wrapped by nnsight": lambda: plain(plain_model),
                "steered, 1 feature at 1 site": lambda: generate(lm, prompt, one, saes, **kw),
                "steered, 3 interventions at 3 sites": lambda: generate(lm, prompt, three, saes, **kw)}
    for f in variants.values():
        f()  # warm-up
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, f in variants.items():
            times[k].append(timed(f))
    base = statistics.median(times["unsteered (transformers generate)"])
    print(f"model {lm.name}, {n} new tokens, greedy, KV cache, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:38s}: {1e3 * m:6.2f} ms/token  ({100 * (m / base - 1):+.1f}% vs unsteered)")


if __name__ == "__main__":
    main()
