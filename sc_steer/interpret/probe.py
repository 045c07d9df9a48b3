"""Sparse probing, offline (the recipe of SAEBench's ``sparse_probing``, with labels the text carries):
can K units of a set tell labelled texts apart?

Each text's representation is its units' mean activation over its tokens (BOS left out). For each
label, one binary task (this label against the others) on a stratified half of the texts: the K units
whose mean differs most between the two classes on the training half (``select_units``) feed a
logistic regression (class-balanced, on standardised inputs, fitted by Newton's method); the score is
its balanced accuracy on the other half, averaged over the label's tasks. Reported for K in
``PROBE_K`` per layer and unit set, so SAE features, residual dimensions and MLP neurons are judged
alike.

Labels: any JSONL file with a text field and a label field (one text per record), and two built into
the demo corpus: ``source`` (which corpus a line comes from: the Bible, Shakespeare or WordNet) and
``pos`` (the part of speech a WordNet gloss states, with the "(noun)" marker taken out of the text the
model reads). What it cannot see: what a unit means (a probe can ride on correlates of the label, such
as a book's spelling), and labels that the mean over a text washes out.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from tqdm import tqdm

from .. import validate
from ..activations import kept, run_sites, text_rows
from ..data import DEMO_DATA, Row, collate, iter_jsonl, pad_token_id
from ..devices import follow_model
from ..errors import ScSteerError
from ..models import LM
from ..sae import SAE
from .features import unit_sets

PROBE_K = (1, 2, 5, 20)
DEMO_LABELS = ("source", "pos")
_GLOSS = re.compile(r"^(?P<lemmas>[^\n(]+?) \((?P<pos>noun|verb|adjective|adverb)\): (?P<gloss>.+)$")


def labelled_texts(data: str, label: str, field: str = "text", max_per_label: int = 500,
                   seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs, at most ``max_per_label`` of each label (drawn with ``seed``)."""
    validate.integer("--max-per-label", max_per_label, 2)
    validate.seed("seed", seed)
    if data == "demo" or data.startswith("demo:"):
        items = _demo_items(data.partition(":")[2] or "heldout", label)
    else:
        items = _jsonl_items(Path(data), field, label)
    by: dict[str, list[str]] = {}
    for text, lab in items:
        by.setdefault(lab, []).append(text)
    rng = random.Random(seed)
    out = []
    for lab in sorted(by):
        texts = by[lab]
        rng.shuffle(texts)
        out += [(t, lab) for t in texts[:max_per_label]]
    enough = [lab for lab in by if len(by[lab]) >= 4]
    if len(enough) < 2:
        raise ScSteerError(f"--label {label!r}: needs at least two labels with 4 texts or more each "
                           f"(found {', '.join(f'{k}: {len(v)}' for k, v in sorted(by.items())) or 'none'})")
    return [(t, lab) for t, lab in out if lab in enough]


def _demo_items(split: str, label: str) -> list[tuple[str, str]]:
    if label not in DEMO_LABELS:
        raise ScSteerError(f"--label {label!r}: the demo corpus carries {', '.join(DEMO_LABELS)}")
    path = DEMO_DATA / f"{split}.jsonl.gz"
    if not path.exists():
        raise ScSteerError(f"data 'demo:{split}': expected demo:train or demo:heldout")
    items = []
    for _, rec in iter_jsonl(path):
        for text in rec["text"].splitlines():
            if not text.strip():
                continue
            if label == "source":
                items.append((text, rec["source"]))
            elif rec["source"] == "wordnet" and (m := _GLOSS.match(text)):
                items.append((f"{m['lemmas']}: {m['gloss']}", m["pos"]))
    return items


def _jsonl_items(path: Path, field: str, label: str) -> list[tuple[str, str]]:
    if not path.is_file() or not path.name.removesuffix(".gz").endswith(".jsonl"):
        raise ScSteerError(f"--data {str(path)!r}: expected a .jsonl or .jsonl.gz file with a text and a label "
                           "field (or demo, demo:heldout)")
    items = []
    for n, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str) or label not in rec:
            raise ScSteerError(f"{path}:{n}: expected a JSON object with a text field {field!r} and a label "
                               f"field {label!r}")
        if rec[field].strip():
            items.append((rec[field], str(rec[label])))
    return items


