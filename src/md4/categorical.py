"""The categorical draw every sampler and method uses: inverse CDF in float64.

float64 matters: float32 Gumbel/categorical draws truncate small probabilities and bias
generative perplexity (shared/MATH.md, "Sampling").
"""

from __future__ import annotations

import torch


def categorical(logits: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per position from softmax(logits): [..., V] -> [...] long. With p = softmax in
    float64 and u ~ U(0, 1) per position, the first k with cdf_k > u * cdf_V."""
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)
