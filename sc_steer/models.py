"""Open a causal LM through nnsight and map sc-steer sites onto its modules, per architecture.

Why adapters: every family names its blocks differently (``model.layers`` for Llama, ``transformer.h``
for GPT-2, ``gpt_neox.layers`` for Pythia). One small table says where the blocks, their attention
and MLP, the final norm and the unembedding live; everything else in sc-steer speaks in sites.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path
from typing import Any

import torch

from .devices import resolve_device, resolve_dtype
from .errors import ScSteerError
from .sites import Site, parse_sites


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps its parts (dotted paths relative to the ``*ForCausalLM``
    module) and how they differ: every family quirk sc-steer relies on is a field here."""

    layers: str
    attn: str
    mlp: str
    mlp_down: str  # the MLP's output projection, relative to ``mlp``; its input is the neuron layer
    final_norm: str
    unembed: str
    norm_offset: float = 0.0   # the final norm's gain is norm_offset + weight (Gemma's RMSNorm: 1 + weight)
    conv1d: bool = False       # projections are GPT-2's Conv1D (weight [in, out]), not nn.Linear ([out, in])


_LLAMA_LIKE = Adapter(layers="model.layers", attn="self_attn", mlp="mlp", mlp_down="down_proj", final_norm="model.norm",
                      unembed="lm_head")
ADAPTERS: dict[str, Adapter] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3")},
    **{t: replace(_LLAMA_LIKE, norm_offset=1.0) for t in ("gemma", "gemma2", "gemma3_text")},
    "gpt2": Adapter(layers="transformer.h", attn="attn", mlp="mlp", mlp_down="c_proj", final_norm="transformer.ln_f",
                    unembed="lm_head", conv1d=True),
    "gpt_neox": Adapter(layers="gpt_neox.layers", attn="attention", mlp="mlp", mlp_down="dense_4h_to_h",
                        final_norm="gpt_neox.final_layer_norm", unembed="embed_out"),
}


def adapter_for(model_type: str) -> Adapter:
    if model_type not in ADAPTERS:
        raise ScSteerError(
            f"unsupported architecture {model_type!r} (config.model_type); supported: {', '.join(sorted(ADAPTERS))}. "
            "To add one, register sc_steer.models.ADAPTERS[model_type] = Adapter(layers=..., attn=..., mlp=..., "
            "mlp_down=..., final_norm=..., unembed=...) with the dotted paths of its block list and modules")
    return ADAPTERS[model_type]


def demo_model_path() -> Path:
    """The small Llama shipped inside the package (see sc_steer/demo/README.md)."""
    return Path(__file__).parent / "demo" / "model"


def unwrap(output: Any) -> torch.Tensor:
    """Module outputs are tensors or tuples whose first element is the hidden state.

    Never index ``output[0]`` blindly: on a plain tensor that silently takes batch row 0.
    """
    return output[0] if isinstance(output, (tuple, list)) else output


