"""The method base class: what every training method is, and what it can do, declared in one place.

A method (MD4, GenMD4, SEDD, the AR baseline) is an nn.Module over a vocabulary of V tokens
(id V is the mask, or AR's BOS) that takes any `denoiser(x_t, t) -> logits [B, N, V]` and gives

    loss(denoiser, x0, generator)                        scalar, nats per sequence (training)
    nelbo(denoiser, x0, timesteps, generator, t, known)  [B] nats (a bound, or the exact NLL;
                                                         known [B, N] bool: of the rest given these)
    sample(denoiser, num_samples, length, ...)           [num_samples, length] long

Its own parameters (GenMD4's learnable schedule) train and save with the network. What it can do
is declared as class attributes below; callers (the builder, the samplers, evaluation, the CLI)
read them instead of probing. A sampler in md4.sampling names the capabilities it needs.
"""

from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    """Base class of the training methods; subclasses override the capabilities they change."""

    #: what the method is, in one line (a model card's first sentence says "A <description> model")
    description: str = ""

    #: the network must be causal: position n sees only positions <= n (the AR baseline)
    causal: bool = False
    #: nelbo is the exact negative log-likelihood (one pass, no time), not a bound
    exact_likelihood: bool = False
    #: nelbo has no discrete-time form (timesteps must be 0)
    continuous_time_only: bool = False
    #: the network must see t (its exact denoiser depends on t): built with model.time_cond on
    needs_time_cond: bool = False
    #: generation walks a time grid with reverse_step, so md4.sampling's samplers apply;
    #: False: the method draws on its own (AR, left to right) and takes no sampler options
    reverse_process: bool = True
    #: the network's softmax is mu = E[x_0 | x_t], so tokens may be drawn from it directly
    predicts_mean: bool = True
    #: one masking schedule for all tokens (alpha_t is [*t.shape], not [*t.shape, V])
    shared_schedule: bool = True

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.mask_id = self.vocab_size

    @classmethod
    def from_config(cls, vocab_size: int, cfg) -> Method:
        """Built from a config (md4.config.Config) by md4.build; by default cls(vocab_size, cfg.schedule)."""
        return cls(vocab_size, cfg.schedule)

    def loss(self, denoiser, x0: torch.Tensor, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def nelbo(self, denoiser, x0: torch.Tensor, timesteps: int = 0, generator=None,
              t: torch.Tensor | None = None, known: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, denoiser, num_samples: int, length: int, **kwargs) -> torch.Tensor:
        raise NotImplementedError
