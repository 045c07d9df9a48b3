"""Five ways to steer towards one SAE feature, built from what the feature does on real text:

* ``add``       -- add the feature's decoder direction (coefficient x the row) at every position;
* ``clamp``     -- set the feature to the coefficient at every position;
* ``actadd``    -- ActAdd: the site's activations on the last ``ACTADD_TOKENS`` tokens up to the feature's
  strongest activation minus those on a window where it is silent, added (x the coefficient, as in the
  ActAdd paper: a multiple of the raw difference) to the prompt's first positions;
* ``mean_diff`` -- the mean activation where the feature fires strongly (at least half its peak) minus
  the mean everywhere else, as a unit vector (x the coefficient) at every position;
* ``prompt``    -- no edit: the text before the feature's strongest activation is put in front of the
  prompt (one setting, no coefficient).

Decoder rows are unit vectors, so a coefficient is the same size of residual-stream shift for
``add``, ``mean_diff`` and (where the feature is silent) ``clamp``; ActAdd's difference is as long as
the residual stream itself, so its coefficients act far more strongly (which the matched-cost choice
of ``compare.py`` takes into account, not the grid).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..activations import run_sites
from ..data import collate, pad_token_id
from ..devices import follow_model
from ..errors import ScSteerError
from ..interpret.features import rows_upto
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .recipe import Intervention
from .vectors import contrast_vector

METHODS = ("add", "clamp", "actadd", "mean_diff", "prompt")
STRONG = 0.5          # "fires strongly": at least this share of the feature's peak on the data
PROMPT_TOKENS = 16    # text put before the prompt by the prompting baseline
ACTADD_TOKENS = 4     # the contrast pair's length (ActAdd's sequences are a few tokens)
REFERENCE_WINDOWS = 16   # the stretches of real text whose mean activation is a concept score's 1


@dataclass
class FeatureFacts:
    """What one feature does on a stretch of text, from which every method's steering is built."""

    site: str
    feature: int
    peak: float = 0.0
    n_strong: int = 0
    top_window: list[int] = field(default_factory=list)   # text tokens ending at its peak
    off_window: list[int] = field(default_factory=list)   # ACTADD_TOKENS tokens over which it is silent
    mean_diff: torch.Tensor | None = None                 # unit vector [d]
    on_topic: float = 0.0    # its mean over the REFERENCE_WINDOWS text windows where it is highest
    actadd: torch.Tensor | None = None                    # [1 + ACTADD_TOKENS, d], BOS row 0

    @property
    def name(self) -> str:
        return f"{self.site}:{self.feature}"


@dataclass
class Setting:
    """One method at one coefficient: the edits and the text before the prompt that generation gets."""

    method: str
    coeff: float | None
    items: list[Intervention]
    prefix: list[int] = field(default_factory=list)


