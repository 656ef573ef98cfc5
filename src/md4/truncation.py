"""Temperature, top-k and top-p (nucleus) truncation of the denoiser's prediction.

Every sampler draws tokens from softmax(logits) of the denoiser; these transforms change that
prediction before the draw, the same way for every sampler. Applied in the usual order:
temperature first, then top-k, then top-p. Probabilities are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from md4.errors import UserError


@dataclass(frozen=True)
class Truncation:
    """temperature: logits / temperature (0 = argmax, 1 = unchanged); top_k: keep the k most
    likely tokens (0 = all); top_p: keep the smallest set of most likely tokens whose mass is
    at least p (1 = all)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise UserError(f"The temperature must be >= 0, got {self.temperature}.")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise UserError(f"top-k must be a whole number >= 1 (or 0 for no truncation), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must lie in (0, 1], got {self.top_p}.")

    @property
    def identity(self) -> bool:
        return self.temperature == 1 and self.top_k == 0 and self.top_p == 1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] -> float64 logits [..., V]; removed tokens get -inf."""
        logits = logits.double()
        if self.identity:
            return logits
        if self.temperature == 0:
            return argmax_logits(logits)
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(int(self.top_k), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if self.top_p < 1:
            logits = top_p_logits(logits, self.top_p)
        return logits


NO_TRUNCATION = Truncation()


def argmax_logits(logits: torch.Tensor) -> torch.Tensor:
    """0 at the argmax of each row (the first one on ties), -inf elsewhere: [..., V]."""
    out = torch.full_like(logits, -torch.inf)
    return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)


def top_p_logits(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens with total probability >= p: [..., V] float64.

    A token is kept when the mass of the tokens strictly more likely than it (in sorted order) is
    still below p; the most likely token is always kept."""
    probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, -torch.inf)
