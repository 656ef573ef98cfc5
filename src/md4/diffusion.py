"""MD4: masked (absorbing) diffusion with one masking schedule for all tokens.

Notation (shared/MATH.md): x_0 is [B, N] long with values in {0..V-1}; the mask id is m = V.
A `denoiser(x_t, t)` is any callable mapping x_t [B, N] long (values 0..V) and t [B] float to
logits [B, N, V]; its softmax is mu_theta(x_t, t), the estimate of E[x_0 | x_t]. Nothing here
assumes the denoiser is an nn.Module, so the math can be tested with an exact denoiser.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from md4 import schedules
from md4.categorical import inverse_cdf, uniforms
from md4.method import Method
from md4.truncation import NO_TRUNCATION, Truncation

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def antithetic_times(batch: int, generator=None, device=None) -> torch.Tensor:
    """t_b = (u + b/B) mod 1 with one u ~ U(0,1) per batch: [B] float, stratified over [0, 1)."""
    u = torch.rand((), generator=generator, device=device)
    return torch.remainder(u + torch.arange(batch, device=device) / batch, 1.0)


def masked_cross_entropy(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """sum over masked positions n of -log mu^n_{x_0^n}: [B] float32 (logits [B, N, V])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return torch.where(xt == mask_id, nll, torch.zeros_like(nll)).sum(-1)


