"""GPU benchmark at Llama-2-7B shape: every hot loop of sc-steer next to a reference, in one run.

    python bench/gpu.py --out bench_gpu.json            # one CUDA GPU, a few minutes
    python bench/gpu.py --small --device cpu            # the same script on a tiny shape (a dry run)

Nothing is downloaded: the model is ``LlamaForCausalLM`` built from Llama-2-7B's config (hidden 4096,
MLP 11008, 32 layers, 32 heads, vocab 32000) with random bf16 weights, and the demo tokenizer (its
8k ids fit the vocabulary). Measured side by side in this run:

* ceilings: bf16 matrix product rate and device-to-device copy bandwidth;
* SAE training step (TopK, BatchTopK, JumpReLU, ReLU-L1; d_in 4096, d_sae 65536, k 64, batch 4096,
  bf16 autocast): sc-steer's trainer step against a plain-torch dense step written here;
* collection: last block and all blocks (to disk) against the plain forward; the all-blocks write
  rate against a raw ``safetensors`` write of the same bytes to the same disk, synced;
* training straight from the model (no disk cache), all 32 layers, tokens/s;
* the feature graph (d_sae 32768): batched block-(n+1) ablation against one full forward per feature;
* a 32-token prompt's graph over the last four layers (with its logit edges), against one full forward
  per (feature, position) removal; ``steer_eval`` (every method, two features) timed as a whole;
* interpretation (d_sae 32768 plus the neuron baselines) tokens/s;
* steering latency (one added vector; one removed feature) against transformers ``generate``, on the
  nnsight-wrapped model and on a plain copy of the same shape.

Timings synchronise the device; each is the median of repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import dead_mask, interleaved, plain_step_fn, sync, timed
from sc_steer.models import demo_model_path, open_model

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, d_sae=65536, graph_d_sae=32768, k=64, batch=4096, ctx=1024,
               stream_d_sae=8192),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=8192, d_sae=1024, graph_d_sae=512, k=16, batch=512, ctx=128,
                  stream_d_sae=256),
}


def python_profile(fn, top: int = 12):
    """Run ``fn`` under cProfile; return its result and the ``top`` functions by own time (seconds), to show
    where host time goes in loops that the GPU waits on."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    result = prof.runcall(fn)
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    table = {f"{Path(f).name}:{line}({name})"[:90]: round(v[2], 3) for (f, line, name), v in rows}
    print("host time by function (s, own):\n" + "\n".join(f"  {v:8.3f}  {k}" for k, v in table.items()), flush=True)
    return result, table


# -- ceilings ---------------------------------------------------------------------------------------
def ceilings(dev: torch.device, small: bool) -> dict:
    n = 1024 if small else 8192
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    mats = [(torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)) for _ in range(3)]
    i = [0]

    def mm():
        a, b = mats[i[0] % 3]
        i[0] += 1
        a @ b

    t = timed(mm, dev, repeats=10, warmup=3)
    x = torch.randn(1 << (22 if small else 28), device=dev)   # 1 GiB fp32 on the GPU
    y = torch.empty_like(x)
    tc = timed(lambda: y.copy_(x), dev, repeats=10, warmup=2)
    return {"matmul_tflops": 2 * n ** 3 / t / 1e12, "matmul_dtype": str(dtype).removeprefix("torch."),
            "copy_gbs": 2 * x.numel() * 4 / tc / 1e9}


