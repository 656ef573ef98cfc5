"""Build a model from a config, and load a trained one for evaluation and sampling.

    m = md4.load("runs/demo")          # a run folder, or a model folder (config.json + model.safetensors)
    x = m.sample(4, steps=256)         # [4, N] long
    print(m.decode(x))

This module does not import the training code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from md4 import checkpoint, hub
from md4.ar import AR
from md4.config import Config, from_dict
from md4.data import CharTokenizer, ImageTokenizer, split_labels
from md4.data.bpe import GPT2Tokenizer
from md4.data.images import is_image_corpus, tokenizer_for
from md4.diffusion import MD4
from md4.errors import UserError
from md4.genmd4 import GenMD4
from md4.nn import Transformer, UNet
from md4.sedd import SEDD
from md4.validate import fail, field, known_keys, mapping, one_of

# Training methods: name -> class. A method is an nn.Module built as cls(vocab_size, schedule)
# with loss(net, x0, generator) (scalar, nats per sequence), nelbo(net, x0, timesteps, generator, t)
# ([B] nats) and sample(net, num_samples, length, ...); its parameters (a learnable schedule)
# are trained with the network and saved with it. A class attribute `causal = True` asks for a
# causal network, `needs_time_cond = True` for a network that sees t (a new model with
# model.time_cond=false is refused). A class with a classmethod from_config(vocab_size, cfg) is
# built by it instead.
# Baselines (issue 4): "ar" (causal, exact likelihood) and "sedd" (score entropy, absorbing);
# D3PM-absorb is "md4" evaluated with --timesteps 1000.
METHODS = {"md4": MD4, "genmd4": GenMD4, "ar": AR, "sedd": SEDD}
# built with config.json's "tokenizer_args": the whole numbers each tokenizer's ARGS names
TOKENIZERS = {"char": CharTokenizer, "gpt2": GPT2Tokenizer, "image": ImageTokenizer}


class Bundle(nn.Module):
    """The method and the network as one module: what is trained, averaged (EMA) and saved.

    Saved weights are keyed "net.*" and "diffusion.*" (the latter only when the method has
    parameters or buffers, e.g. GenMD4's exponents)."""

    def __init__(self, diffusion: nn.Module, net: nn.Module):
        super().__init__()
        self.diffusion = diffusion
        self.net = net


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


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def build(cfg: Config, vocab_size: int, saved: bool = False) -> tuple[MD4, Transformer]:
    """(diffusion model, denoising network) for `cfg` over a vocabulary of `vocab_size` tokens.
    saved=True rebuilds a trained model as it was saved, without the checks for new models."""
    cls = method_class(cfg.method)
    if getattr(cls, "needs_time_cond", False) and not cfg.model.time_cond and not saved:
        raise UserError(f"Method {cfg.method} needs a network that sees t (its exact denoiser depends on t); "
                        f"set model.time_cond=true.")
    from_config = getattr(cls, "from_config", None)
    diffusion = from_config(vocab_size, cfg) if from_config else cls(vocab_size, cfg.schedule)
    m = cfg.model
    if m.arch == "unet":
        return diffusion, unet(cfg, vocab_size, getattr(cls, "causal", False))
    if m.dim % m.heads:
        raise UserError(f"model.dim ({m.dim}) must be divisible by model.heads ({m.heads}).")
    image = {}
    if m.num_classes:
        image["num_classes"] = m.num_classes
    if m.pos2d:
        if not is_image_corpus(cfg.data.corpus):
            raise UserError(f"model.pos2d needs an image dataset, but data.corpus is {cfg.data.corpus!r}.")
        image["image_shape"] = tokenizer_for(cfg.data.corpus).shape
    net = Transformer(vocab_size, dim=m.dim, layers=m.layers, heads=m.heads, mlp_ratio=m.mlp_ratio,
                      glu=m.glu, time_cond=m.time_cond, cond_dim=m.cond_dim, dropout=m.dropout,
                      max_len=max(cfg.data.length, 1024), **image,
                      **({"causal": True} if getattr(cls, "causal", False) else {}))
    return diffusion, net


def unet(cfg: Config, vocab_size: int, causal: bool) -> UNet:
    """The U-Net of model.arch=unet, over the images of data.corpus."""
    m, corpus = cfg.model, cfg.data.corpus
    if causal:
        raise UserError(f"Method {cfg.method} needs a causal network, which model.arch=unet is not; use transformer.")
    if not is_image_corpus(corpus):
        raise UserError(f"model.arch=unet needs an image dataset, but data.corpus is {corpus!r}.")
    shape = tokenizer_for(corpus).shape
    if cfg.data.length != shape[0] * shape[1] * shape[2]:
        raise UserError(f"model.arch=unet takes whole images: data.length must be {shape[0] * shape[1] * shape[2]} "
                        f"for {corpus}, not {cfg.data.length}.")
    if any(m.unet_ch * k % m.unet_heads for k in m.unet_mults):
        raise UserError(f"model.unet_heads ({m.unet_heads}) must divide every width model.unet_ch x model.unet_mults.")
    return UNet.from_config(m, vocab_size, shape)


@dataclass
class Pretrained:
    """A trained model: config, diffusion process, network (in eval mode) and tokenizer."""

    config: Config
    diffusion: MD4
    net: Transformer
    tokenizer: object
    source: Path

    @property
    def length(self) -> int:
        return self.config.data.length

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "Pretrained":
        self.net.to(device)
        self.diffusion.to(device)
        return self

    @property
    def num_classes(self) -> int:
        """> 0 for a class-conditional model (labels 0..num_classes-1; num_classes = unconditional)."""
        return self.config.model.num_classes

    def denoiser(self, labels=None, guidance: float = 0.0):
        """The network as denoiser(x_t, t): for class `labels` ([num] long, or an int for all;
        None = unconditional) with classifier-free guidance weight `guidance` (0 = none). A
        network whose logits overflow is refused first (see check_finite)."""
        from md4.guidance import conditioned

        if not math.isfinite(guidance):
            raise UserError(f"The guidance weight must be a finite number, got {guidance}.")
        self.check_finite()
        if labels is None:
            if guidance:
                raise UserError("Guidance needs a class label (--label).")
            return self.net
        if not self.num_classes:
            raise UserError("This model is not class-conditional; it takes no label.")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UserError(f"Class labels must lie in 0..{self.num_classes - 1}.")
        return conditioned(self.net, labels, guidance)

    @torch.no_grad()
    def check_finite(self) -> None:
        """UserError unless the network's logits for one fully masked sequence (t = 1, no label) are
        finite: with weights that overflow, every sampler would draw the same token everywhere,
        silently. One forward pass of one sequence."""
        x = torch.full((1, self.length), self.diffusion.mask_id, device=self.device)
        if not torch.isfinite(self.net(x, torch.ones(1, device=self.device))).all():
            raise UserError(f"Model {self.source} predicts non-finite logits for a fully masked sequence; "
                            f"its weights overflow or are damaged.")

    def sample(self, num: int, steps: int | None = None, grid: str | None = None, length: int | None = None,
               seed: int = 0, progress: bool = False, labels=None, guidance: float = 0.0,
               **kwargs) -> torch.Tensor:
        """[num, length] long samples; kwargs go to md4.sampling.sample (sampler, known / known_mask,
        temperature, top_k, top_p, block, callback, ...). With `block`, a sequence of any length is
        generated in windows of the training length. `labels` (int or [num]) and `guidance` for
        class-conditional models (classifier-free guidance)."""
        limit = self.net.max_len
        known = kwargs.get("known")
        if length is None:
            length = known.shape[-1] if known is not None else self.length
        if kwargs.get("block"):
            kwargs.setdefault("window", min(self.length, limit))
        elif length > limit:
            raise UserError(f"This model handles sequences of at most {limit} tokens, not {length}; "
                            "generate longer ones in blocks (block=...).")
        if labels is not None and torch.as_tensor(labels).ndim == 0:
            labels = torch.full((num,), int(labels), dtype=torch.long)
        denoiser = self.denoiser(labels, guidance)
        g = torch.Generator(self.device).manual_seed(seed)
        steps, grid = self.schedule(steps, grid)
        return self.diffusion.sample(denoiser, num, length, steps=steps, grid=grid, generator=g, device=self.device,
                                     progress=progress, **kwargs)

    def schedule(self, steps: int | None = None, grid: str | None = None) -> tuple[int, str]:
        """(steps, grid) for sampling: the ones given, else the config's sample.steps and sample.grid
        (a 0 stays 0, for the sampler to refuse)."""
        return (self.config.sample.steps if steps is None else steps), (grid or self.config.sample.grid)

    def check_corpus(self, corpus) -> None:
        """UserError unless `corpus` is tokenized as this model reads: the same kind of tokens,
        vocabulary and (images) shape; a model fed other ids would index outside its embedding or
        score meaningless numbers."""
        have, want = describe_tokens(corpus.tokenizer), describe_tokens(self.tokenizer)
        if have != want:
            raise UserError(f"Corpus {corpus.name!r} holds {have}, but the model {self.source} reads {want}; "
                            f"give it data tokenized its own way.")

    def decode(self, x: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row.tolist()) for row in x]