@torch.no_grad()
def unit_means(lm: LM, saes: dict[str, SAE], texts: list[str], *, ctx: int = 128, batch_size: int = 32,
               neurons: bool = True, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per unit set (the sets ``interpret`` reads): ``[len(texts), units]`` mean activations over each
    text's tokens (the first ``ctx - 1`` of them), float64 on the host."""
    follow_model(saes, lm)
    sets = unit_sets(lm, saes, neurons)
    sites = sorted({us.site for us in sets}, key=lambda s: s.order)
    bos, pad = lm.tokenizer.bos_token_id, pad_token_id(lm.tokenizer)
    rows = []
    for t in texts:
        ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"][:ctx - 1] or [pad]
        rows.append(Row([bos, *ids], [-1] + [0] * len(ids), [False] + [True] * len(ids)))
    out = {us.key: [] for us in sets}
    for i in tqdm(range(0, len(rows), batch_size), desc="probe", disable=not progress):
        b = collate(rows[i:i + batch_size], i, ctx, pad)
        acts = run_sites(lm, b, sites)
        where = text_rows(b)
        owner = b.row[:, None].expand_as(b.input_ids).reshape(-1)[where] - i      # each position's text
        n = torch.bincount(owner, minlength=len(b.row)).double()[:, None]
        for us in sets:
            f = us.encode(kept(acts[us.site], where).float()).double().cpu()
            out[us.key].append(torch.zeros(len(b.row), f.shape[1], dtype=torch.float64).index_add_(0, owner, f) / n)
    return {k: torch.cat(v) for k, v in out.items()}


def select_units(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` units whose mean over the positives (``y`` True) differs most from their mean over the
    negatives (absolute difference; ties to the lower index)."""
    diff = (x[y].mean(0) - x[~y].mean(0)).abs()
    order = torch.argsort(-diff, stable=True)
    return order[:min(k, x.shape[1])]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 50) -> torch.Tensor:
    """Class-balanced logistic regression by Newton's method: weights ``[d + 1]`` (the last the bias) for
    standardised inputs ``x [n, d]``, labels ``y`` bool."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    t = y.to(x.dtype)
    pos = float(t.sum())
    weight = torch.where(y, len(t) / (2 * max(pos, 1.0)), len(t) / (2 * max(len(t) - pos, 1.0)))
    w = torch.zeros(xb.shape[1], dtype=x.dtype)
    reg = torch.full((xb.shape[1],), l2, dtype=x.dtype)
    reg[-1] = 0.0
    for _ in range(steps):
        p = torch.sigmoid(xb @ w)
        grad = xb.T @ (weight * (p - t)) / len(t) + reg * w
        hess = (xb * (weight * p * (1 - p))[:, None]).T @ xb / len(t) + torch.diag(reg) + 1e-9 * torch.eye(len(w),
                                                                                                       dtype=x.dtype)
        delta = torch.linalg.solve(hess, grad)
        w -= delta
        if float(delta.abs().max()) < 1e-10:
            break
    return w


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 0.5 * (float(pred[y].float().mean()) + float((~pred[~y]).float().mean()))


def probe(x: torch.Tensor, labels: list[str], ks: tuple[int, ...] = PROBE_K, seed: int = 0) -> dict[str, float]:
    """Balanced test accuracy of K-unit probes, by K, averaged over the one-against-the-rest tasks; the
    halves are stratified by label and drawn with ``seed``."""
    names = sorted(set(labels))
    lab = torch.tensor([names.index(v) for v in labels])
    g = torch.Generator().manual_seed(seed)
    train = torch.zeros(len(lab), dtype=torch.bool)
    for c in range(len(names)):
        idx = torch.nonzero(lab == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        train[idx[:len(idx) // 2]] = True
    out = {}
    for k in ks:
        accs = []
        for c in range(len(names) if len(names) > 2 else 1):
            y = lab == c
            units = select_units(x[train], y[train], k)
            xs = x[:, units]
            mean, sd = xs[train].mean(0), xs[train].std(0).clamp_min(1e-12)
            z = (xs - mean) / sd
            w = fit_logistic(z[train], y[train])
            pred = torch.cat([z[~train], torch.ones(int((~train).sum()), 1, dtype=z.dtype)], 1) @ w > 0
            accs.append(balanced_accuracy(pred, y[~train]))
        out[str(k)] = sum(accs) / len(accs)
    return out


def sparse_probe(lm: LM, saes: dict[str, SAE], items: list[tuple[str, str]], *, ks: tuple[int, ...] = PROBE_K,
                 ctx: int = 128, neurons: bool = True, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """``{unit set: {"kind", "site", "accuracy": {K: balanced accuracy}}}`` for labelled texts ``items``."""
    texts, labels = [t for t, _ in items], [lab for _, lab in items]
    means = unit_means(lm, saes, texts, ctx=ctx, neurons=neurons, progress=progress)
    out = {}
    for key, x in means.items():
        kind, site = key.split("/")
        out[key] = {"kind": kind, "site": site, "accuracy": probe(x, labels, ks, seed)}
    return out