# -- SAE training step ------------------------------------------------------------------------------
def sae_training(dev: torch.device, s: dict, autocast: bool, peak_tflops: float) -> dict:
    from sc_steer.sae.config import config_from_dict
    from sc_steer.sae.sources import tensor_source
    from sc_steer.sae.train import Trainer

    d_in, d_sae, k, batch = s["hidden_size"], s["d_sae"], s["k"], s["batch"]
    data = [torch.randn(batch, d_in, device=dev) for _ in range(3)]
    out = {}
    # (architecture, kernel path, AuxK on a tenth of the latents dead). Without AuxK no latent dies during
    # the benchmark (the dead window is 10 M tokens); with it, AuxK runs at its full k_aux = d_in / 2.
    variants = [("topk", "auto", False), ("topk", "auto", True), ("topk", "torch", False), ("batchtopk", "auto", False),
                ("jumprelu", "auto", False), ("relu", "auto", False)]
    if dev.type == "cpu":
        variants.insert(3, ("topk", "autograd", False))    # the CPU's own path (on CUDA, auto is the Triton one)
    for arch, kernels, auxk in variants:
        os.environ["SC_STEER_KERNELS"] = kernels
        cfg = config_from_dict({"sites": ["x"], "batch_size": batch, "tokens": 1 << 40, "autocast": autocast,
                                "checkpoint_every": 1 << 30, "log_every": 1 << 30,
                                "sae": {"architecture": arch, "d_sae": d_sae, "k": k}})
        x_cpu = data[0].cpu()
        tr = Trainer(cfg, tensor_source({"x": x_cpu}, batch, 0), tempfile.mkdtemp(prefix="sc_bench_"),
                     {"x": {"d": d_in, "mean_norm": float(x_cpu.norm(dim=-1).mean())}}, device=dev, progress=False)
        tr._init_states({"x": x_cpu})
        st = tr.states["x"]
        if auxk:
            st.since_fired.masked_fill_(dead_mask(d_sae, dev), float(1 << 40))
        i = [0]

        def ours():
            tr._step_site(st, data[i[0] % 3])
            tr.step += 1
            i[0] += 1

        parts = tr._step_site(st, data[0])
        assert ("auxk" in parts) == auxk, f"AuxK should be {'on' if auxk else 'off'} in this variant"
        t_ours = timed(ours, dev, repeats=10, warmup=3)
        from sc_steer.sae.sparse import kernels as kernel_choice

        used = kernel_choice(dev) if arch == "topk" else "-"
        del tr, st
        plain = plain_step_fn(arch, d_in, d_sae, k, dev, autocast, auxk)
        t_plain = timed(lambda: plain(data[i[0] % 3]), dev, repeats=10, warmup=3)
        del plain
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        flops = 10 * batch * d_in * d_sae  # dense-equivalent: 2 forward + 3 backward matmuls, 2 FLOPs each
        name = (arch if kernels == "auto" else f"{arch}[{kernels}]") + ("+auxk" if auxk else "")
        out[name] = {"ms": 1e3 * t_ours, "plain_ms": 1e3 * t_plain, "tokens_per_s": batch / t_ours,
                     "pct_of_peak": 100 * flops / t_ours / (peak_tflops * 1e12), "kernels": used}
    os.environ.pop("SC_STEER_KERNELS", None)
    out.update(sparsify_step(dev, d_in, d_sae, k, batch, data, peak_tflops))
    return out


def sparsify_step(dev, d_in, d_sae, k, batch, data, peak_tflops) -> dict:
    """EleutherAI sparsify's SparseCoder step (encode, decode, FVU + AuxK, backward, Adam), if importable."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception as e:  # noqa: BLE001 - not installed: nothing to compare with
        print(f"sparsify not importable ({type(e).__name__}: {e}): no sparsify figure", flush=True)
        return {}
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=dev)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)  # as fast as ours
    out = {}
    for dead in (None, dead_mask(d_sae, dev)):   # its AuxK runs with k_aux = d_in / 2 too
        i = [0]

        def step():
            x = data[i[0] % 3]
            i[0] += 1
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                res = sae(x, dead_mask=dead)
            loss = res.fvu + res.auxk_loss / 8
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t = timed(step, dev, repeats=10, warmup=3)
        flops = 10 * batch * d_in * d_sae
        out["sparsify_topk" + ("" if dead is None else "+auxk")] = {
            "ms": 1e3 * t, "pct_of_peak": 100 * flops / t / (peak_tflops * 1e12)}
    return out


def profile_topk_step(dev: torch.device, s: dict) -> dict:
    """Where the TopK step's CUDA time goes (torch.profiler over 5 steps): the top kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    from sc_steer.sae.config import config_from_dict
    from sc_steer.sae.sources import tensor_source
    from sc_steer.sae.train import Trainer

    d_in, d_sae, k, batch = s["hidden_size"], s["d_sae"], s["k"], s["batch"]
    x = torch.randn(batch, d_in)
    cfg = config_from_dict({"sites": ["x"], "batch_size": batch, "tokens": 1 << 40, "autocast": dev.type == "cuda",
                            "checkpoint_every": 1 << 30, "log_every": 1 << 30,
                            "sae": {"architecture": "topk", "d_sae": d_sae, "k": k}})
    tr = Trainer(cfg, tensor_source({"x": x}, batch, 0), tempfile.mkdtemp(prefix="sc_bench_"),
                 {"x": {"d": d_in, "mean_norm": float(x.norm(dim=-1).mean())}}, device=dev, progress=False)
    tr._init_states({"x": x})
    st, xd = tr.states["x"], x.to(dev)
    for _ in range(3):
        tr._step_site(st, xd)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            tr._step_site(st, xd)
        sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:15]
    table = {e.key[:80]: round(getattr(e, key, 0) / 5 / 1e3, 3) for e in rows}
    print("TopK step, ms per step by op:\n" + "\n".join(f"  {v:8.3f}  {k}" for k, v in table.items()), flush=True)
    return {"ms_per_step_by_op": table}


