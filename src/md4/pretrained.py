"""Load a trained model for evaluation and sampling (md4.build builds untrained ones).

    m = md4.load("runs/demo")          # a run folder, or a model folder (config.json + model.safetensors)
    x = m.sample(4, steps=256)         # [4, N] long
    print(m.decode(x))

This module does not import the training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from md4 import checkpoint
from md4.build import TOKENIZERS, Bundle, build, resolve_device, upgrade_weights
from md4.config import Config, from_dict
from md4.errors import UserError
from md4.method import Method
from md4.nn import Backbone


@dataclass
class Pretrained:
    """A trained model: config, method (MD4, GenMD4, SEDD, AR), network (in eval mode) and tokenizer."""

    config: Config
    method: Method
    net: Backbone
    tokenizer: object
    source: Path

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
        None = unconditional) with classifier-free guidance weight `guidance` (0 = none)."""
        from md4.guidance import conditioned

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

    def sample(self, num: int, steps: int | None = None, grid: str | None = None, length: int | None = None,
               seed: int = 0, progress: bool = False, labels=None, guidance: float = 0.0,
               **kwargs) -> torch.Tensor:
        """[num, length] long samples; kwargs go to md4.sampling.sample (sampler, known / known_mask,
        temperature, top_k, top_p, block, callback, ...). With `block`, a sequence of any length is
        generated in windows of the training length. `labels` (int or [num]) and `guidance` for
        class-conditional models (classifier-free guidance)."""
        limit = self.net.max_length
        known = kwargs.get("known")
        length = length or (known.shape[-1] if known is not None else self.length)
        if kwargs.get("block"):
            kwargs.setdefault("window", min(self.length, limit))
        elif length > limit:
            raise UserError(f"This model handles sequences of at most {limit} tokens, not {length}; "
                            "generate longer ones in blocks (block=...).")
        if labels is not None and torch.as_tensor(labels).ndim == 0:
            labels = torch.full((num,), int(labels), dtype=torch.long)
        denoiser = self.denoiser(labels, guidance)
        g = torch.Generator(self.device).manual_seed(seed)
        return self.method.sample(denoiser, num, length, steps=steps or self.config.sample.steps,
                                     grid=grid or self.config.sample.grid, generator=g, device=self.device,
                                     progress=progress, **kwargs)

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


def load(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a model folder (or the `model/` folder of a run) for evaluation and sampling."""
    folder = model_folder(Path(path))
    raw = checkpoint.read_json(folder / "config.json")
    cfg = from_dict(Config, raw.get("config", raw))
    vocab_size = int(raw.get("vocab_size", 0))
    tok_name = raw.get("tokenizer", "char")
    if tok_name not in TOKENIZERS:
        raise UserError(f"Model {folder} uses an unknown tokenizer {tok_name!r}.")
    tokenizer = TOKENIZERS[tok_name](**raw.get("tokenizer_args", {}))
    method, net = build(cfg, vocab_size or tokenizer.vocab_size)
    weights = upgrade_weights(checkpoint.read_weights(folder / "model.safetensors"))
    checkpoint.load_into(Bundle(method, net), weights, folder)
    net.eval()
    method.eval()
    return Pretrained(cfg, method, net, tokenizer, folder).to(resolve_device(device))
