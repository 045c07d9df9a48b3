"""Names of hook points ("sites") in a transformer, shared by collection, SAEs, graphs and steering.

A site is ``{kind}.{layer}``:

* ``resid_post.{i}`` -- the output of decoder block ``i`` (the residual stream after the block);
* ``attn_out.{i}``   -- the output of block ``i``'s attention module (before it joins the residual);
* ``mlp_out.{i}``    -- the output of block ``i``'s MLP module;
* ``mlp_act.{i}``    -- the MLP's hidden activations ("neurons"): the input of its output projection.

Sites are ordered by when the forward pass reaches them, which nnsight requires inside a trace.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ScSteerError

# Forward order inside one block: attention runs before the MLP, and the block output comes last.
SITE_KINDS = ("attn_out", "mlp_act", "mlp_out", "resid_post")
_SITE_RE = re.compile(r"^(?P<kind>[a-z_]+)\.(?P<layer>\d+|\*|\d+-\d+)$")


@dataclass(frozen=True)
class Site:
    kind: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: the order in which one forward pass produces the sites."""
        return (self.layer, SITE_KINDS.index(self.kind))

    @classmethod
    def parse(cls, name: str, n_layers: int | None = None) -> Site:
        sites = parse_sites(name, n_layers)
        if len(sites) != 1:
            raise ScSteerError(f"site {name!r}: expected one site such as 'resid_post.3', got a pattern")
        return sites[0]


def parse_sites(spec: str | list[str] | tuple[str, ...], n_layers: int | None = None) -> list[Site]:
    """Parse ``"resid_post.*"``, ``"resid_post.0-3,mlp_out.2"`` or a list of names into sorted sites.

    ``n_layers`` (when known) expands ``*`` and checks that every layer exists.
    """
    names = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not names:
        raise ScSteerError("sites: expected at least one site such as 'resid_post.0' or 'resid_post.*'")
    out: set[Site] = set()
    for name in names:
        m = _SITE_RE.match(name)
        if not m or m["kind"] not in SITE_KINDS:
            raise ScSteerError(f"unknown site {name!r}: expected KIND.LAYER with KIND one of {', '.join(SITE_KINDS)} "
                               "and LAYER a number, a range like 0-3, or *")
        layer = m["layer"]
        if layer == "*":
            if n_layers is None:
                raise ScSteerError(f"site {name!r}: '*' needs a model to know how many layers there are")
            layers = range(n_layers)
        elif "-" in layer:
            lo, hi = map(int, layer.split("-"))
            if lo > hi:
                raise ScSteerError(f"site {name!r}: empty layer range {lo}-{hi}")
            layers = range(lo, hi + 1)
        else:
            layers = [int(layer)]
        for i in layers:
            if n_layers is not None and not 0 <= i < n_layers:
                raise ScSteerError(f"unknown site '{m['kind']}.{i}': the model has layers 0-{n_layers - 1}")
            out.add(Site(m["kind"], i))
    return sorted(out, key=lambda s: s.order)


# Other tools' names for hook points: TransformerLens (SAELens, Gemma/Llama Scope), module paths
# (sparsify's hookpoints, sc-steer's own), dictionary_learning's submodule names.
_TL_HOOKS = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out",
             "mlp.hook_post": "mlp_act"}
_MODULE_PATH = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(?P<layer>\d+)(?:\.(?P<sub>[A-Za-z_]+))?$")
_SUBMODULES = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
               "attention": "attn_out"}
_DL_NAMES = re.compile(r"^(?P<kind>resid_post|resid|mlp_out|mlp|attn_out|attn)(?:_layer)?_?(?P<layer>\d+)?$")


def site_from_hook(hook: str, n_layers: int | None = None, layer: int | None = None) -> Site:
    """The sc-steer site another tool's hook name means, e.g. ``blocks.8.hook_resid_pre`` (the residual
    stream entering block 8) is ``resid_post.7``; ``layers.12`` (sparsify) is ``resid_post.12``;
    ``resid_post_layer_3`` (dictionary_learning) is ``resid_post.3``. ``layer`` completes a name that
    carries none. A name that maps to no site is a one-line error."""
    name = hook.strip()
    site = None
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        i, rest = int(m[1]), m[2]
        if rest == "hook_resid_pre":
            if i == 0:
                raise ScSteerError(f"hook {hook!r} is the embeddings (before block 0): sc-steer has no site there")
            site = Site("resid_post", i - 1)
        elif rest in _TL_HOOKS:
            site = Site(_TL_HOOKS[rest], i)
        else:
            raise ScSteerError(f"hook {hook!r} maps to no sc-steer site (known: hook_resid_pre, hook_resid_post, "
                               "hook_mlp_out, hook_attn_out, mlp.hook_post); give --site SITE=PATH")
    elif (m := _MODULE_PATH.match(name)) and m["sub"] in _SUBMODULES:
        site = Site(_SUBMODULES[m["sub"]], int(m["layer"]))
    elif (m := _DL_NAMES.match(name)) and (m["layer"] is not None or layer is not None):
        kind = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}.get(m["kind"], m["kind"])
        site = Site(kind, int(m["layer"]) if m["layer"] is not None else int(layer))
    else:
        try:
            site = Site.parse(name)
        except ScSteerError:
            raise ScSteerError(f"hook {hook!r} maps to no sc-steer site; give --site SITE=PATH") from None
    if n_layers is not None and not 0 <= site.layer < n_layers:
        raise ScSteerError(f"hook {hook!r} is {site}, but the model has layers 0-{n_layers - 1}")
    return site