# -- model-side benchmarks --------------------------------------------------------------------------
def build_hf(dev: torch.device, s: dict):
    """The plain transformers model of the benchmark's shape (random weights), not wrapped by nnsight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: s[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size")},
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def build_model(dev: torch.device, s: dict):
    from transformers import AutoTokenizer

    return open_model(build_hf(dev, s), tokenizer=AutoTokenizer.from_pretrained(demo_model_path()))


def token_batches(lm, ctx: int, rows: int, batch_size: int):
    from sc_steer.data import iter_batches, iter_documents, iter_rows, pad_token_id

    it = iter_batches(iter_rows(iter_documents("demo:heldout"), lm.tokenizer, ctx), batch_size, ctx,
                      pad_token_id(lm.tokenizer))
    return [next(it) for _ in range(rows // batch_size)]


def collection(lm, dev: torch.device, s: dict, work: Path) -> dict:
    from safetensors.torch import save_file

    from sc_steer import collect

    ctx, bs = s["ctx"], 4
    batches = token_batches(lm, ctx, 64, bs)          # last block: 16 batches of 4 x 1024 tokens

    def plain(bb):
        with torch.no_grad():
            for b in bb:
                lm.hf(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev))

    def ours(sites, bb):
        out = work / "collect"
        shutil.rmtree(out, ignore_errors=True)
        collect(lm, sites, "demo:heldout", out, ctx=ctx, batch_size=bs, max_tokens=sum(int(b.keep.sum()) for b in bb),
                progress=False)
        # each shard is fsynced before its rename (as the raw write below is): no system-wide sync here

    last = f"resid_post.{lm.n_layers - 1}"
    n_in = sum(int(b.attention_mask.sum()) for b in batches)
    t_plain, t_last = interleaved([lambda: plain(batches), lambda: ours(last, batches)], dev, repeats=3)
    few = batches[:4]                                  # all blocks: 4 batches, ~4 GB written a run
    n_few = sum(int(b.attention_mask.sum()) for b in few)
    t_plain_few = timed(lambda: plain(few), dev, repeats=1)
    def all_blocks():
        ours("resid_post.*", few)

    t_all_cold = timed(all_blocks, dev, repeats=1, warmup=0)   # this first run allocates the pinned shard buffers
    t_all = timed(all_blocks, dev, repeats=1, warmup=0)
    nbytes = sum(p.stat().st_size for p in (work / "collect").rglob("*.safetensors"))
    kept = sum(int(b.keep.sum()) for b in few)
    tensors = {f"act.{i}": torch.randn(kept, lm.d_model, dtype=lm.dtype) for i in range(lm.n_layers)}

    def raw_write():
        p = work / "raw.safetensors"
        save_file(tensors, str(p))
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        p.unlink()

    t_raw = timed(raw_write, torch.device("cpu"), repeats=1, warmup=0)
    raw_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    shutil.rmtree(work / "collect", ignore_errors=True)
    return {"input_tokens": n_in, "plain_tok_s": n_in / t_plain, "last_block_tok_s": n_in / t_last,
            "last_block_overhead_pct": 100 * (t_last / t_plain - 1), "all_blocks_input_tokens": n_few,
            "all_blocks_plain_tok_s": n_few / t_plain_few, "all_blocks_tok_s": n_few / t_all,
            "all_blocks_cold_tok_s": n_few / t_all_cold, "all_blocks_write_gbs": nbytes / t_all / 1e9,
            "raw_write_gbs": raw_bytes / t_raw / 1e9, "write_fraction_of_raw": (nbytes / t_all) / (raw_bytes / t_raw)}


def stream_training(lm, dev: torch.device, s: dict, work: Path) -> dict:
    from sc_steer.pipeline import train_from_model
    from sc_steer.sae.config import config_from_dict

    steps = 24
    cfg = config_from_dict({"sites": ["resid_post.*"], "batch_size": s["batch"], "tokens": s["batch"] * steps,
                            "autocast": dev.type == "cuda", "checkpoint_every": 1 << 30,
                            "sae": {"architecture": "topk", "d_sae": s["stream_d_sae"], "k": s["k"]}})
    out = work / "stream"
    t = time.perf_counter()
    _, where = python_profile(lambda: train_from_model(lm, "demo:heldout", cfg, out, ctx=256, device=dev,
                                                       progress=False))
    sync(dev)
    dt = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"sites": lm.n_layers, "d_sae": s["stream_d_sae"], "tokens": s["batch"] * steps,
            "tokens_per_s": s["batch"] * steps / dt, "seconds": dt, "host_time_by_function": where,
            "note": "under cProfile; includes filling the shuffle buffer (model_source caps it at 8 GiB for all sites) "
                    "before the first step and saving the 32 SAEs"}


def random_topk_sae(d_in: int, d_sae: int, k: int, dev: torch.device, seed: int):
    from sc_steer.sae import SAEConfig, make_sae

    torch.manual_seed(seed)
    return make_sae(SAEConfig("topk", d_in, d_sae, k=k)).to(dev).eval()


def graph(lm, dev: torch.device, s: dict) -> dict:
    from sc_steer.graph.measure import measure_pair
    from sc_steer.graph.naive import naive_effects

    n = lm.n_layers // 2
    a = random_topk_sae(lm.d_model, s["graph_d_sae"], s["k"], dev, 1)
    b = random_topk_sae(lm.d_model, s["graph_d_sae"], s["k"], dev, 2)
    batches = token_batches(lm, 128, 8, 8)
    few = list(range(0, 4 * 97, 97))
    many = torch.randperm(s["graph_d_sae"], generator=torch.Generator().manual_seed(0))[:32].sort().values
    t_naive = timed(lambda: naive_effects(lm, n, a, b, batches, few), dev, repeats=1)
    res = {}
    t_few = timed(lambda: res.setdefault("few", measure_pair(lm, n, a, b, batches, few)), dev, repeats=1)
    ref = naive_effects(lm, n, a, b, batches, few)
    err = max(float((res["few"].effect[r].cpu() - ref[i][0].cpu()).abs().max()) for r, i in enumerate(few))
    t_many = timed(lambda: measure_pair(lm, n, a, b, batches, many), dev, repeats=1)
    edges = len(many) * s["graph_d_sae"]
    return {"layer": n, "positions": res["few"].count, "naive_s_per_source": t_naive / len(few),
            "batched_s_per_source_4": t_few / len(few), "speedup_4_sources": t_naive / t_few,
            "batched_edges_per_s_32_sources": edges / t_many, "max_abs_diff_vs_naive": err}


def prompt_graph(lm, dev: torch.device, s: dict) -> dict:
    """A 32-token prompt's graph over the model's last four layers (so its logit edges are in), every
    edge one removal, against one full forward per removal for a sample of them."""
    from sc_steer.data import iter_documents
    from sc_steer.graph.prompt_measure import measure_prompt
    from sc_steer.sites import Site

    layers = list(range(lm.n_layers - 4, lm.n_layers))
    saes = {f"resid_post.{n}": random_topk_sae(lm.d_model, s["graph_d_sae"], s["k"], dev, 10 + n) for n in layers}
    doc = next(d for d in iter_documents("demo:heldout") if len(lm.tokenizer(d)["input_ids"]) > 40)
    prompt = lm.tokenizer.decode(lm.tokenizer(doc, add_special_tokens=False)["input_ids"][:32])
    measure_prompt(lm, saes, "warm up")
    res = {}
    t = timed(lambda: res.setdefault("pe", measure_prompt(lm, saes, prompt)), dev, repeats=1)
    pe = res["pe"]
    removals = sum(len(pe.nodes[n]) for n in layers[:-1])
    n0 = layers[0]

    def one(r):
        pos, i = (int(x) for x in pe.nodes[n0][r])

        def edit(site, h, _call):
            if site.layer == n0:
                h = h.clone()
                h[0, pos] -= pe.acts[n0][r].to(h.device, h.dtype) * saes[f"resid_post.{n0}"].W_dec[i].to(h.dtype)
                return h
            return None
        with torch.no_grad(), lm.edited(edit, [Site("resid_post", n0)]):
            lm.hf(input_ids=torch.tensor([pe.token_ids], device=dev))
    sample = list(range(0, len(pe.nodes[n0]), max(1, len(pe.nodes[n0]) // 16)))[:16]
    t_naive = timed(lambda: [one(r) for r in sample], dev, repeats=1) / len(sample)
    return {"layers": layers, "tokens": len(pe.token_ids), "nodes_per_layer": [len(pe.nodes[n]) for n in layers],
            "removals": removals, "seconds": t, "naive_s_per_removal": t_naive,
            "speedup_vs_naive": t_naive * removals / t}


def steer_evaluation(lm, dev: torch.device, s: dict) -> dict:
    """``steer_eval``: every method on two features, two coefficients, four prompts, greedy and one seed."""
    from sc_steer.steer.compare import steer_eval
    from sc_steer.steer.methods import feature_facts

    site = f"resid_post.{lm.n_layers // 4}"
    saes = {site: random_topk_sae(lm.d_model, s["graph_d_sae"], s["k"], dev, 5)}
    t0 = time.perf_counter()
    facts, _ = feature_facts(lm, saes, [(site, i) for i in range(64)], "demo:heldout", max_tokens=4000, progress=False)
    usable = [(f.site, f.feature) for f in facts][:2]
    t_facts = time.perf_counter() - t0
    prompts = ["In the beginning", "HAMLET. To be, or not", "The cat (noun):", "And the LORD said unto"]
    t = time.perf_counter()
    out = steer_eval(lm, saes, usable, prompts, coeffs=[2.0, 8.0], max_new_tokens=16, seeds=(0,),
                     vector_data="demo:heldout", vector_tokens=4000, progress=False)
    secs = time.perf_counter() - t
    n = len(out["samples"])
    return {"features": len(usable), "seconds_feature_facts": t_facts, "seconds": secs, "samples": n}


def interpretation(lm, dev: torch.device, s: dict, work: Path) -> dict:
    """Whole ``interpret`` runs at two corpus lengths: their difference gives the streaming rate (model,
    SAE, statistics on the device) and what is left the one-off read-out of every unit's record."""
    from sc_steer.interpret import interpret

    n = lm.n_layers // 2
    sae = random_topk_sae(lm.d_model, s["graph_d_sae"], s["k"], dev, 3)
    short, long = (4096, 12288) if dev.type == "cuda" else (1024, 8192)
    secs = {}
    for neurons, tokens in ((False, 256), (False, short), (False, long), (True, short)):   # the first: a warm-up
        t = time.perf_counter()
        interpret(lm, {f"resid_post.{n}": sae}, "demo:heldout", work / f"interp{neurons}{tokens}", max_tokens=tokens,
                  ctx=256, neurons=neurons, progress=False)
        secs[(neurons, tokens)] = time.perf_counter() - t
    extra = secs[(False, long)] - secs[(False, short)]
    stream_tok_s = (long - short) / extra if extra > 0 else float("nan")   # nan: lost in the noise
    return {"tokens": short, "units_sae": s["graph_d_sae"], "units_neurons": lm.d_model + s["intermediate_size"],
            "tok_s": {"sae_only": short / secs[(False, short)], "with_neurons": short / secs[(True, short)]},
            "streaming_tok_s_sae_only": stream_tok_s,
            "readout_s_sae_only": secs[(False, short)] - short / stream_tok_s}