@torch.no_grad()
def feature_facts(lm: LM, saes: dict[str, SAE], features: list[tuple[str, int]], data: str = "demo", *,
                  max_tokens: int = 20_000, ctx: int = 64, batch_size: int = 32, window: int = 24,
                  progress: bool = True) -> tuple[list[FeatureFacts], list[tuple[str, str]]]:
    """Read ``max_tokens`` of ``data`` once and gather, for each (site, feature), its peak and the window
    ending there, a window where it is silent, its mean-difference and ActAdd vectors, and ``on_topic``:
    its mean activation over the ``REFERENCE_WINDOWS`` stretches of ``window`` text tokens (continuation
    length) where that mean is highest, one per row at most (how much of the concept on-topic text
    holds, the 1 of a normalised concept score). Returns the
    features with all of these, and (name, why) for those without (never firing, or never silent)."""
    follow_model(saes, lm)
    sites = sorted({Site.parse(s, lm.n_layers) for s, _ in features}, key=lambda s: s.order)
    names = {Site.parse(s, lm.n_layers): s for s, _ in features}
    rows = rows_upto(data, lm.tokenizer, ctx, max_tokens)
    facts = [FeatureFacts(s, f) for s, f in features]
    by_site = {s: [i for i, (name, _) in enumerate(features) if Site.parse(name, lm.n_layers) == s] for s in sites}
    total = {s: None for s in sites}
    count = 0
    fired: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in features]   # (values, vectors) where > 0
    where_peak = [(-1, -1)] * len(features)
    best_windows: list[torch.Tensor] = [torch.zeros(0) for _ in features]
    pad = pad_token_id(lm.tokenizer)
    for start in tqdm(range(0, len(rows), batch_size), desc="feature facts", disable=not progress):
        batch = collate(rows[start:start + batch_size], start, ctx, pad)
        acts = run_sites(lm, batch, sites)
        keep = batch.keep.to(lm.device)
        count += int(keep.sum())
        for s in sites:
            h = acts[s].float()
            hs = h[keep]
            total[s] = hs.sum(0) if total[s] is None else total[s] + hs.sum(0)
            idx = by_site[s]
            f = saes[names[s]].encode(h)[..., [features[i][1] for i in idx]] * keep[..., None]   # [B, T, k]
            for j, i in enumerate(idx):
                fi = f[..., j]
                on = fi > 0
                if on.any():
                    fired[i].append((fi[on].cpu(), h[on].cpu()))
                best_windows[i] = (torch.cat([best_windows[i], _best_window_means(fi, keep, window).cpu()])
                                   .topk(min(REFERENCE_WINDOWS, len(best_windows[i]) + fi.shape[0])).values)
                best = float(fi.max())
                if best > facts[i].peak:
                    b, p = divmod(int(fi.argmax()), fi.shape[1])
                    facts[i].peak, where_peak[i] = best, (start + b, p)
                if not facts[i].off_window:
                    facts[i].off_window = _silent_window(rows, start, keep & ~on)
    usable, skipped = [], []
    for i, ft in enumerate(facts):
        if ft.peak <= 0:
            skipped.append((ft.name, f"never fires on {max_tokens:,} tokens of {data!r}"))
            continue
        if not ft.off_window:
            why = f"fires in every {ACTADD_TOKENS}-token window of {data!r}: no silent text to contrast it with"
            skipped.append((ft.name, why))
            continue
        ft.on_topic = float(best_windows[i].mean())
        r, p = where_peak[i]
        row = rows[r]
        first = next(j for j, k in enumerate(row.keep) if k)
        ft.top_window = row.ids[max(first, p - PROMPT_TOKENS + 1):p + 1]
        vals = torch.cat([v for v, _ in fired[i]])
        vecs = torch.cat([x for _, x in fired[i]])
        strong = vals >= STRONG * ft.peak
        ft.n_strong = int(strong.sum())
        s = Site.parse(ft.site, lm.n_layers)
        on_sum = vecs[strong].sum(0)
        rest = (total[s].cpu() - on_sum) / max(count - ft.n_strong, 1)
        diff = on_sum / ft.n_strong - rest
        ft.mean_diff = diff / diff.norm().clamp_min(1e-12)
        bos = [lm.tokenizer.bos_token_id] if lm.tokenizer.bos_token_id is not None else []
        ft.actadd = contrast_vector(lm, ft.site, bos + ft.top_window[-ACTADD_TOKENS:], bos + ft.off_window)
        usable.append(ft)
    return usable, skipped


def _best_window_means(f: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """``[B]``: each row's highest mean of ``f [B, T]`` over ``n`` consecutive text tokens (over all its
    text where it holds fewer)."""
    c = torch.nn.functional.pad((f * keep).cumsum(1), (1, 0))
    k = torch.nn.functional.pad(keep.long().cumsum(1), (1, 0))
    span = min(n, f.shape[1])
    sums, counts = c[:, span:] - c[:, :-span], k[:, span:] - k[:, :-span]
    return (sums / counts.clamp_min(1)).masked_fill(counts < torch.clamp(keep.sum(1, keepdim=True), max=n), 0).amax(1)


def _silent_window(rows, start: int, silent: torch.Tensor) -> list[int]:
    """The first ``ACTADD_TOKENS`` consecutive text tokens over which a feature is silent, in a batch
    (``silent [B, T]``, rows from ``rows[start]``), or [] where there is none."""
    n = ACTADD_TOKENS
    c = torch.nn.functional.pad(silent.long().cumsum(1), (1, 0))
    runs = (c[:, n:] - c[:, :-n]) == n                     # [B, T - n + 1]: window [p, p + n) all silent
    hit = runs.nonzero()
    if not len(hit):
        return []
    b, p = (int(x) for x in hit[0])
    return rows[start + b].ids[p:p + n]


def settings(ft: FeatureFacts, method: str, coeffs: list[float], newline: list[int]) -> list[Setting]:
    """The method's settings for one feature: one per coefficient (one in all for ``prompt``)."""
    s, f = ft.site, ft.feature
    if method == "prompt":
        return [Setting("prompt", None, [], ft.top_window + newline)]
    make = {"add": lambda c: Intervention(s, f, "add", c, "all"),
            "clamp": lambda c: Intervention(s, f, "clamp", c, "all"),
            "actadd": lambda c: Intervention(s, None, "add", c, "prompt", ft.actadd.tolist()),
            "mean_diff": lambda c: Intervention(s, None, "add", c, "all", ft.mean_diff.tolist())}
    if method not in make:
        raise ScSteerError(f"steering method {method!r}: expected one of {', '.join(METHODS)}")
    return [Setting(method, float(c), [make[method](float(c))]) for c in coeffs]
