"""Likelihood evaluation: the NELBO of held-out sequences with honest error bars.

Each sequence gets K Monte-Carlo draws of t, stratified within the sequence
(t_k = (u + k/K) mod 1 with its own u ~ U(0,1)), so sequences are independent and the standard
error across sequences is an honest one. Reported in bits per token (bpc for characters) =
NELBO / (N ln 2) and as perplexity exp(NELBO / N).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def sequence_nelbo(diffusion, denoiser, chunks: torch.Tensor, mc_samples: int = 1, batch_size: int = 32,
                   timesteps: int = 0, seed: int = 0, device=None, progress: bool = False,
                   autocast_dtype=None, labels: torch.Tensor | None = None,
                   known: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence NELBO in nats, averaged over `mc_samples` stratified draws of t: [M] float64.
    labels [M] long: class labels for a class-conditional network (its NELBO of x given y).
    known [M, N] bool: positions given, not scored (the bound on the others given them)."""
    from md4.guidance import with_labels

    device = torch.device(device or "cpu")
    g = torch.Generator(device).manual_seed(seed)
    out = []
    bar = tqdm(total=len(chunks) * mc_samples, desc="evaluating", unit="seq", disable=not progress, leave=False)
    def batches(rows):
        return rows.split(batch_size) if rows is not None else [None] * len(chunks.split(batch_size))

    for x0, y, kn in zip(chunks.split(batch_size), batches(labels), batches(known)):
        x0 = x0.to(device)
        net = with_labels(denoiser, None if y is None else y.to(device))
        u = torch.rand(len(x0), generator=g, device=device)
        total = torch.zeros(len(x0), dtype=torch.float64, device=device)
        for k in range(mc_samples):
            t = torch.remainder(u + k / mc_samples, 1.0)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                total += diffusion.nelbo(net, x0, timesteps=timesteps, generator=g, t=t,
                                         known=None if kn is None else kn.to(device)).double()
            bar.update(len(x0))
        out.append((total / mc_samples).cpu())
    bar.close()
    return torch.cat(out)


def summarize(nelbo: torch.Tensor, length: int) -> dict:
    """Mean and standard error of per-sequence NELBOs [M] (nats) in bits per token and perplexity."""
    m = len(nelbo)
    mean = nelbo.mean().item()
    se = nelbo.std().item() / math.sqrt(m) if m > 1 else float("nan")
    per_tok = length * math.log(2)
    return {
        "sequences": m,
        "length": length,
        "nats_per_sequence": mean,
        "bits_per_token": mean / per_tok,
        "bits_per_token_se": se / per_tok,
        "perplexity": math.exp(mean / length) if mean / length < 709.78 else math.inf,  # beyond: a float overflows
    }
