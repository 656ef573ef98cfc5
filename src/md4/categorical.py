"""The categorical draw every sampler and method uses: inverse CDF in float64.

float64 matters: float32 Gumbel/categorical draws truncate small probabilities and bias
generative perplexity (shared/MATH.md, "Sampling").

`categorical` = `inverse_cdf(logits, uniforms(...))`. A sampler that needs tokens at only some
positions draws the uniforms for all of them and inverts only where needed: the same tokens as
the full draw there, for a fraction of the cost (a float64 softmax over V = 50,257 at every one of
1024 positions cost more than the network).
"""

from __future__ import annotations

import torch


def uniforms(shape, generator=None, device=None) -> torch.Tensor:
    """u ~ U(0, 1) in float64, one per position: [*shape]."""
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64)


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[..., V] logits and [...] uniforms -> [...] long: with p = softmax in float64, the first k
    with cdf_k > u * cdf_V."""
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    idx = torch.searchsorted(cdf, u[..., None] * cdf[..., -1:]).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)


def categorical(logits: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per position from softmax(logits): [..., V] -> [...] long."""
    return inverse_cdf(logits, uniforms(logits.shape[:-1], generator, logits.device))
