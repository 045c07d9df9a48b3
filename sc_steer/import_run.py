"""A run folder from SAEs someone else trained (``sc-steer import``), so that eval, interpret, graph,
steer and the playground serve them like SAEs trained here.

Each SAE is read by ``sae.load_sae`` (any published layout), put at its site (from its own files'
hook name, or ``--site SITE=PATH``), checked against the model's width there, and written into the run
in sc-steer's layout (``saes/<site>/``): converted and copied, so the run stands on its own and every
command reads one format. The SAE's model becomes the run's (the user vouches for it; the widths are
checked); ``run.json`` and the SAE's ``cfg.extra["source"]`` keep the file it came from and the
writer's format, class, hook name and model name.
"""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from . import rundir
from .errors import ScSteerError
from .models import LM
from .sae import SAE, load_sae
from .sae.formats import LAYOUTS, detect
from .sites import Site, site_from_hook


def find_sae_folders(path: Path, depth: int = 4) -> list[Path]:
    """``path`` if it holds an SAE, else the SAE folders below it (a parent of hookpoint folders, a
    release's tree), in name order."""
    if detect(path) is not None:
        return [path]
    if depth == 0 or not path.is_dir():
        return []
    return [f for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            for f in find_sae_folders(sub, depth - 1)]


def parse_site_args(items: list[str]) -> list[tuple[str, Path]]:
    """``--site SITE=PATH`` flags."""
    out = []
    for item in items:
        site, eq, path = item.partition("=")
        if not eq or not site.strip() or not path.strip():
            raise ScSteerError(f"--site {item!r}: expected SITE=PATH, e.g. resid_post.12=saes/layer_12")
        out.append((site.strip(), Path(path.strip())))
    return out


def import_saes(lm: LM, out: str | Path, paths: list[str | Path] = (), sites: list[tuple[str, Path]] = (), *,
                model: str | None = None, force: bool = False, progress: bool = True) -> dict[str, dict]:
    """Make the run ``out`` from SAE folders (``paths``: SAEs or folders of them, each placed by its own
    hook name) and ``sites`` ((site, path) pairs placed as told). Returns what run.json records per site."""
    chosen: list[tuple[str | None, Path]] = [(s, Path(p)) for s, p in sites]
    for p in map(Path, paths):
        if not p.exists():
            raise ScSteerError(f"SAE path {str(p)!r} does not exist")
        found = find_sae_folders(p) if p.is_dir() else [p.parent]
        if not found:
            raise ScSteerError(f"{str(p)!r} holds no SAE, nor do the folders below it (expected one of: "
                               f"{'; '.join(LAYOUTS)})")
        chosen += [(None, f) for f in found]
    if not chosen:
        raise ScSteerError("import: give SAE folders (or a folder of them), or --site SITE=PATH")
    saes: dict[str, SAE] = {}
    records: dict[str, dict] = {}
    for site_name, path in tqdm(chosen, desc="read SAEs", disable=not progress):
        sae = load_sae(path)
        src = dict(sae.cfg.extra.get("source") or {"format": "sc-steer", "class": sae.cfg.architecture,
                                                    "hook": sae.cfg.site or sae.cfg.hook_module})
        if site_name is not None:
            site = Site.parse(site_name, lm.n_layers)
        elif src.get("hook"):
            site = site_from_hook(src["hook"], lm.n_layers, src.get("layer"))
        else:
            raise ScSteerError(f"{str(path)!r} names no hook point in its files; give --site SITE={path}")
        if str(site) in saes:
            raise ScSteerError(f"two SAEs for {site}: {records[str(site)]['path']} and {path.resolve()}; "
                               "keep one, or place one with --site")
        lm.check_sae(site, sae)
        if sae.cfg.model_name:                # the writer's name for the model, kept as provenance
            src.setdefault("model_name", sae.cfg.model_name)
        sae.cfg.extra = {**sae.cfg.extra, "source": src}
        sae.cfg.site, sae.cfg.hook_module, sae.cfg.model_name = str(site), lm.module_path(site), model or lm.name
        saes[str(site)] = sae
        records[str(site)] = {"path": str(path.resolve()), **src}
    order = [str(s) for s in sorted(map(Site.parse, saes), key=lambda s: s.order)]
    info = {"model": model or lm.name, "sites": order, "dataset": None, "train_config": None,
            "imported": {s: records[s] for s in order}}
    rundir.start_run(out, info, force=force)
    for s in order:
        saes[s].save(rundir.sae_dir(out, s))
    return info["imported"]
