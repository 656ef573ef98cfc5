"""Build an untrained model from a config: the method, the network and how they are saved together.

    method, net = build(load_config("demo"), vocab_size=27)
    model = Bundle(method, net)        # what is trained, averaged (EMA) and saved

Extension points, one registry entry each: a method in METHODS (an md4.method.Method), a
tokenizer in TOKENIZERS, a network in md4.nn.BACKBONES (chosen by model.arch).
"""

from __future__ import annotations

import torch
from torch import nn

from md4.ar import AR
from md4.config import Config
from md4.data import CharTokenizer, ImageTokenizer
from md4.data.bpe import GPT2Tokenizer
from md4.data.images import is_image_corpus, tokenizer_for
from md4.data.records import RecordTokenizer
from md4.data.tables import TableTokenizer
from md4.diffusion import MD4
from md4.errors import UserError
from md4.genmd4 import GenMD4
from md4.method import Method
from md4.nn import BACKBONES, Backbone
from md4.restrict import restrict_network
from md4.sedd import SEDD

# Training methods: name -> md4.method.Method subclass, built by cls.from_config(vocab_size, cfg).
# Baselines: "ar" (causal, exact likelihood) and "sedd" (score entropy, absorbing); D3PM-absorb
# is "md4" evaluated with --timesteps 1000.
METHODS: dict[str, type[Method]] = {"md4": MD4, "genmd4": GenMD4, "ar": AR, "sedd": SEDD}
# built with config.json's "tokenizer_args": the values each tokenizer's ARGS names (md4.pretrained.read_model_config)
TOKENIZERS = {"char": CharTokenizer, "gpt2": GPT2Tokenizer, "image": ImageTokenizer, "records": RecordTokenizer,
              "table": TableTokenizer}
# saved weights' key prefixes of earlier versions -> today's (Bundle.method was Bundle.diffusion)
LEGACY_PREFIXES = {"diffusion.": "method."}


class Bundle(nn.Module):
    """The method and the network as one module: what is trained, averaged (EMA) and saved.

    Saved weights are keyed "net.*" and "method.*" (the latter only when the method has
    parameters or buffers, e.g. GenMD4's exponents); files saved as "diffusion.*" by earlier
    versions load through `upgrade_key`."""

    def __init__(self, method: Method, net: Backbone):
        super().__init__()
        self.method = method
        self.net = net


def upgrade_key(key: str) -> str:
    """A weight's (or an FSDP optimizer state's) name as saved by any version -> today's name."""
    for old, new in LEGACY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def upgrade_weights(weights: dict) -> dict:
    """Saved weights keyed for today's Bundle (see LEGACY_PREFIXES)."""
    return {upgrade_key(k): v for k, v in weights.items()}


def upgrade_optimizer(state):
    """An AdamW state dict with today's parameter names: FSDP runs key it by name (the others by
    position, left as they are)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        return state
    groups = [{**g, "params": [upgrade_key(p) if isinstance(p, str) else p for p in g["params"]]}
              if isinstance(g, dict) and isinstance(g.get("params"), list) else g
              for g in state.get("param_groups", [])]
    named = {upgrade_key(k) if isinstance(k, str) else k: v for k, v in state["state"].items()}
    return {**state, "state": named, "param_groups": groups}


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" = cuda when available, else cpu; UserError for an unknown or unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}; use auto, cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device {name!r} was asked for but torch sees no CUDA GPU; use cpu or auto.")
    return device


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def build(cfg: Config, vocab_size: int, saved: bool = False, tokenizer=None) -> tuple[Method, Backbone]:
    """(method, denoising network) for `cfg` over a vocabulary of `vocab_size` tokens: the method
    from METHODS[cfg.method], the network from md4.nn.BACKBONES[cfg.model.arch], causal when the
    method says so and told the image shape when the data are images. A method that needs time
    conditioning refuses a new model without it; saved=True rebuilds a trained model as it was
    saved, without the checks for new models. A `tokenizer` that declares which values each
    position can hold (records) restricts the network's logits to them (md4.restrict)."""
    cls = method_class(cfg.method)
    if cls.needs_time_cond and not cfg.model.time_cond and not saved:
        raise UserError(f"Method {cfg.method} needs a network that sees t (its exact denoiser depends on t); "
                        f"set model.time_cond=true.")
    method = cls.from_config(vocab_size, cfg)
    corpus = cfg.data.corpus
    image_shape = tokenizer_for(corpus).shape if is_image_corpus(corpus) else None
    net = BACKBONES[cfg.model.arch].from_config(vocab_size, cfg.model, length=cfg.data.length,
                                                causal=method.causal, image_shape=image_shape)
    if tokenizer is not None:
        restrict_network(net, tokenizer, causal=method.causal)
    return method, net


def model_metadata(cfg: Config, vocab_size: int, tokenizer: str = "char", tokenizer_args: dict | None = None) -> dict:
    """What config.json holds: the config plus what is needed to rebuild the model."""
    meta = {"format": "md4", "vocab_size": vocab_size, "tokenizer": tokenizer, "config": cfg.to_dict()}
    if tokenizer_args:
        meta["tokenizer_args"] = tokenizer_args
    return meta