def rewrap(output: Any, hidden: torch.Tensor) -> Any:
    """The inverse of ``unwrap``: ``hidden`` in place of the hidden state, any tuple structure kept."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, (tuple, list)) else hidden


class LM:
    """An nnsight-wrapped causal LM plus the facts sc-steer needs: adapter, sites, tokenizer.

    ``nn`` is the nnsight model (trace/generate through it); ``hf`` is the underlying transformers
    module (for plain forward passes and hooks).
    """

    def __init__(self, hf_model: torch.nn.Module, tokenizer: Any, name: str, remote: bool | str = False,
                 nn_model: Any = None):
        from nnsight import TransformersModel

        self.hf = hf_model
        self.config = hf_model.config
        self.adapter = adapter_for(self.config.model_type)
        self.tokenizer = tokenizer
        self.name = name
        self.remote = remote
        self.nn = nn_model if nn_model is not None else TransformersModel(hf_model, tokenizer=tokenizer,
                                                                          task="text-generation")
        self.n_layers = len(self.get_module(self.adapter.layers))
        self.d_model = int(self.config.hidden_size)

    # -- sites ---------------------------------------------------------------------------------
    def sites(self, spec: str | list[str]) -> list[Site]:
        """Parse and check site names against this model, sorted in forward order."""
        return parse_sites(spec, self.n_layers)

    def module_path(self, site: Site) -> str:
        if not 0 <= site.layer < self.n_layers:
            raise ScSteerError(f"unknown site '{site}': the model has layers 0-{self.n_layers - 1}")
        block = f"{self.adapter.layers}.{site.layer}"
        return {"resid_post": block, "attn_out": f"{block}.{self.adapter.attn}",
                "mlp_out": f"{block}.{self.adapter.mlp}",
                "mlp_act": f"{block}.{self.adapter.mlp}.{self.adapter.mlp_down}"}[site.kind]

    def width(self, site: Site) -> int:
        """d_model for residual-basis sites; the MLP's hidden size for ``mlp_act``."""
        if site.kind != "mlp_act":
            return self.d_model
        return int(self.projection_weight(self.module(site)).shape[1])

    def check_sae(self, site: Site, sae: Any) -> None:
        """An SAE used at ``site`` reads vectors of the site's width."""
        if sae.cfg.d_in != self.width(site):
            raise ScSteerError(f"SAE for {site} has d_in={sae.cfg.d_in}, but the model's {site} is {self.width(site)} "
                               "wide (an SAE trained on another model?)")

    def projection_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """A projection's weight as ``[out, in]`` whatever the family stores (GPT-2's Conv1D: ``[in, out]``)."""
        w = module.weight
        return w.T if self.adapter.conv1d else w

    def final_norm_gain(self) -> tuple[torch.Tensor, bool]:
        """The final norm's per-dimension gain (fp32, ``[d_model]``) and whether it centres its input
        first (LayerNorm); its data-dependent 1/rms is a positive scalar per token and is left out."""
        norm = self.get_module(self.adapter.final_norm)
        weight = getattr(norm, "weight", None)
        gain = torch.ones(self.d_model, device=self.device) if weight is None else weight.detach().float()
        return gain + self.adapter.norm_offset, isinstance(norm, torch.nn.LayerNorm)

    def unembedding(self) -> torch.Tensor:
        """``W_U [vocab, d_model]``, detached."""
        return self.get_module(self.adapter.unembed).weight.detach()

    def site_value(self, site: Site) -> Any:
        """Inside a trace: the site's hidden-state tensor (a module output, or the down projection's input)."""
        env = self.envoy(site)
        return env.input if site.kind == "mlp_act" else unwrap(env.output)

    def module(self, site_or_path: Site | str) -> torch.nn.Module:
        path = self.module_path(site_or_path) if isinstance(site_or_path, Site) else site_or_path
        return self.get_module(path)

    @contextmanager
    def edited(self, edit: Callable[[Site, torch.Tensor, int], torch.Tensor | None], sites: list[Site]):
        """While open, every forward pass of ``self.hf`` (``generate``'s steps included) replaces each
        site's hidden state ``h`` with ``edit(site, h, call)`` (None: leave it), ``call`` counting that
        site's forward calls from 0 (with the KV cache, 0 is the prefill).

        Plain PyTorch hooks, not an nnsight trace: a generation step pays a function call per site and
        nothing else (nnsight's per-step interleaving cost 4-14% more time a token on the demo model). For
        ``mlp_act`` the edit replaces the down projection's input, elsewhere the module's output."""
        if self.remote is True:
            raise ScSteerError("this runs the model here, and --remote ndif loads no weights here; "
                               "drop --remote for steering")
        handles = []

        def on_output(site: Site, calls):
            def hook(_module, _args, out):
                new = edit(site, unwrap(out), next(calls))
                return None if new is None else rewrap(out, new)
            return hook

        def on_input(site: Site, calls):
            def hook(_module, args, kwargs):
                new = edit(site, args[0], next(calls))
                return None if new is None else ((new, *args[1:]), kwargs)
            return hook

        try:
            for site in sites:
                module = self.module(site)
                if site.kind == "mlp_act":
                    handles.append(module.register_forward_pre_hook(on_input(site, count()), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(on_output(site, count())))
            yield
        finally:
            for h in handles:
                h.remove()

    def envoy(self, site_or_path: Site | str) -> Any:
        """The nnsight envoy for a site (use inside ``self.trace``)."""
        path = self.module_path(site_or_path) if isinstance(site_or_path, Site) else site_or_path
        env = self.nn
        for part in path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    def get_module(self, path: str) -> Any:
        """The submodule at a dotted path of the transformers model (an adapter path, say)."""
        try:
            return self.hf.get_submodule(path)
        except AttributeError as e:
            raise ScSteerError(f"model {self.name!r} has no module {path!r}; its adapter does not fit it") from e

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model was built for (None where the config does not say)."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(self.config, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def check_positions(self, n: int, what: str = "--ctx") -> None:
        """Refuse sequences longer than the model's positions (they fail or silently degrade)."""
        if self.max_positions is not None and n > self.max_positions:
            raise ScSteerError(f"{what} {n:,}: model {self.name!r} handles at most {self.max_positions:,} positions")

    # -- running -------------------------------------------------------------------------------
    def trace(self, inputs: Any, **kwargs: Any):
        """``nn.trace`` with this model's remote setting."""
        if self.remote:
            kwargs.setdefault("remote", self.remote)
        return self.nn.trace(inputs, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def fingerprint(self) -> dict:
        """What identifies the model in manifests: name, architecture, shape and a config hash."""
        cfg = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return {"name": self.name, "model_type": self.config.model_type, "n_layers": self.n_layers,
                "d_model": self.d_model, "vocab_size": int(self.config.vocab_size),
                "dtype": str(self.dtype).removeprefix("torch."),
                "config_sha256": hashlib.sha256(cfg.encode()).hexdigest()[:16]}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def open_model(model: str | torch.nn.Module, *, tokenizer: Any = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32", remote: bool | str = False, revision: str | None = None) -> LM:
    """Open a causal LM: ``"demo"``, a local folder, a hub id, or an already built transformers module.

    ``device`` is where the model runs (cpu, cuda, cuda:N, ...); SAEs used with it follow it there.
    ``dtype`` is one of float32, float16, bfloat16 or "auto" (the checkpoint's own). A module passed
    directly stays where and as it is. ``remote=True`` runs traces on NDIF (needs ``NDIF_API_KEY``;
    weights are never loaded here); ``remote="local"`` loads the weights here and runs every trace
    through nnsight's remote serialisation path.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ScSteerError("open_model: a module passed directly needs tokenizer=")
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        return LM(model.eval(), tokenizer, name, remote=remote)
    if not isinstance(model, str) or not model:
        raise ScSteerError(f"model: expected 'demo', a local folder or a hub id, got {model!r}")
    name = model
    source = str(demo_model_path()) if model == "demo" else model
    local = _looks_like_path(source)
    if local:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ScSteerError(f"model path {source!r} does not exist or is not a folder")
        if not (path / "config.json").exists():
            raise ScSteerError(f"model folder {source!r} has no config.json (expected a transformers checkpoint)")
        source = str(path)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except OSError as e:
        raise ScSteerError(f"could not load model {model!r}: {str(e).splitlines()[0]} "
                           "(offline? pass a local folder)") from e
    adapter_for(config.model_type)
    if remote is True and local:
        raise ScSteerError(f"--remote ndif: NDIF runs models from the hub by id; {model!r} is a local model here "
                           "(use --remote local to try nnsight's remote path with it)")
    if remote is True:
        from nnsight import TransformersModel

        nn = TransformersModel(source, task="text-generation", revision=revision)  # meta weights only
        return LM(nn._module, nn.tokenizer, name, remote=True, nn_model=nn)
    device = resolve_device(device)
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision)
        tok = tokenizer or AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as e:
        raise ScSteerError(f"could not load model {model!r}: {str(e).splitlines()[0]}") from e
    try:
        hf = hf.to(device)
    except (RuntimeError, AssertionError) as e:
        raise ScSteerError(f"--device {device}: {str(e).splitlines()[0]}") from e
    bad = next((n for n, p in hf.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise ScSteerError(f"model {model!r}: its weight {bad} holds NaN or infinite values (a corrupt or diverged "
                           "checkpoint)")
    return LM(hf.eval(), tok, name, remote=remote)
