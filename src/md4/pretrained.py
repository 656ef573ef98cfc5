"""Load a trained model for evaluation and sampling (md4.build builds untrained ones).

    m = md4.load("runs/demo")          # a run folder, or a model folder (config.json + model.safetensors)
    x = m.sample(4, steps=256)         # [4, N] long
    print(m.decode(x))

This module does not import the training code.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from md4 import checkpoint, hub
from md4.build import TOKENIZERS, Bundle, build, resolve_device, upgrade_weights
from md4.config import Config, from_dict
from md4.errors import UserError
from md4.method import Method
from md4.nn import Backbone
from md4.validate import fail, field, in_file, known_keys, mapping, one_of


@dataclass
class Pretrained:
    """A trained model: config, method (MD4, GenMD4, SEDD, AR), network (in eval mode) and tokenizer."""

    config: Config
    method: Method
    net: Backbone
    tokenizer: object
    source: Path
    finite_checked: bool = dataclasses.field(default=False, repr=False)  # check_finite passed once (weights fixed)

    @property
    def diffusion(self) -> Method:
        """The method under its earlier name."""
        return self.method

    @property
    def length(self) -> int:
        return self.config.data.length

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "Pretrained":
        self.net.to(device)
        self.method.to(device)
        return self

    @property
    def num_classes(self) -> int:
        """> 0 for a class-conditional model (labels 0..num_classes-1; num_classes = unconditional)."""
        return self.config.model.num_classes

    def denoiser(self, labels=None, guidance: float = 0.0):
        """The network as denoiser(x_t, t): for class `labels` ([num] long, or an int for all;
        None = unconditional) with classifier-free guidance weight `guidance` (0 = none; without
        labels, guidance on the prompt given to the sampler, md4.guidance). A
        network whose logits overflow is refused first (see check_finite)."""
        from md4.guidance import conditioned

        if not math.isfinite(guidance):
            raise UserError(f"The guidance weight must be a finite number, got {guidance}.")
        self.check_finite()
        if labels is None:  # with guidance: on the prompt the sampler is given
            return conditioned(self.net, None, guidance)
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
        silently. One forward pass of one sequence, once per loaded model."""
        if self.finite_checked:
            return
        x = torch.full((1, self.length), self.method.mask_id, device=self.device)
        if not torch.isfinite(self.net(x, torch.ones(1, device=self.device))).all():
            raise UserError(f"Model {self.source} predicts non-finite logits for a fully masked sequence; "
                            f"its weights overflow or are damaged.")
        self.finite_checked = True

    def sample(self, num: int, steps: int | None = None, grid: str | None = None, length: int | None = None,
               seed: int = 0, progress: bool = False, labels=None, guidance: float = 0.0,
               **kwargs) -> torch.Tensor:
        """[num, length] long samples; kwargs go to md4.sampling.sample (sampler, known / known_mask,
        temperature, top_k, top_p, block, callback, ...). With `block`, a sequence of any length is
        generated in windows of the training length. `labels` (int or [num]) for class-conditional
        models, and `guidance` (classifier-free guidance on the labels, or without labels on the
        prompt: known / known_mask)."""
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
        return self.method.sample(denoiser, num, length, steps=steps, grid=grid, generator=g, device=self.device,
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


def tokenizer_arg(args: dict, key: str, spec, path: Path):
    """args[key] checked by a tokenizer's ARGS entry: (lo, hi) a whole number in lo..hi, or a type."""
    typ, lo, hi = (int, *spec) if isinstance(spec, tuple) else (spec, None, None)
    return field(args, key, typ, path, lo, hi, prefix="tokenizer_args.")


def read_model_config(folder: Path) -> tuple[Config, object]:
    """A model folder's config.json, checked field by field: (config, tokenizer).

    format        "md4"
    config        the Config as a mapping (types and ranges: md4.config.from_dict)
    tokenizer     a name in TOKENIZERS (default char)
    tokenizer_args  exactly the tokenizer's ARGS, each a whole number in its range (lo, hi) or a
                  value of its type (records: the symbols, a list of strings)
    vocab_size    the tokenizer's vocabulary (default: it)
    A tokenizer of fixed length (images) must give config.data.length values."""
    path = Path(folder) / "config.json"
    raw = mapping(checkpoint.read_json(path), "the top level", path)
    one_of(raw.get("format", "md4"), ("md4",), "format", path)
    section = field(raw, "config", dict, path, default=raw)  # without "config": an old layout
    cfg = in_file(path, from_dict, Config, section)
    cls = TOKENIZERS[one_of(raw.get("tokenizer", "char"), TOKENIZERS, "tokenizer", path)]
    args = field(raw, "tokenizer_args", dict, path, default={})
    known_keys(args, cls.ARGS, "tokenizer_args", path)
    tokenizer = in_file(path, cls, **{k: tokenizer_arg(args, k, spec, path) for k, spec in cls.ARGS.items()})
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
    method, net = build(cfg, tokenizer.vocab_size, saved=True, tokenizer=tokenizer)
    weights = upgrade_weights(checkpoint.read_weights(folder / "model.safetensors"))
    checkpoint.load_into(Bundle(method, net), weights, folder)
    net.eval()
    method.eval()
    return Pretrained(cfg, method, net, tokenizer, folder).to(resolve_device(device))
