"""Conditioning a denoiser: class labels, classifier-free guidance, fixed (known) positions.

Everything here wraps a denoiser `net(x_t, t, labels=...)` into the plain `denoiser(x_t, t)`
that the diffusion objects and samplers take, so it works with any method and any sampler.

Classifier-free guidance (Ho & Salimans 2022) for a categorical prediction: with conditional and
unconditional predictions p_c = mu(x_t, t, y) and p_u = mu(x_t, t, null) at each position,

    guided logits = (1 + w) log p_c - w log p_u,   i.e.  p_w  proportional to  p_c^(1+w) / p_u^w,

so w = 0 is the conditional model and w > 0 sharpens towards what the label adds over the
unconditional model. The network learns both predictions from one set of weights by seeing the
null label (id num_classes) in place of the true one with probability train.label_dropout.
"""

from __future__ import annotations

import torch

from md4 import sampling


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator=None) -> torch.Tensor:
    """Replace each label by the null label with probability p (label dropout): [B] long."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def with_labels(net, labels: torch.Tensor | None):
    """denoiser(x_t, t, ...) = net(x_t, t, ..., labels=labels); the network itself when labels is
    None. Any call signature passes through, so methods that call the network differently work too."""
    if labels is None:
        return net
    return Labeled(net, labels)


class Wrapper:
    """What a denoiser wrapping the network `net` passes through: its parameters (so samplers find
    the device) and whether it uses t (md4.nn backbones declare `uses_time`)."""

    net: object

    def parameters(self):
        params = getattr(self.net, "parameters", None)
        return params() if callable(params) else iter(())

    @property
    def uses_time(self) -> bool:
        return getattr(self.net, "uses_time", True)


class Labeled(Wrapper):
    """The network with one class label per row of the batch: [B] long `labels`."""

    def __init__(self, net, labels: torch.Tensor):
        self.net, self.labels = net, labels

    def select_rows(self, rows: torch.Tensor) -> "Labeled":
        """The same denoiser for the sub-batch `rows` (samplers call it on rows that changed)."""
        return Labeled(self.net, self.labels[rows.to(self.labels.device)])

    def __call__(self, x, *args, **kwargs):
        labels = self.labels
        if len(x) != len(labels) and len(labels) and len(x) % len(labels) == 0:
            labels = labels.repeat(len(x) // len(labels))  # a method that stacks draws of the batch (GenMD4)
        return self.net(x, *args, labels=labels, **kwargs)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 + w) log_softmax(cond) - w log_softmax(uncond): [..., V] float32."""
    lc, lu = torch.log_softmax(cond.float(), -1), torch.log_softmax(uncond.float(), -1)
    return (1 + weight) * lc - weight * lu


class Guided(Wrapper):
    """A denoiser with classifier-free guidance: net [B, N] x [B] -> [B, N, V] logits for
    `labels` [B] long with guidance weight w (w = 0: the conditional model, one network call;
    w != 0: the conditional and unconditional passes run as one batch of 2B)."""

    def __init__(self, net, labels: torch.Tensor, weight: float = 0.0, null_label: int | None = None):
        self.net, self.labels, self.weight = net, labels, float(weight)
        self.null_label = getattr(net, "num_classes", None) if null_label is None else null_label
        if self.weight and self.null_label is None:
            raise ValueError("guidance needs the null label id (the network's num_classes)")

    def select_rows(self, rows: torch.Tensor) -> "Guided":
        """The same denoiser for the sub-batch `rows` (samplers call it on rows that changed)."""
        return Guided(self.net, self.labels[rows.to(self.labels.device)], self.weight, self.null_label)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(xt.device)
        if self.weight == 0:
            return self.net(xt, t, labels=labels)
        null = torch.full_like(labels, self.null_label)
        both = self.net(torch.cat([xt, xt]), torch.cat([t, t]), labels=torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return guided_logits(cond, uncond, self.weight)


def conditioned(net, labels: torch.Tensor | None, guidance: float = 0.0):
    """The denoiser for sampling with `labels` (None: unconditional) and guidance weight w."""
    if labels is None:
        return net
    return Guided(net, labels, guidance) if guidance else with_labels(net, labels)


@torch.no_grad()
def infill(model, denoiser, known: torch.Tensor, known_mask: torch.Tensor, steps: int = 256,
           grid: str = "cosine", generator=None, progress: bool = False) -> torch.Tensor:
    """Sample the positions where known_mask is False given the others, kept fixed: [B, N] long.

    known [B, N] long, known_mask [B, N] bool: md4.sampling.sample with known / known_mask (the
    ancestral sampler only changes masked positions, so every known position comes back unchanged)."""
    return sampling.sample(model, denoiser, known.shape[0], known.shape[1], steps=steps, grid=grid,
                           generator=generator, device=known.device, known=known, known_mask=known_mask,
                           progress=progress)
