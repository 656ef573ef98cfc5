"""The autoregressive baseline: the same transformer with causal attention and next-token loss.

    log p(x_0) = sum_n log p(x_0^n | x_0^{<n})

The network sees the sequence shifted right by one, with a BOS token in front:
input [BOS, x^0, ..., x^{N-2}] -> logits [B, N, V] whose row n predicts x^n. BOS is the extra
input id V (the id the diffusion models use for the mask), so the backbone is built exactly as
for MD4: an embedding of V + 1 symbols and a head of V logits. The likelihood is exact, so
`nelbo` ignores t and the number of time steps, and `sample` draws left to right (in float64).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from md4.categorical import categorical
from md4.method import Method


class AR(Method):
    """Next-token prediction with the shared backbone; `causal = True` asks md4.build for a causal
    network. Built as AR(vocab_size, schedule) like every method; the schedule is unused."""

    description = "an autoregressive baseline (the same transformer, causal, next-token loss; exact likelihood)"
    causal = True
    exact_likelihood = True  # nelbo is the exact negative log-likelihood, not a bound
    reverse_process = False  # draws left to right on its own: no time grid, no sampler options
    predicts_mean = False

    def __init__(self, vocab_size: int, schedule=None):
        super().__init__(vocab_size)
        self.bos_id = self.mask_id

    def shift(self, x0: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, N]: BOS then x0 without its last token."""
        bos = torch.full_like(x0[:, :1], self.bos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def nelbo(self, net, x0: torch.Tensor, timesteps: int = 0, generator=None,
              t: torch.Tensor | None = None, known: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x0) of each sequence: [B] nats (exact; t and timesteps are ignored).
        known [B, N] bool, a prefix of each row: -log p(x0[~known] | x0[known]), the sum of the
        other positions' terms (exact when the known positions come first).

        The network is called with t = 0 (a time-conditioned backbone sees a constant)."""
        zeros = torch.zeros(x0.shape[0], device=x0.device)
        logp = torch.log_softmax(net(self.shift(x0), zeros).float(), dim=-1)
        nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        return (nll if known is None else nll.masked_fill(known, 0.0)).sum(-1)

    def loss(self, net, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """Training loss (scalar): mean negative log-likelihood, nats per sequence."""
        return self.nelbo(net, x0).mean()

    @torch.no_grad()
    def sample(self, net, num_samples: int, length: int, steps: int = 0, grid: str = "", generator=None,
               device=None, progress: bool = False, **kwargs) -> torch.Tensor:
        """[num_samples, length] long, drawn left to right from softmax in float64 (steps and grid
        are ignored: an AR model takes exactly `length` network calls; no KV cache)."""
        if device is None:
            device = next(net.parameters()).device
        x = torch.full((num_samples, length + 1), self.bos_id, dtype=torch.long, device=device)
        zeros = torch.zeros(num_samples, device=device)
        for n in tqdm(range(length), desc="sampling", disable=not progress, leave=False):
            logits = net(x[:, : n + 1], zeros)[:, -1]
            x[:, n + 1] = categorical(logits, generator)
        return x[:, 1:]
