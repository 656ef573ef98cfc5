"""Conditioning a denoiser: class labels, classifier-free guidance, fixed (known) positions.

Everything here wraps a denoiser `net(x_t, t, labels=...)` into the plain `denoiser(x_t, t)`
that the diffusion objects and samplers take, so it works with any method and any sampler.

Classifier-free guidance (Ho & Salimans 2022) for a categorical prediction: with conditional and
unconditional predictions p_c = mu(x_t, t, y) and p_u = mu(x_t, t, null) at each position,

    guided logits = (1 + w) log p_c - w log p_u,   i.e.  p_w  proportional to  p_c^(1+w) / p_u^w,

so w = 0 is the conditional model and w > 0 sharpens towards what the condition adds over the
unconditional model. The condition is either
- a class label y: the unconditional prediction takes the null label (id num_classes), which the
  network learns by seeing it in place of the true one with probability train.label_dropout; or
- a text prompt (no label): the unconditional prediction sees x_t with the prompt's positions
  masked (as LLaDA does), which any masked diffusion model has learned. The prompt is what the
  sampler was given: md4.sampling.sample tells the denoiser (`with_prompt`) which positions were
  unmasked when each run began (the prompt, the known positions of an infilling, a window's context).
Guidance is a heuristic: p_w is not the conditional model's distribution unless w = 0.
"""

from __future__ import annotations

import torch

from md4 import sampling
from md4.errors import UserError


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
    """A denoiser with classifier-free guidance: net [B, N] x [B] -> [B, N, V] logits with guidance
    weight w, conditioned on `labels` [B] long (unconditional: the null label), or with labels None
    on the prompt (unconditional: the `prompt` positions [B, N] bool set to mask_id; `with_prompt`
    sets them). w = 0: the conditional model, one network call; w != 0: the conditional and
    unconditional passes run as one batch of 2B."""

    def __init__(self, net, labels: torch.Tensor | None, weight: float = 0.0, null_label: int | None = None,
                 prompt: torch.Tensor | None = None, mask_id: int | None = None):
        self.net, self.labels, self.weight = net, labels, float(weight)
        self.prompt, self.mask_id = prompt, mask_id
        self.null_label = getattr(net, "num_classes", None) if null_label is None else null_label
        if self.weight and labels is not None and self.null_label is None:
            raise ValueError("guidance needs the null label id (the network's num_classes)")

    def select_rows(self, rows: torch.Tensor) -> "Guided":
        """The same denoiser for the sub-batch `rows` (samplers call it on rows that changed)."""
        def pick(v):
            return None if v is None else v[rows.to(v.device)]

        return Guided(self.net, pick(self.labels), self.weight, self.null_label, pick(self.prompt), self.mask_id)

    def with_prompt(self, given: torch.Tensor, mask_id: int) -> "Guided":
        """Guidance on the prompt `given` ([B, N] bool, the positions a sampler was given): the
        unconditional prediction masks them. Label guidance keeps them (returns itself)."""
        if self.labels is not None or not self.weight:
            return self
        if not given.any():
            raise UserError("Guidance needs a class label (--label) or a prompt to guide towards "
                            "(--prompt or --infill).")
        return Guided(self.net, None, self.weight, self.null_label, given, mask_id)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = None if self.labels is None else self.labels.to(xt.device)
        if self.weight == 0:
            return self.net(xt, t) if labels is None else self.net(xt, t, labels=labels)
        if labels is None:
            if self.prompt is None:
                raise UserError("Guidance without a class label needs a prompt (md4.sampling.sample gives it).")
            unprompted = xt.masked_fill(self.prompt.to(xt.device), self.mask_id)
            both = self.net(torch.cat([xt, unprompted]), torch.cat([t, t]))
        else:
            null = torch.full_like(labels, self.null_label)
            both = self.net(torch.cat([xt, xt]), torch.cat([t, t]), labels=torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return guided_logits(cond, uncond, self.weight)


def conditioned(net, labels: torch.Tensor | None, guidance: float = 0.0):
    """The denoiser for sampling with `labels` (None: unconditional, or guided on the prompt when
    guidance != 0) and guidance weight w."""
    if guidance:
        return Guided(net, labels, guidance)
    return with_labels(net, labels)


@torch.no_grad()
def infill(model, denoiser, known: torch.Tensor, known_mask: torch.Tensor, steps: int = 256,
           grid: str = "cosine", generator=None, progress: bool = False) -> torch.Tensor:
    """Sample the positions where known_mask is False given the others, kept fixed: [B, N] long.

    known [B, N] long, known_mask [B, N] bool: md4.sampling.sample with known / known_mask (the
    ancestral sampler only changes masked positions, so every known position comes back unchanged)."""
    return sampling.sample(model, denoiser, known.shape[0], known.shape[1], steps=steps, grid=grid,
                           generator=generator, device=known.device, known=known, known_mask=known_mask,
                           progress=progress)
