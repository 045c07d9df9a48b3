"""A scripted mutation run: does the test suite notice when the science code is wrong?

    OMP_NUM_THREADS=1 python tests/mutation_run.py                 # every mutant (about 15 minutes)
    OMP_NUM_THREADS=1 python tests/mutation_run.py --only steer    # mutants of files matching "steer"

Each mutant is one deliberate bug (a sign, a mask, a target value, an off-by-one) in one of the files
whose numbers users rely on: edits.py, graph/measure.py, graph/attribution.py, graph/prompt_*.py,
graph/faithfulness.py, steer/*.py,
interpret/stats.py, interpret/lens.py, interpret/tokens.py, interpret/explain.py, interpret/lookup.py,
interpret/features.py, interpret/pool.py and sae/*.py. The package and the tests
are copied to a scratch folder, the mutant is applied there, and the tests that cover that file run
(stopping at the first failure). A mutant is killed when a test fails. Prints the share killed per file
and writes ``mutation_results.json``. Not collected by pytest (its name does not start with test_).

Left out as equivalent (no test can tell them apart): dropping the decoder-norm weight of ReLU's L1
term (decoder rows are kept at unit norm and the radial gradient is projected out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRAPH, STEER, INTERP = ["tests/test_graph.py"], ["tests/test_steer.py"], ["tests/test_interpret.py"]
EXPLAIN = ["tests/test_explain.py", "tests/test_interpret.py"]
SPARSE_READ = ["tests/test_sparse_interpret.py", "tests/test_explain.py"]
STEER_EVAL = ["tests/test_steer_eval.py"]
FORMATS = ["tests/test_peer_formats.py"]
PROMPT_GRAPH = ["tests/test_prompt_graph.py"]
SAE = ["tests/test_sparse_step.py", "tests/test_resample.py", "tests/test_sae.py", "tests/test_train.py"]

# (file, exact text, replacement, tests that should notice)
MUTANTS = [
    ("edits.py", "        return -f\n", "        return 1 - f\n", GRAPH + STEER),
    ("graph/measure.py", "v = means.to(f_i.device, f_i.dtype)[:, None, None] if",
     "v = 0 * means.to(f_i.device, f_i.dtype)[:, None, None] if", GRAPH),
    ("graph/measure.py", "        scale = scale * (f_i > 0)", "        scale = scale", GRAPH),
    ("graph/measure.py", "pre_clean[rb[qm], qt] + sc[qm, qt, None]", "pre_clean[rb[qm], qt] - sc[qm, qt, None]", GRAPH),
    ("graph/measure.py", "[None] >= first[:, None]) & keep[rb]", "[None] > first[:, None]) & keep[rb]", GRAPH),
    ("graph/measure.py", "part_sq.index_add_(0, kk, diff.pow(2))", "part_sq.index_add_(0, kk, diff.abs())", GRAPH),
    ("graph/measure.py", "        count += int(keep.sum())", "        count += int(keep.sum()) + 1", GRAPH),
    ("graph/attribution.py", "out[:, c] += (scale * proj)", "out[:, c] -= (scale * proj)", GRAPH),
    ("graph/prompt_measure.py", "rows[torch.arange(len(pos), device=h.device), pos] -= amount",
     "rows[torch.arange(len(pos), device=h.device), pos] += amount", PROMPT_GRAPH),
    ("graph/prompt_measure.py", "return w * (tgt[None, :, 0] >= src_pos[:, None])",
     "return w * (tgt[None, :, 0] > src_pos[:, None])", PROMPT_GRAPH),
    ("graph/prompt_measure.py", "    w = clean[None] - g\n", "    w = g - clean[None]\n", PROMPT_GRAPH),
    ("graph/prompt_measure.py", "todo = (src[:, 0] == last).nonzero()", "todo = (src[:, 0] == last - 1).nonzero()",
     PROMPT_GRAPH),
    ("graph/prompt_measure.py", "n = int((p.cumsum(0) < min_prob).sum()) + 1", "n = int((p.cumsum(0) < min_prob).sum())",
     PROMPT_GRAPH),
    ("graph/prompt_measure.py", "torch.ones(len(embed_pos), device=dev), h[0, embed_pos]",
     "0.5 * torch.ones(len(embed_pos), device=dev), h[0, embed_pos]", PROMPT_GRAPH),
    ("graph/prompt_build.py", "return a / a.sum(0, keepdim=True).clamp_min(1e-30)", "return a / a.sum().clamp_min(1e-30)",
     PROMPT_GRAPH),
    ("graph/prompt_build.py", "out[n] = _share_in(pe.edges[n]) @ out[n + 1]", "out[n] = pe.edges[n].abs().double() @ out[n + 1]",
     PROMPT_GRAPH),
    ("graph/prompt_build.py", "keep_sorted = ((vals.cumsum(0) - vals) < amount * total)",
     "keep_sorted = (vals.cumsum(0) < 0.5 * amount * total)", PROMPT_GRAPH),
    ("graph/faithfulness.py", "where = torch.zeros_like(keep).scatter_(1, last[:, None], True) & keep",
     "where = torch.zeros_like(keep).scatter_(1, last[:, None] - 1, True) & keep", PROMPT_GRAPH),
    ("graph/faithfulness.py", "                m[t, i] = True", "                m[max(t - 1, 0), i] = True", PROMPT_GRAPH),
    ("graph/faithfulness.py", "completeness\": (full - without) / span", "completeness\": (full - only) / span",
     GRAPH + PROMPT_GRAPH),
    ("graph/attribution.py", "g = sae_next.encode(block_out.float()) * keep[..., None]",
     "g = sae_next.encode(block_out.float())", GRAPH),
    ("graph/attribution.py", "means[sources]", "means[sources] * 0", GRAPH),
    ("steer/generate.py", "        where[:, :-1] = False", "        where[:, 1:] = False", STEER),
    ("steer/generate.py", "        where &= ~bos.to(device)", "        where &= where", STEER),
    ("edits.py", "        return -f\n", "        return f\n", STEER),
    ("edits.py", "        return value - f", "        return value + f", STEER),
    ("edits.py", "        return (value - 1) * f", "        return value * f", STEER),
    ("steer/generate.py", 'if it.positions == "prompt" and not prefill', 'if it.positions == "prompt" and prefill',
     STEER),
    ("steer/effects.py", '"baseline": float(base_seen[(s, f)][n:].mean())',
     '"baseline": float(st_seen[(s, f)][n:].mean())', STEER),
    ("steer/vectors.py", '"against_by_cosine": ranked(cos, -1)', '"against_by_cosine": ranked(cos, 1)', STEER),
    ("steer/generate.py", "        prefill = call == 0", "        prefill = call <= 1", STEER),
    ("steer/generate.py", "edit_hidden(h, by_site[site], saes, masks, start if prefill else None)",
     "edit_hidden(h, by_site[site], saes, masks, None)", STEER),
    ("models.py", '                if site.kind == "mlp_act":', '                if site.kind == "mlp_out":', STEER),
    ("steer/scores.py", "torch.logsumexp(lp_u[:, 1:, concept", "torch.logsumexp(lp_u[:, :-1, concept", STEER_EVAL),
    ("steer/scores.py", "c = concept.read(h[:, -N:], saes)", "c = concept.read(h[:, -N - 1:-1], saes)", STEER_EVAL),
    ("steer/scores.py", "token_lp = lp_u[:, :-1].gather", "token_lp = lp_u[:, 1:].gather", STEER_EVAL),
    ("steer/scores.py", "kl = (lp_s.exp() * (lp_s - lp_u[:, :-1])).sum(-1)",
     "kl = (lp_u[:, :-1].exp() * (lp_u[:, :-1] - lp_s)).sum(-1)", STEER_EVAL),
    ("steer/scores.py", "return (is_eos.cumsum(1) - is_eos) == 0", "return is_eos.cumsum(1) == 0", STEER_EVAL),
    ("steer/scores.py", "logits, h = teacher_forced(lm, inputs, n, list(its), saes, read)",
     "logits, h = teacher_forced(lm, inputs, n + 1, list(its), saes, read)", STEER_EVAL),
    ("steer/effects.py", "position_ids=position_ids(mask)", "position_ids=None", STEER_EVAL),
    ("steer/compare.py", "ok = [r for r in pick_rows if", "ok = [r for r in rows if", STEER_EVAL),
    ("steer/compare.py", "and r[\"F\"] >= min_fluency]", "]", STEER_EVAL),
    ("steer/compare.py", "return f * (min(1.0, (1 - rep) / (1 - base_rep))", "return f * (min(1.0, (1 - base_rep) / (1 - rep))",
     STEER_EVAL),
    ("steer/steerability.py", "text = inputs[\"attention_mask\"].bool() & ~bos_positions",
     "text = inputs[\"attention_mask\"].bool() | bos_positions", STEER_EVAL),
    ("steer/steerability.py", "push = (coeff * W[chunk]).repeat_interleave(P, 0)", "push = (coeff * W[chunk]).repeat(P, 1)",
     STEER_EVAL),
    ("sae/formats/common.py", "t[\"b_enc\"] = t[\"b_enc\"] + shift", "t[\"b_enc\"] = t[\"b_enc\"] - shift", FORMATS),
    ("sae/formats/common.py", "t[\"b_mag\"] = t[\"b_mag\"] + shift * t[\"r_mag\"].exp()",
     "t[\"b_mag\"] = t[\"b_mag\"] + shift", FORMATS),
    ("sae/formats/common.py", "t[\"b_enc\"] * n, t[\"W_dec\"] / n[:, None]", "t[\"b_enc\"], t[\"W_dec\"] / n[:, None]",
     FORMATS),
    ("sae/formats/dictionary_learning.py", "        fold_input_bias(t)\n        return t", "        return t", FORMATS),
    ("sae/formats/sparsify.py", "t[\"W_skip\"] = s[\"W_skip\"]", "t[\"W_skip\"] = s[\"W_skip\"].T", FORMATS),
    ("sae/formats/scope.py", "\"threshold\": torch.full((d_sae,), thr * scale)", "\"threshold\": torch.full((d_sae,), thr)",
     FORMATS),
    ("sae/formats/saelens.py", "        if not raw.get(\"apply_b_dec_to_input\", True):",
     "        if raw.get(\"apply_b_dec_to_input\", True):", FORMATS),
    ("sae/gated.py", "torch.relu(pi * self.r_mag.exp() + self.b_mag)", "torch.relu(pi + self.b_mag)", FORMATS),
    ("sites.py", "            site = Site(\"resid_post\", i - 1)", "            site = Site(\"resid_post\", i)", FORMATS),
    ("interpret/stats.py", "self.fires += pos.sum(0)", "self.fires += (acts >= 0).sum(0)", INTERP),
    ("interpret/stats.py", "(j < ends[ct][..., None])", "(j <= ends[ct][..., None])", INTERP),
    ("interpret/stats.py", "torch.sort(all_val, dim=1, descending=True, stable=True)",
     "torch.sort(all_val, dim=1, descending=False, stable=True)", INTERP),
    ("interpret/stats.py", "src = torch.where(from_old, head, head - self.top_n + self.n_windows)",
     "src = torch.where(from_old, head, head - self.top_n)", INTERP),
    ("interpret/stats.py", "sums[ids] / self.token_count[ids]", "sums[ids] / self.token_count[ids].clamp_min(2)",
     INTERP),
    ("interpret/lens.py", "        return d * gain", "        return d", INTERP),
    ("interpret/lens.py", "            d = d - d.mean(-1, keepdim=True)", "            d = d", INTERP),
    ("interpret/lens.py", "logits.topk(k, dim=-1, largest=False)", "logits.topk(k, dim=-1)", INTERP),
    ("interpret/stats.py", "ids) / counts).topk(k, dim=1)", "ids) / counts.clamp_min(2)).topk(k, dim=1)", INTERP),
    ("interpret/tokens.py", "(*(acts != 0).nonzero(as_tuple=True), None)", "(*(acts > 0).nonzero(as_tuple=True), None)",
     INTERP),
    ("interpret/tokens.py", "has_zero = self.count() < T", "has_zero = self.count() <= T", SPARSE_READ),
    ("interpret/tokens.py", "    take = slot < width", "    take = slot <= width", SPARSE_READ),
    ("interpret/stats.py", "best_per_row(which, v, t,", "best_per_row(which, -v, t,", SPARSE_READ),
    ("interpret/explain.py", "        zeros = T - nz.count()", "        zeros = T", SPARSE_READ),
    ("interpret/explain.py", "member_zeros = on - torch.bincount(u[member_nz], minlength=U)", "member_zeros = on",
     SPARSE_READ),
    ("interpret/explain.py", '(nz.extreme("amax"), nz.extreme("amin"))', '(nz.extreme("amin"), nz.extreme("amax"))',
     SPARSE_READ),
    ("interpret/pool.py", "full |= (s != 0).sum(1) > len(freq) - w", "full |= (s != 0).sum(1) > len(freq)", SPARSE_READ),
    ("interpret/pool.py", "(v - mu_b[u] * c[col]).pow(2) / c[col]", "(v - mu_b[u] * c[col]).pow(2)", SPARSE_READ),
    ("interpret/pool.py", "ok = valid[col] & ~in_freq[col]", "ok = valid[col]", SPARSE_READ),
    ('interpret/explain.py', '        half = int(held)', '        half = 0', EXPLAIN),
    ('interpret/explain.py', 's_pt + self.mu * (y - h_cov)', 's_pt', EXPLAIN),
    ('interpret/explain.py', '(acts - self.mu.float()).abs() >= self.threshold', 'acts >= self.threshold', EXPLAIN),
    ('interpret/explain.py', 'e_sum / e_cnt.clamp_min(1), torch.zeros_like', 'e.mean, torch.zeros_like', EXPLAIN),
    ('interpret/lookup.py', 'torch.where(tok, x - minus, torch.zeros_like(x))', 'torch.where(tok, x, torch.zeros_like(x))', EXPLAIN),
    ('interpret/lookup.py', '_sq_over(base_s - x_s, base_c - x_c) - ', '', EXPLAIN),
    ('interpret/features.py', 'if i % 2 == held]', 'if i % 2 == 0]', EXPLAIN),
    ("sae/topk.py", "vals = torch.relu(sel[:, :k])", "vals = sel[:, :k]", SAE),
    ("sae/topk.py", " * inputs.dead[aux_idx]", "", SAE),
    ("sae/sparse.py", "grad_b_dec = -row_dot(W_enc, g_sum)", "grad_b_dec = row_dot(W_enc, g_sum)", SAE),
    ("sae/sparse.py", "centred = x.to(g.dtype) - b_dec.to(g.dtype)", "centred = x.to(g.dtype) + b_dec.to(g.dtype)", SAE),
    ("sae/base.py", "g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=-1)",
     "g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=1)", SAE),
    ("sae/base.py", "        self.b_enc.div_(s)", "        self.b_enc.mul_(s)", SAE),
    ("sae/jumprelu.py", "grad_theta = (-(theta / eps)", "grad_theta = ((theta / eps)", SAE),
    ("sae/batchtopk.py", "batch.keep_top(torch.relu(pre), self.cfg.k * batch.rows(pre.shape[0]))", "batch.keep_top(torch.relu(pre), self.cfg.k)",
     SAE),
    ("sae/batchtopk.py", "            l1 = batch.mean_rows(out.f.sum(-1)) / (rms * math.sqrt(self.cfg.k))",
     "            l1 = batch.mean_rows(out.f.sum(-1)) / rms", SAE),
    ("sae/optim.py", "        return (step + 1) / w", "        return step / w", SAE),
    ("sae/state.py", "    st.since_fired.masked_fill_(counts > 0, 0)", "    st.since_fired.masked_fill_(counts > 1, 0)", SAE),
    ("sae/resample.py", "stronger = (fire_count[None, :] > c)", "stronger = (fire_count[None, :] < c)", SAE),
    ("sae/resample.py", "    sae.b_enc[idx] = 0\n", "\n", SAE),
    ("sae/resample.py", "            if state and key in state:\n                state[key][where] = 0\n",
     "            pass\n", SAE),
]


def run(only: str | None, timeout: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sc_steer_mutants_"))
    results = []
    try:
        for i, (rel, old, new, tests) in enumerate(MUTANTS):
            if only and only not in rel:
                continue
            src = (ROOT / "sc_steer" / rel).read_text()
            if src.count(old) != 1:
                results.append({"file": rel, "mutant": new.strip(), "status": "not applied (text not found once)"})
                continue
            box = work / f"m{i}"
            shutil.copytree(ROOT / "sc_steer", box / "sc_steer")
            shutil.copytree(ROOT / "tests", box / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(ROOT / "pyproject.toml", box / "pyproject.toml")
            (box / "sc_steer" / rel).write_text(src.replace(old, new))
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(box)}
            t = time.time()
            try:
                p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                   cwd=box, env=env, capture_output=True, text=True, timeout=timeout)
                status = "survived" if p.returncode == 0 else "killed"
                failed = next((ln for ln in p.stdout.splitlines() if ln.startswith("FAILED")), "")
            except subprocess.TimeoutExpired:
                status, failed = "killed (timeout)", ""
            results.append({"file": rel, "mutant": new.strip(), "status": status, "by": failed[:160],
                            "seconds": round(time.time() - t, 1)})
            print(f"{status:9s} {rel}: {new.strip()[:70]}  {failed[:90]}", flush=True)
            shutil.rmtree(box, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_file: dict = defaultdict(lambda: [0, 0])
    for r in results:
        if r["status"].startswith(("killed", "survived")):
            per_file[r["file"]][1] += 1
            per_file[r["file"]][0] += r["status"].startswith("killed")
    return {"results": results, "per_file": {f: {"killed": k, "total": n} for f, (k, n) in sorted(per_file.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the mutants of files whose path contains this")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default="mutation_results.json")
    args = ap.parse_args()
    res = run(args.only, args.timeout)
    Path(args.out).write_text(json.dumps(res, indent=1))
    total = [sum(v[k] for v in res["per_file"].values()) for k in ("killed", "total")]
    for f, v in res["per_file"].items():
        print(f"{f:28s} {v['killed']}/{v['total']} killed")
    print(f"all: {total[0]}/{total[1]} killed")
    for r in res["results"]:
        if not r["status"].startswith("killed"):
            print(f"  {r['status']}: {r['file']}: {r['mutant']}")


if __name__ == "__main__":
    main()