class MD4(Method):
    """The MD4 forward process, negative ELBO and ancestral reverse step.

    An nn.Module (md4.method.Method) so that subclasses with learnable schedules (GenMD4) save
    and move like any other module; MD4 itself has no parameters.
    """

    description = "MD4: masked (absorbing) diffusion with one masking schedule for all tokens (Shi et al. 2024)"

    def __init__(self, vocab_size: int, schedule: schedules.Schedule | str = "linear"):
        super().__init__(vocab_size)
        self.schedule = schedules.get(schedule) if isinstance(schedule, str) else schedule

    # ----------------------------------------------------------------- forward process
    def forward_sample(self, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): keep each token with probability alpha_t, else mask. t: [B]."""
        alpha = self.schedule.alpha(t).to(x0.device).unsqueeze(-1)
        keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha
        return torch.where(keep, x0, torch.full_like(x0, self.mask_id))

    def reconstruction(self, length: int) -> float:
        """The t=0 term the reference code adds: N (1 - alpha_0) log V nats."""
        alpha0 = self.schedule.alpha(torch.zeros(())).item()
        return length * (1 - alpha0) * math.log(self.vocab_size)

    # ----------------------------------------------------------------- objective
    def nelbo(
        self,
        denoiser: Denoiser,
        x0: torch.Tensor,
        timesteps: int = 0,
        generator=None,
        t: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One-sample unbiased estimate of the negative ELBO of each sequence: [B] nats.

        The skeleton every masked method shares: uniform draws t [B] in [0, 1) (antithetic across
        the batch unless given) -> times `bound_times` -> x_t ~ q(x_t | x_0) -> one denoiser call ->
        `time_weight` x `masked_terms` (the integrand) + `constant_terms`. Each method overrides
        the hooks it changes (GenMD4: a time cut-off and its reconstruction term; SEDD: score entropy).
        known [B, N] bool: the conditional bound on -log p(x_0[~known] | x_0[known]): known positions
        are never masked, and the sums (and N) run over the other positions only."""
        t = self.bound_times(antithetic_times(len(x0), generator, x0.device) if t is None else t, timesteps)
        xt = given(self.forward_sample(x0, t, generator), x0, known)
        return (self.time_weight(timesteps) * self.masked_terms(denoiser(xt, t), x0, xt, t, timesteps)
                + self.constant_terms(x0, known, timesteps))

    def bound_times(self, t: torch.Tensor, timesteps: int = 0) -> torch.Tensor:
        """The times [B] at which the bound is evaluated: t itself in continuous time; for
        timesteps = T, t rounded up to the grid, i/T with i uniform in 1..T."""
        return (torch.floor(t * timesteps) + 1) / timesteps if timesteps else t

    def masked_terms(self, logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     timesteps: int = 0) -> torch.Tensor:
        """The NELBO of each sequence given x_t, without the constant terms: [B] nats.

        timesteps=0: continuous time,  -w(t) * sum_{n masked} -log mu^n_{x_0^n}.
        timesteps=T: discrete time with s = t - 1/T,
                     T * (alpha_s - alpha_t) / (1 - alpha_t) * sum_{n masked} -log mu^n_{x_0^n}."""
        if timesteps:
            a_t, a_s = self.schedule.alpha(t), self.schedule.alpha(t - 1 / timesteps)
            weight = timesteps * (a_s - a_t) / (1 - a_t)
        else:
            weight = -self.schedule.weight(t)
        return weight * masked_cross_entropy(logits, x0, xt, self.mask_id)

    def time_weight(self, timesteps: int = 0) -> float:
        """d(time)/d(draw) of `bound_times`: the factor of the integrand in the one-sample estimate."""
        return 1.0

    def constant_terms(self, x0: torch.Tensor, known: torch.Tensor | None = None,
                       timesteps: int = 0) -> float | torch.Tensor:
        """The terms of the bound that no network changes, in nats (a float, or [B]): here the
        reconstruction term of the positions not `known`."""
        return self.reconstruction(free_positions(x0.shape[1], known))

    def loss(self, denoiser: Denoiser, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """Training loss (scalar): the batch mean of the continuous-time NELBO, nats per sequence."""
        return self.nelbo(denoiser, x0, generator=generator).mean()

    # ----------------------------------------------------------------- reverse process
    def reveal(self, logits: torch.Tensor, t: float, s: float, truncate: Truncation = NO_TRUNCATION):
        """The reverse step from t to s < t at a masked position, in two parts: (P(unmask) [...]
        float64, broadcastable to the positions of logits [..., V]; the logits [..., V] of the token
        it becomes, given that it unmasks). For MD4, P(unmask) = (alpha_s - alpha_t) / (1 - alpha_t)
        and the token follows mu. Truncation (temperature, top-k, top-p) applies to the token only:
        it changes which token is revealed, never when (issue 13, item 8)."""
        a_t, a_s = (self.schedule.alpha(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        return ((a_s - a_t) / (1 - a_t)).to(logits.device), truncate(logits)

    def reverse_step(self, xt: torch.Tensor, logits: torch.Tensor, t: float, s: float, generator=None,
                     truncate: Truncation = NO_TRUNCATION) -> torch.Tensor:
        """Draw x_s ~ p(x_s | x_t) for s < t (logits: the denoiser's, untruncated). Each masked
        position unmasks with `reveal`'s probability and then takes a token from its token logits;
        unmasked positions stay. Probabilities are computed and drawn in float64; tokens are drawn only
        at the positions that unmask (a float64 draw over V = 50257 at every position cost several
        times the network's forward pass at length 1024)."""
        p_unmask, token_logits = self.reveal(logits, t, s, truncate)
        u = torch.rand(xt.shape, generator=generator, device=xt.device, dtype=torch.float64)
        unmask = (xt == self.mask_id) & (u < p_unmask)
        u_token = uniforms(xt.shape, generator, xt.device)  # those of a full draw: same samples per seed
        xs = xt.clone()
        xs[unmask] = inverse_cdf(token_logits[unmask], u_token[unmask])
        return xs

    def posterior_sample(
        self, xt: torch.Tensor, x0: torch.Tensor, t: float, s: float, generator=None
    ) -> torch.Tensor:
        """Draw x_s ~ q(x_s | x_t, x_0) for s < t (x_t, x_0: [B, N] long): a masked position
        becomes x_0 with probability (alpha_s - alpha_t) / (1 - alpha_t), else stays masked.
        With x_0 ~ mu_theta(x_t) this is the reverse step in two stages (the `mean` sampler)."""
        a_t, a_s = (self.schedule.alpha(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        p = ((a_s - a_t) / (1 - a_t)).to(xt.device)
        if p.dim():  # one schedule per token (GenMD4): alpha [V], taken at x_0
            p = p[x0]
        u = torch.rand(xt.shape, generator=generator, device=xt.device, dtype=torch.float64)
        return torch.where((xt == self.mask_id) & (u < p), x0, xt)

    def sample(self, denoiser: Denoiser, num_samples: int, length: int, steps: int = 1000,
               grid: str = "cosine", generator=None, device=None, **kwargs) -> torch.Tensor:
        """Generate [num_samples, length] long with no mask left; see md4.sampling.sample."""
        from md4 import sampling

        return sampling.sample(self, denoiser, num_samples, length, steps=steps, grid=grid,
                               generator=generator, device=device, **kwargs)


def given(xt: torch.Tensor, x0: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """x_t with the `known` positions ([B, N] bool, or None) unmasked: x_0 there, for conditional bounds."""
    return xt if known is None else torch.where(known, x0, xt)


def free_positions(length: int, known: torch.Tensor | None) -> int | torch.Tensor:
    """The number of positions a bound covers: N, or [B] the positions not `known` ([B, N] bool)."""
    return length if known is None else (~known).sum(-1)