def model_folder(path: Path) -> Path:
    """The model folder inside a run folder, or the path itself if it is a model folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"No model or run folder at {path}.")
    for candidate in (path, path / "model"):
        if (candidate / "config.json").exists():
            return candidate
    raise UserError(f"{path} holds no trained model (no config.json + model.safetensors); has training finished?")


def describe_tokens(tokenizer) -> str:
    """"char tokens (vocabulary 27)", "image tokens (vocabulary 256, height 7, width 7, ...)"."""
    args = "".join(f", {k} {v}" for k, v in tokenizer.args().items())
    return f"{tokenizer.name} tokens (vocabulary {tokenizer.vocab_size:,}{args})"


def read_model_config(folder: Path) -> tuple[Config, object]:
    """A model folder's config.json, checked field by field: (config, tokenizer).

    format        "md4"
    config        the Config as a mapping (types and ranges: md4.config.from_dict)
    tokenizer     a name in TOKENIZERS (default char)
    tokenizer_args  exactly the tokenizer's ARGS, each a whole number in its range
    vocab_size    the tokenizer's vocabulary (default: it)
    A tokenizer of fixed length (images) must give config.data.length values."""
    path = Path(folder) / "config.json"
    raw = mapping(checkpoint.read_json(path), "the top level", path)
    one_of(raw.get("format", "md4"), ("md4",), "format", path)
    section = field(raw, "config", dict, path, default=raw)  # without "config": an old layout
    try:
        cfg = from_dict(Config, section)
    except UserError as e:
        message = str(e)
        raise UserError(f"In {path}, {message[0].lower()}{message[1:]}") from None
    cls = TOKENIZERS[one_of(raw.get("tokenizer", "char"), TOKENIZERS, "tokenizer", path)]
    args = field(raw, "tokenizer_args", dict, path, default={})
    known_keys(args, cls.ARGS, "tokenizer_args", path)
    tokenizer = cls(**{k: field(args, k, int, path, lo, hi, prefix="tokenizer_args.")
                       for k, (lo, hi) in cls.ARGS.items()})
    vocab_size = field(raw, "vocab_size", int, path, lo=1, default=tokenizer.vocab_size)
    if vocab_size != tokenizer.vocab_size:
        raise fail("vocab_size", path, f"is {vocab_size}, but the {tokenizer.name} tokenizer has "
                   f"{tokenizer.vocab_size}")
    if tokenizer.length not in (None, cfg.data.length):
        raise fail("config.data.length", path, f"is {cfg.data.length}, but tokenizer_args make sequences of "
                   f"{tokenizer.length}")
    return cfg, tokenizer


def load(path: str | Path, device: str | torch.device = "cpu", revision: str | None = None) -> Pretrained:
    """Load a model folder (or the `model/` folder of a run), or a Hugging Face Hub repo id
    ("org/name", "org/name@revision"; md4.hub), for evaluation and sampling."""
    folder = model_folder(hub.resolve(path, revision))
    cfg, tokenizer = read_model_config(folder)
    diffusion, net = build(cfg, tokenizer.vocab_size, saved=True)
    weights = checkpoint.read_weights(folder / "model.safetensors")
    checkpoint.load_into(Bundle(diffusion, net), weights, folder)
    net.eval()
    diffusion.eval()
    return Pretrained(cfg, diffusion, net, tokenizer, folder).to(resolve_device(device))


def model_metadata(cfg: Config, vocab_size: int, tokenizer: str = "char", tokenizer_args: dict | None = None) -> dict:
    """What config.json holds: the config plus what is needed to rebuild the model."""
    meta = {"format": "md4", "vocab_size": vocab_size, "tokenizer": tokenizer, "config": cfg.to_dict()}
    if tokenizer_args:
        meta["tokenizer_args"] = tokenizer_args
    return meta


def check_labels(corpus, split: str, num_classes: int) -> torch.Tensor | None:
    """The split's labels [M] long when the model is class-conditional (num_classes > 0), else
    None; a UserError when the data has no labels or labels outside 0..num_classes-1."""
    if not num_classes:
        return None
    labels = split_labels(corpus, split)
    if labels is None:
        raise UserError(f"model.num_classes={num_classes} asks for a class-conditional model, but corpus "
                        f"{corpus.name!r} has no labels; set model.num_classes=0.")
    if len(labels) and labels.max() >= num_classes:
        raise UserError(f"Corpus {corpus.name!r} has labels up to {labels.max().item()}, but model.num_classes "
                        f"is {num_classes}.")
    return labels