def steering(lm, dev: torch.device, s: dict) -> dict:
    from sc_steer.steer import Intervention, Recipe, generate
    from sc_steer.steer.generate import tokenize_prompts

    n = lm.n_layers // 4
    sae = random_topk_sae(lm.d_model, s["graph_d_sae"], s["k"], dev, 4)
    saes = {f"resid_post.{n}": sae}
    prompt = ["Ge1:1 In the beginning God created the heaven and the earth."]
    new = 64
    lm.hf.generation_config.min_new_tokens = new
    vec = torch.randn(lm.d_model).tolist()
    add = Recipe([Intervention(f"resid_post.{n}", None, "add", 4.0, "all", vec)])
    remove = Recipe([Intervention(f"resid_post.{n}", 5, "remove")])

    # nnsight installs its own forward on every module of the model it wraps (a few microseconds a call
    # outside traces too), so transformers' generate is timed on the wrapped model and on a plain one
    plain_model = build_hf(dev, s)
    plain_model.generation_config.min_new_tokens = new

    def hf(model):
        with torch.no_grad():
            model.generate(**tokenize_prompts(lm, prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=lm.tokenizer.pad_token_id)

    t_hf, t_plain, t_add, t_remove = interleaved(
        [lambda: hf(lm.hf), lambda: hf(plain_model), lambda: generate(lm, prompt, add, saes, max_new_tokens=new),
         lambda: generate(lm, prompt, remove, saes, max_new_tokens=new)], dev, repeats=4)
    del plain_model
    _, where = python_profile(lambda: generate(lm, prompt, remove, saes, max_new_tokens=new))
    return {"hf_generate_ms_per_token": 1e3 * t_hf / new, "hf_generate_plain_model_ms_per_token": 1e3 * t_plain / new,
            "add_vector_ms_per_token": 1e3 * t_add / new, "remove_feature_ms_per_token": 1e3 * t_remove / new,
            "remove_host_time_by_function": where}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny shape, for a dry run on the CPU")
    ap.add_argument("--out", default="bench_gpu.json", help="where the figures go (JSON)")
    ap.add_argument("--only", help="comma-separated sections: ceilings,train,profile,collect,stream,graph,"
                    "prompt_graph,steer_eval,interpret,steer")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as users run: TF32 for fp32 matmuls
    s = SHAPES["small" if args.small else "7b"]
    only = set(args.only.split(",")) if args.only else None
    work = Path(tempfile.mkdtemp(prefix="sc_steer_bench_gpu_"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    res: dict = {"device": name, "torch": torch.__version__, "shape": "small" if args.small else "llama-2-7b",
                 "sections": {}, "errors": {}}

    def run(section: str, fn) -> None:
        if only and section not in only:
            return
        t = time.perf_counter()
        try:
            res["sections"][section] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' figures
            res["errors"][section] = "".join(traceback.format_exception_only(type(e), e)).strip()
            traceback.print_exc()
        print(f"[{section}] {time.perf_counter() - t:.1f} s: {json.dumps(res['sections'].get(section))}", flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))

    run("ceilings", lambda: ceilings(dev, args.small))
    peak = res["sections"].get("ceilings", {}).get("matmul_tflops", 1.0)
    run("train", lambda: sae_training(dev, s, dev.type == "cuda", peak))
    run("profile", lambda: profile_topk_step(dev, s))
    lm = build_model(dev, s)
    run("collect", lambda: collection(lm, dev, s, work))
    run("steer", lambda: steering(lm, dev, s))
    run("stream", lambda: stream_training(lm, dev, s, work))
    run("graph", lambda: graph(lm, dev, s))
    run("prompt_graph", lambda: prompt_graph(lm, dev, s))
    run("steer_eval", lambda: steer_evaluation(lm, dev, s))
    run("interpret", lambda: interpretation(lm, dev, s, work))
    shutil.rmtree(work, ignore_errors=True)
    print(summary(res))


def summary(res: dict) -> str:
    sec = res["sections"]
    lines = [f"sc-steer GPU benchmark: {res['device']}, torch {res['torch']}, {res['shape']} shape"]
    if "ceilings" in sec:
        c = sec["ceilings"]
        lines.append(f"ceilings: {c['matmul_dtype']} matmul {c['matmul_tflops']:.1f} TFLOP/s, copy {c['copy_gbs']:.0f} GB/s")
    train = sec.get("train", {})
    for arch, r in train.items():
        if "plain_ms" not in r:
            lines.append(f"train step {arch:16s}: {r['ms']:7.1f} ms ({r['pct_of_peak']:.0f}% of peak, dense-equiv.)")
            continue
        lines.append(f"train step {arch:16s}: {r['ms']:7.1f} ms ({r['pct_of_peak']:.0f}% of peak, dense-equiv.) "
                     f"| plain dense step {r['plain_ms']:7.1f} ms | ratio {r['ms'] / r['plain_ms']:.2f}"
                     + (f" | kernels {r['kernels']}" if r.get("kernels", "-") != "-" else ""))
    for ours, theirs in (("topk", "sparsify_topk"), ("topk+auxk", "sparsify_topk+auxk")):
        if ours in train and theirs in train:
            lines.append(f"{ours} step against sparsify: {train[theirs]['ms'] / train[ours]['ms']:.2f}x faster")
    if "collect" in sec:
        c = sec["collect"]
        lines.append(f"collect: plain fwd {c['plain_tok_s']:,.0f} tok/s | last block {c['last_block_tok_s']:,.0f} tok/s "
                     f"({c['last_block_overhead_pct']:+.0f}%) | all blocks {c['all_blocks_tok_s']:,.0f} tok/s "
                     f"(first run {c['all_blocks_cold_tok_s']:,.0f}; plain fwd {c['all_blocks_plain_tok_s']:,.0f}), "
                     f"{c['all_blocks_write_gbs']:.2f} GB/s vs raw write {c['raw_write_gbs']:.2f} GB/s "
                     f"({100 * c['write_fraction_of_raw']:.0f}%)")
    if "stream" in sec:
        c = sec["stream"]
        lines.append(f"train from the model, {c['sites']} sites, d_sae {c['d_sae']}: {c['tokens_per_s']:,.0f} tok/s")
    if "graph" in sec:
        g = sec["graph"]
        lines.append(f"graph L{g['layer']}->{g['layer'] + 1}: naive {g['naive_s_per_source']:.2f} s/source, batched "
                     f"{g['batched_s_per_source_4']:.2f} s/source ({g['speedup_4_sources']:.1f}x), "
                     f"{g['batched_edges_per_s_32_sources']:,.0f} edges/s at 32 sources, max diff "
                     f"{g['max_abs_diff_vs_naive']:.1e}")
    if "prompt_graph" in sec:
        g = sec["prompt_graph"]
        lines.append(f"per-prompt graph ({g['tokens']} tokens, layers {g['layers'][0]}-{g['layers'][-1]}, "
                     f"{g['removals']:,} removals): {g['seconds']:.2f} s, {g['speedup_vs_naive']:.1f}x one full "
                     f"forward per removal ({g['naive_s_per_removal'] * 1e3:.1f} ms each)")
    if "steer_eval" in sec:
        e = sec["steer_eval"]
        lines.append(f"steer-eval ({e['features']} features x 5 methods x 2 coefficients x 4 prompts x 2 decodings, "
                     f"16 tokens): {e['seconds']:.1f} s (+ {e['seconds_feature_facts']:.1f} s reading 4,000 tokens)")
    if "interpret" in sec:
        i = sec["interpret"]
        lines.append(f"interpret ({i['tokens']:,} tokens): {i['tok_s']['sae_only']:,.0f} tok/s (SAE only), "
                     f"{i['tok_s']['with_neurons']:,.0f} tok/s (with neuron baselines); SAE only: streaming "
                     f"{i['streaming_tok_s_sae_only']:,.0f} tok/s + read-out of {i['units_sae']:,} units "
                     f"{i['readout_s_sae_only']:.1f} s")
    if "steer" in sec:
        st = sec["steer"]
        lines.append(f"steer (64 tokens): HF generate {st['hf_generate_ms_per_token']:.1f} ms/tok (on a model not "
                     f"wrapped by nnsight {st['hf_generate_plain_model_ms_per_token']:.1f}) | add vector "
                     f"{st['add_vector_ms_per_token']:.1f} | remove feature {st['remove_feature_ms_per_token']:.1f}")
    for k, v in res["errors"].items():
        lines.append(f"ERROR in {k}: {v}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
