"""The commands of ``sc-steer`` and their flags."""
from __future__ import annotations

import argparse

from .commands import (
    cmd_app,
    cmd_collect,
    cmd_demo,
    cmd_eval,
    cmd_graph,
    cmd_import,
    cmd_interpret,
    cmd_probe,
    cmd_steer,
    cmd_steer_eval,
    cmd_steerability,
    cmd_train,
)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the model (and the SAEs with it) runs: cpu, cuda, "
                   "cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="the model's dtype: float32, bfloat16, float16 or auto; "
                   "SAEs stay float32 (default: float32)")


def _add_model_args(p: argparse.ArgumentParser, default: str | None = "demo") -> None:
    p.add_argument("--model", default=default, help="'demo' (shipped), a local folder or a hub id "
                   + ("(default: demo)" if default else "(default: the run's own model)"))
    _add_device_args(p)
    p.add_argument("--remote", choices=["ndif", "local"], help="run traces on NDIF (needs NDIF_API_KEY), or "
                   "through nnsight's remote serialisation path locally")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``error:`` line (exit status 2), like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..graph.build import PRUNE, RANK_BY
    from ..graph.measure import MODES as ABLATION_MODES
    from ..graph.measure import WHERE
    from ..sae.train import PARALLEL_MODES
    from ..steer import MODE_DOCS, POSITIONS
    from ..steer.compare import DEFAULT_COEFFS, MIN_FLUENCY
    from ..steer.methods import METHODS as STEER_METHODS
    from ..steer.steerability import SCALE as STEER_SCALE

    ap = _Parser(prog="sc-steer", description="sparse autoencoders on LM activations: "
                                 "collect, train, interpret, graph, steer")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="collect residual-stream (or MLP / attention) activations to disk")
    _add_model_args(p)
    p.add_argument("--data", default="demo", help="demo, demo:heldout, a .txt/.jsonl(.gz) file, a folder, "
                   "or hf:NAME[:CONFIG]:SPLIT (default: demo)")
    p.add_argument("--field", default="text", help="JSONL / dataset text field (default: text)")
    p.add_argument("--split", default="file", choices=["file", "line", "paragraph"],
                   help="how a text file is cut into documents (default: file)")
    p.add_argument("--sites", default="resid_post.*", help="comma-separated sites, e.g. resid_post.*, "
                   "resid_post.0-3,mlp_out.2 (default: resid_post.*)")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--ctx", type=int, default=256, help="context length in tokens, BOS included (default: 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, help="stop after this many stored tokens")
    p.add_argument("--shard-tokens", type=int, default=1 << 14, help="tokens per shard file (default: 16384)")
    p.add_argument("--store-dtype", help="float32, float16 or bfloat16 (default: the model's dtype)")
    p.add_argument("--packing", default="pad", choices=["pad", "pack"],
                   help="pad: one document per row group; pack: concatenate documents (default: pad)")
    p.add_argument("--no-bos", action="store_true", help="do not start rows with BOS")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train one SAE per site (from a collection, or streaming from the model)")
    p.add_argument("--activations", help="an activation collection folder (default: stream from --model)")
    _add_model_args(p)
    p.add_argument("--data", default="demo", help="text to stream activations from when no --activations")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--out", required=True, help="run folder: saes/<site>/, checkpoint, logs, curves")
    p.add_argument("--config", help="a .toml / .yaml / .json training config; flags below override it")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--force", action="store_true", help="start over in an --out that holds another run")
    p.add_argument("--parallel", choices=PARALLEL_MODES, help="under torchrun: 'layers' gives each process its "
                   "share of the sites; 'data' splits every batch over the processes (needs --activations)")
    p.add_argument("--sites", help="e.g. resid_post.* or resid_post.1,resid_post.2")
    p.add_argument("--tokens", type=int, help="training tokens per SAE")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--architecture", help="relu, topk, batchtopk or jumprelu")
    p.add_argument("--k", type=int)
    p.add_argument("--expansion", type=int)
    p.add_argument("--d-sae", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--l1-coeff", type=float)
    p.add_argument("--l0-coeff", type=float)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="L0, FVU, dead/dense fractions, CE loss recovered and KL per site")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--data", default="demo:heldout")
    p.add_argument("--max-tokens", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("interpret", help="top tokens, contexts, logit lens and scores for SAE features and "
                       "neurons; a static HTML browser")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--data", default="demo:heldout")
    p.add_argument("--sites", help="only these SAE sites (default: all in the run)")
    p.add_argument("--max-tokens", type=int, default=200_000)
    p.add_argument("--top-n", type=int, default=100, help="top activations kept per unit (scored; 10 are shown)")
    p.add_argument("--window", type=int, default=8, help="tokens either side of a top activation")
    p.add_argument("--min-count", type=int, default=5, help="occurrences a token needs for the top-token table")
    p.add_argument("--no-neurons", action="store_true", help="skip the residual-dimension and MLP-neuron baseline")
    p.set_defaults(func=cmd_interpret)

    p = sub.add_parser("probe", help="sparse probing: how well K SAE features (and K neurons) tell labelled texts "
                       "apart")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--data", default="demo:heldout", help="demo:heldout (labels source, pos) or a .jsonl(.gz) file "
                   "with a text and a label field (default: demo:heldout)")
    p.add_argument("--label", default="source", help="the label: a field of the JSONL file, or for the demo corpus "
                   "source or pos (default: source)")
    p.add_argument("--field", default="text", help="the JSONL text field (default: text)")
    p.add_argument("--max-per-label", type=int, default=500, help="texts of each label at most (default: 500)")
    p.add_argument("--ctx", type=int, default=128, help="tokens of each text read, BOS included (default: 128)")
    p.add_argument("--no-neurons", action="store_true", help="probe SAE features only")
    p.add_argument("--seed", type=int, default=0, help="which texts, and how they are halved")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("graph", help="ablate features at layer n, measure layer n+1 features, export a graph")
    p.add_argument("--run", required=True, help="a run folder with saes/ (labels come from its interpretation)")
    _add_model_args(p, default=None)
    p.add_argument("--prompts", default="demo:heldout", help="a .txt file (one prompt per line) or a data spec")
    p.add_argument("--max-prompts", type=int, default=64)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--out", required=True, help="output folder, e.g. graphs/my-graph")
    p.add_argument("--name", default="graph")
    p.add_argument("--layers", help="source layers N or N-M (default: all but the last); with --prompt the graph's "
                   "layers (default: all with an SAE)")
    p.add_argument("--sources", default="active", help="active, top:N, attr:N, or ids like 3,17,42")
    p.add_argument("--mode", default="zero", choices=ABLATION_MODES)
    p.add_argument("--value", type=float, help="the clamp value")
    p.add_argument("--where", default="all", choices=WHERE, help="ablate at all text positions or "
                   "only where the source fires")
    p.add_argument("--prompt", help="one prompt's graph instead: (feature, position) nodes down to the logits, "
                   "edges from one removal each, pruned by influence on the logits (--prompts and the ablation "
                   "options are then unused)")
    p.add_argument("--prune", choices=PRUNE + ("influence",), help="top_k, relative or cumulative per source "
                   "(default top_k); influence (per-prompt graphs' default): the nodes carrying --amount of the "
                   "influence on the logits")
    p.add_argument("--amount", type=float, help="k for top_k; a fraction for relative/cumulative/influence "
                   "(defaults: 5, or 0.8 for influence)")
    p.add_argument("--edge-amount", type=float, default=0.98, help="influence pruning: the share of edge "
                   "influence kept among the kept nodes (default 0.98)")
    p.add_argument("--logits", type=int, default=10, help="per-prompt graphs: at most this many logit nodes, "
                   "the most likely next tokens until 0.95 of the probability (default 10)")
    p.add_argument("--logit-diff", nargs=2, metavar=("TOKEN_A", "TOKEN_B"), help="score faithfulness on the "
                   "logit difference of two single tokens instead of the model's own next token's log-prob")
    p.add_argument("--rank-by", default="weight", choices=RANK_BY)
    p.add_argument("--no-attribution", action="store_true")
    p.add_argument("--curve", help="also score the graph pruned at these amounts (comma-separated, e.g. 1,2,5,10): "
                   "faithfulness.png, faithfulness and completeness against the edges kept")
    p.add_argument("--force", action="store_true", help="replace another graph in --out")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("import", help="make a run folder from published SAEs (SAELens, dictionary_learning, "
                       "sparsify, Gemma Scope, Llama Scope) so every command serves them")
    p.add_argument("paths", nargs="*", metavar="PATH", help="SAE folders, or folders of them (each placed at the "
                   "site its own files name)")
    p.add_argument("--site", action="append", default=[], metavar="SITE=PATH",
                   help="place the SAE at PATH at SITE (repeat; for files that name no hook point)")
    p.add_argument("--out", required=True, help="the run folder to make")
    _add_model_args(p, default=None)
    p.add_argument("--force", action="store_true", help="replace another run in --out")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("steer", help="generate with SAE features added / removed; baseline and steered side by side")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    for mode, (value, what) in MODE_DOCS.items():
        p.add_argument(f"--{mode}", action="append", metavar="SITE:FEATURE" + (f":{value}" if value else ""), help=what)
    p.add_argument("--positions", default="all", choices=POSITIONS)
    p.add_argument("--include-bos", action="store_true",
                   help="also edit the BOS position (left alone by default: no SAE was trained on it)")
    p.add_argument("--recipe", help="a recipe JSON (interventions above are appended)")
    p.add_argument("--save-recipe", help="write the recipe used to this JSON file")
    p.add_argument("--force", action="store_true", help="let --save-recipe replace an existing file")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("steer-eval", help="score steering methods side by side on the same prompts "
                       "(concept, fluency, side effect; matched cost)")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--features", help="SITE:ID,SITE:ID,..., top:N[:SITE] (by steerability) or sample:N[:SITE]")
    p.add_argument("--recipe", help="steer-evaluate the features of this recipe")
    p.add_argument("--prompts", help="a .txt file (one prompt per line), a .json list of prompts, or a data "
                   "spec whose documents' openings are the prompts (default: demo:heldout)")
    p.add_argument("--n-prompts", type=int, default=8, help="openings taken from a data spec (default: 8)")
    p.add_argument("--methods", default=",".join(STEER_METHODS), help="comma-separated, of "
                   f"{', '.join(STEER_METHODS)} (default: all)")
    p.add_argument("--coeffs", default=",".join(f"{c:g}" for c in DEFAULT_COEFFS),
                   help="the coefficient grid (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seeds", default="0", help="sampled decodings, one per seed, next to greedy "
                   "(comma-separated; 'none' for greedy only; default: 0)")
    p.add_argument("--no-greedy", action="store_true", help="sampled decodings only")
    p.add_argument("--min-fluency", type=float, default=MIN_FLUENCY, help="the matched-cost bound on "
                   "normalised fluency (default: %(default)s)")
    p.add_argument("--vector-data", default="demo", help="text the contrast pairs, mean differences and "
                   "prompting text are taken from (default: demo, the training split)")
    p.add_argument("--vector-tokens", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0, help="which features sample:N draws")
    p.add_argument("--out", help="output folder (default: RUN/steer_eval)")
    p.set_defaults(func=cmd_steer_eval)

    p = sub.add_parser("steerability", help="the output score of every feature (how much pushing it raises "
                       "its own logit-lens tokens), stored beside the interpretation records")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--sites", help="comma-separated sites (default: every site of the run)")
    p.add_argument("--prompts", help="a .txt file (one prompt per line) or a data spec (default: demo:heldout)")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--scale", type=float, default=STEER_SCALE, help="the push, as a share of the site's mean "
                   "residual norm (default: %(default)s)")
    p.set_defaults(func=cmd_steerability)

    p = sub.add_parser("app", help="the Gradio steering playground for one or more runs")
    p.add_argument("--run", action="append", required=True, help="a run folder (repeat to offer several)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=200, help="the most tokens one request may generate")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="the longest prompt one request may send")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds one generation may hold the model; "
                   "it stops there and returns what it has (default: 60)")
    _add_device_args(p)
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("demo", help="train -> eval -> interpret -> graph on the shipped demo model, offline "
                       "(a few minutes on a laptop CPU; rerun to resume)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--full", action="store_true", help="the longer budgets: 1,228,800 training tokens per SAE, "
                   "50,000 evaluation and 200,000 interpretation tokens (default: 614,400 / 25,000 / 100,000)")
    p.add_argument("--train-tokens", type=int, help="training tokens per SAE (streamed from the model)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens to evaluate on")
    p.add_argument("--interpret-tokens", type=int, help="held-out tokens to interpret on")
    p.add_argument("--force", action="store_true", help="start over in a folder that holds another run")
    _add_device_args(p)
    p.set_defaults(func=cmd_demo)
    return ap
