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
