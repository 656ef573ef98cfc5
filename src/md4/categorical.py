"""Categorical draws by inverse CDF in float64, shared by every sampler and method.

float64 matters: float32 Gumbel/categorical draws truncate small probabilities and bias
generative perplexity (shared/MATH.md, "Sampling").
"""

from __future__ import annotations

import torch


def inverse_cdf(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per position with P(k) proportional to weights[..., k] >= 0: [..., K] -> [...] long.

    k is the first index with cdf_k > u * cdf_K, u ~ U(0, 1) in float64 (one per position)."""
    cdf = weights.double().cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)


def categorical(logits: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per position from softmax(logits), computed in float64: [..., V] -> [...] long."""
    return inverse_cdf(torch.softmax(logits.double(), dim=-1), generator)
