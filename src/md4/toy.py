"""Toy distributions small enough to enumerate, with their exact denoisers.

For a distribution p over all V^N sequences, the exact denoiser E[x_0 | x_t] is the posterior
marginal at each position. Under a forward process that keeps token i with probability
alpha_{t,i}, the posterior is

    p(x_0 | x_t)  propto  p(x_0) prod_n [ alpha_{t,x_0^n} if x_t^n = x_0^n ; 1 - alpha_{t,x_0^n} if x_t^n = m ]

For MD4 alpha does not depend on the token, the factors cancel and the posterior does not
depend on t. With this denoiser the continuous-time ELBO is tight: E[NELBO] = -log p(x_0).
Used by the tests, and handy for checking new losses and samplers.
"""

from __future__ import annotations

import itertools

import torch


class ToyDistribution:
    """A distribution p over {0..V-1}^N given by a table of probabilities."""

    def __init__(self, probs: torch.Tensor, vocab_size: int, length: int):
        self.vocab_size, self.length = vocab_size, length
        self.sequences = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))  # [K, N]
        self.probs = (probs / probs.sum()).double()  # [K]
        self.onehot = torch.nn.functional.one_hot(self.sequences, vocab_size).double()  # [K, N, V]

    @classmethod
    def random(cls, vocab_size: int = 3, length: int = 3, seed: int = 0):
        """p ~ Dirichlet(1, ..., 1) over the V^N sequences (normalised exponential draws)."""
        g = torch.Generator().manual_seed(seed)
        probs = -torch.rand(vocab_size**length, generator=g, dtype=torch.float64).log()
        return cls(probs, vocab_size, length)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Row index into `sequences` of each x [B, N]: [B] long."""
        powers = self.vocab_size ** torch.arange(self.length - 1, -1, -1)
        return (x.cpu() * powers).sum(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.probs[self.index(x)].log()

    def sample(self, n: int, generator=None) -> torch.Tensor:
        return self.sequences[torch.multinomial(self.probs, n, replacement=True, generator=generator)]

    def denoiser(self, alpha=None):
        """The exact denoiser (x_t [B, N], t [B]) -> logits [B, N, V] (log posterior marginals).

        alpha: None for MD4 (token-independent masking), or a function t [B] -> [B, V] giving
        each token's keep probability (GenMD4's state-dependent schedule)."""
        mask_id = self.vocab_size

        def exact(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xt_ = xt.cpu()[:, None, :]  # [B, 1, N]
            seqs = self.sequences[None]  # [1, K, N]
            masked = xt_ == mask_id
            consistent = (masked | (xt_ == seqs)).all(-1)  # [B, K]
            w = self.probs[None] * consistent
            if alpha is not None:
                a = alpha(t.cpu()).double()  # [B, V]
                a_x0 = torch.gather(a[:, None, :].expand(-1, seqs.shape[1], -1), 2,
                                    seqs.expand(a.shape[0], -1, -1))  # [B, K, N]: alpha_{t, x_0^n}
                w = w * torch.where(masked, 1 - a_x0, a_x0).prod(-1)
            w = w / w.sum(-1, keepdim=True)
            mu = torch.einsum("bk,knv->bnv", w, self.onehot)
            return mu.log().float().to(xt.device)

        return exact
