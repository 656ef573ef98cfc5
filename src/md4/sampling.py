"""Time grids and samplers for masked diffusion models.

A sampler walks a time grid 0 = t(0) < t(1) < ... < t(T) = 1 from t(T) down to t(0), starting
from the all-mask sequence and applying the model's reverse step; positions still masked at the
end are filled with the argmax of the prediction (shared/MATH.md, "Sampling").
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from md4.errors import UserError


def uniform_grid(steps: int) -> torch.Tensor:
    """t(i) = i / T, i = 0..T: [T+1] float64."""
    return torch.arange(steps + 1, dtype=torch.float64) / steps


def cosine_grid(steps: int) -> torch.Tensor:
    """t(i) = cos(pi/2 (1 - i/T)), i = 0..T: [T+1] float64, denser near t = 1 where sampling starts.

    With the linear schedule it visits the cosine schedule's alphas on the uniform grid, so few
    tokens are revealed in the first steps."""
    t = torch.cos(math.pi / 2 * (1 - uniform_grid(steps)))
    t[0] = 0.0
    return t


GRIDS = {"uniform": uniform_grid, "cosine": cosine_grid}


def time_grid(steps: int, grid: str = "cosine") -> torch.Tensor:
    if grid not in GRIDS:
        raise UserError(f"Unknown time grid {grid!r}; choose one of {', '.join(GRIDS)}.")
    if int(steps) < 1:
        raise UserError(f"The number of sampling steps must be at least 1, got {steps}.")
    return GRIDS[grid](int(steps))


def _default_device(denoiser, device):
    if device is not None:
        return torch.device(device)
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def ancestral(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None,
              progress: bool = False) -> torch.Tensor:
    """The ancestral sampler (the paper's Algorithm 2): x [B, N] (masks where to generate)."""
    B = x.shape[0]
    for i in tqdm(range(len(grid) - 1, 0, -1), desc="sampling", disable=not progress, leave=False):
        t, s = grid[i].item(), grid[i - 1].item()
        logits = denoiser(x, torch.full((B,), t, device=x.device))
        x = model.reverse_step(x, logits, t, s, generator)
    return x


SAMPLERS = {"ancestral": ancestral}


@torch.no_grad()
def sample(model, denoiser, num_samples: int, length: int, steps: int = 1000, grid: str = "cosine",
           generator=None, device=None, sampler: str = "ancestral", progress: bool = False) -> torch.Tensor:
    """Generate [num_samples, length] long sequences with no mask left."""
    if sampler not in SAMPLERS:
        raise UserError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    device = _default_device(denoiser, device)
    times = time_grid(steps, grid)
    x = torch.full((num_samples, length), model.mask_id, dtype=torch.long, device=device)
    x = SAMPLERS[sampler](model, denoiser, x, times, generator=generator, progress=progress)
    masked = x == model.mask_id
    if masked.any():  # rare: a position that never unmasked, filled with the argmax at t = 0
        logits = denoiser(x, torch.zeros(num_samples, device=device))
        x = torch.where(masked, logits.argmax(-1), x)
    return x
