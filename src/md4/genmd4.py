"""GenMD4: masked diffusion whose masking schedule depends on the token's value (shared/MATH.md,
"GenMD4: state-dependent schedules").

Each token value i has its own learnable polynomial schedule, clipped like every md4 schedule:

    alpha_{t,i} = (1 - 2 eps)(1 - t^{w_i}) + eps,      w_i = exp(log_w_i) > 0,   eps = 1e-4

so w = 1 for every token is exactly md4.schedules.Linear. A larger w_i keeps token i longer in
the forward process, hence reveals it earlier in generation. (The reference code uses
w = softplus(raw), 1 - (1 - eps) t^w and rescales time to [1e-3, 1]; the exponential keeps
weight decay meaningful, pulling w towards the linear schedule, and the clipping above makes
w = 1 match MD4 exactly. The family of schedules is the same.)

With lambda_{t,j} = -alpha'_{t,j} / (1 - alpha_{t,j}) >= 0 (for the polynomial, about w_j / t), the
continuous-time NELBO of a sequence is

    L = integral_0^1 E_{q(x_t|x_0)} [ sum_{n: x_t^n = m} ( -lambda_{t,i} log mu^n_i + sum_j mu^n_j (lambda_{t,j} - lambda_{t,i}) ) ] dt

with i = x_0^n and mu^n = softmax of the denoiser's logits; this is MATH.md's
sum_j (alpha'_j / (1 - alpha_j)) [x_{0,j} - mu_j + x_{0,j} log mu_j] rewritten with sum_j mu_j = 1,
so that the second term vanishes exactly when all w are equal (and L is MD4's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from md4 import schedules
from md4.categorical import categorical
from md4.diffusion import MD4, Denoiser, antithetic_times
from md4.errors import UserError


class LearnablePoly(nn.Module, schedules.Schedule):
    """alpha_{t,i} = (1 - 2 eps)(1 - t^{w_i}) + eps for each token value i: one exponent per token.

    `log_w` [V] is the nn.Parameter (saved as "method.schedule.log_w"); `w` = exp(log_w).
    alpha(t), dalpha(t), weight(t): t [*S] -> [*S, V] (the formulas of md4.schedules.Schedule)."""

    name = "learnable-poly"

    def __init__(self, vocab_size: int, w=None, eps: float = schedules.EPS):
        nn.Module.__init__(self)
        self.eps = eps
        w = torch.ones(vocab_size) if w is None else torch.as_tensor(w, dtype=torch.float32).detach().clone()
        if w.shape != (vocab_size,):
            raise UserError(f"GenMD4 needs one exponent per token: {vocab_size} values, got shape {tuple(w.shape)}.")
        if not (torch.isfinite(w).all() and (w > 0).all()):
            raise UserError("GenMD4's schedule exponents w must be finite and positive.")
        self.log_w = nn.Parameter(w.log())

    @property
    def w(self) -> torch.Tensor:
        """The exponents w_i > 0: [V]."""
        return self.log_w.exp()

    def _t_and_w(self, t: torch.Tensor):
        """t as [*t.shape, 1] and w as [V], both in t's floating dtype."""
        t = torch.as_tensor(t)
        t = (t if t.is_floating_point() else t.float()).unsqueeze(-1)
        return t, self.w.to(t.dtype)

    def alpha_raw(self, t):
        t, w = self._t_and_w(t)
        return 1 - t**w  # torch's gradient of 0^w with respect to w is 0, not NaN

    def dalpha_raw(self, t):
        t, w = self._t_and_w(t)
        # finite at t = 0 for w < 1, as md4.schedules.Poly, so that no mask times the weight is 0
        return -w * t.clamp(min=torch.finfo(t.dtype).tiny) ** (w - 1)

    def extra_repr(self) -> str:
        return f"vocab_size={self.log_w.numel()}, eps={self.eps}"


class GenMD4(MD4):
    """MD4 with a state-dependent, learnable masking schedule (LearnablePoly).

        model = GenMD4(vocab_size=V, w=None)   # w: initial exponents [V] > 0, default ones (linear)
        model.schedule.alpha(t)                # [*t.shape, V]
        model.nelbo(denoiser, x0, generator=g) # [B] nats
        model.loss(denoiser, x0, generator=g)  # scalar: NELBO with the REINFORCE gradient for w
        model.sample(denoiser, num_samples=n, length=N, steps=T, grid="cosine", generator=g)

    The denoiser is called with the same t the schedule is evaluated at (no time rescaling).
    """

    description = "GenMD4: masked diffusion with a learned masking schedule per token (Shi et al. 2024)"
    shared_schedule = False  # alpha_t is [*t.shape, V]: the jump and confidence samplers do not apply

    def __init__(self, vocab_size: int, w=None):
        super().__init__(vocab_size, LearnablePoly(vocab_size, w))

    @classmethod
    def from_config(cls, vocab_size: int, cfg) -> GenMD4:
        """Built by md4.build.build: cfg.schedule gives the initial exponent of every token,
        "linear" (w = 1) or "polyK" (w = K)."""
        sched = schedules.get(cfg.schedule)
        if not isinstance(sched, (schedules.Linear, schedules.Poly)):
            raise UserError(f"GenMD4 learns polynomial schedules; set schedule to linear or polyK "
                            f"(the initial exponent), not {cfg.schedule!r}.")
        k = sched.k if isinstance(sched, schedules.Poly) else 1.0
        return cls(vocab_size, torch.full((vocab_size,), k))

    # ----------------------------------------------------------------- forward process
    def keep_probability(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """alpha_{t, x_0^n} for every position: x0 [B, N], t [B] -> [B, N]."""
        return torch.gather(self.schedule.alpha(t.to(x0.device)), 1, x0)

    def forward_sample(self, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): keep token x_0^n with probability alpha_{t, x_0^n}, else mask. t: [B]."""
        alpha = self.keep_probability(x0, t).detach()
        keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha
        return torch.where(keep, x0, torch.full_like(x0, self.mask_id))

    def log_q(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log q(x_t | x_0) = sum_n [log alpha_{t,x_0^n} if kept, log(1 - alpha_{t,x_0^n}) if masked]: [B]."""
        a = self.keep_probability(x0, t)
        return torch.where(xt == self.mask_id, torch.log1p(-a), a.log()).sum(-1)

    def reconstruction(self, length: int) -> float:
        """N (1 - alpha_0) log V nats, as MD4: alpha_{0,i} = 1 - eps for every token (0^w = 0)."""
        alpha0 = self.schedule.alpha(torch.zeros(()))[0].item()
        return length * (1 - alpha0) * math.log(self.vocab_size)

    # ----------------------------------------------------------------- objective
    def masked_terms(self, logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     timesteps: int = 0) -> torch.Tensor:
        """The NELBO of each sequence given x_t, without the reconstruction term: [B].

        Continuous time (timesteps = 0), per masked position with x_0 = i, r_j = lambda_{t,j}:
            -r_i log mu_i + sum_j mu_j (r_j - r_i)
        Discrete time, t = i/T, s = t - 1/T, r_j = (alpha_{s,j} - alpha_{t,j}) / (1 - alpha_{t,j}),
        T times KL(q(x_s | x_t, x_0) || p(x_s | x_t)), which is
            -r_i log mu_i - (1 - r_i) log(1 + sum_j mu_j (r_i - r_j) / (1 - r_i)).
        Both reduce to MD4's weight x cross-entropy when every r_j is the same.
        """
        if timesteps:
            a_t, a_s = self.schedule.alpha(t), self.schedule.alpha(t - 1 / timesteps)  # [B, V]
            rate = (a_s - a_t) / (1 - a_t)
        else:
            rate = -self.schedule.weight(t)  # lambda_t [B, V]
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [B, N, V]
        rate = rate.to(logp.dtype)
        rate_i = torch.gather(rate, 1, x0)  # [B, N]
        logp_i = logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        spread = (logp.exp() * (rate.unsqueeze(1) - rate_i.unsqueeze(-1))).sum(-1)  # sum_j mu_j (r_j - r_i)
        if timesteps:
            stay = 1 - rate_i
            term = timesteps * (-rate_i * logp_i - stay * torch.log1p(-spread / stay))
        else:
            term = -rate_i * logp_i + spread
        return torch.where(xt == self.mask_id, term, torch.zeros_like(term)).sum(-1)

    def loss(self, denoiser: Denoiser, x0: torch.Tensor, generator=None, t: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss (scalar, nats per sequence): two draws x_t^(1), x_t^(2) at the same t.

        Its value is the batch mean of the two continuous-time NELBO estimates L^(1), L^(2). Its
        gradient adds, for w, the leave-one-out REINFORCE term of the reference code,
            0.5 * stopgrad(L^(1) - L^(2)) * (log q(x_t^(1) | x_0) - log q(x_t^(2) | x_0)),
        which accounts for x_t's law depending on w; it is added as (term - stopgrad(term)), so it
        changes the gradient but not the value. The gradient is unbiased for that of the expected
        NELBO (tests/test_genmd4.py checks it exactly). Costs two denoiser passes of the batch."""
        B, N = x0.shape
        if t is None:
            t = antithetic_times(B, generator, x0.device)
        x0_2, t_2 = torch.cat([x0, x0]), torch.cat([t, t])
        xt = self.forward_sample(x0_2, t_2, generator)
        L1, L2 = self.masked_terms(denoiser(xt, t_2), x0_2, xt, t_2).chunk(2)
        q1, q2 = self.log_q(x0_2, xt, t_2).chunk(2)
        reinforce = 0.5 * (L1 - L2).detach() * (q1 - q2)
        return (0.5 * (L1 + L2) + reinforce - reinforce.detach()).mean() + self.reconstruction(N)

    # ----------------------------------------------------------------- reverse process
    def reverse_step(self, xt: torch.Tensor, logits: torch.Tensor, t: float, s: float, generator=None) -> torch.Tensor:
        """Draw x_s ~ p(x_s | x_t), s < t, for the state-dependent forward process.

        Given x_0 = j, a position masked at t was still unmasked at s with probability
        (alpha_{s,j} - alpha_{t,j}) / (1 - alpha_{t,j}) (Bayes on the masking times). Replacing the
        unknown x_0 by the denoiser's mu = E[x_0 | x_t] gives, for each masked position,
            P(x_s = j)    = mu_j (alpha_{s,j} - alpha_{t,j}) / (1 - alpha_{t,j})
            P(x_s = mask) = sum_j mu_j (1 - alpha_{s,j}) / (1 - alpha_{t,j})
        (they sum to one). Unlike MD4, whether a position unmasks depends on which token it would
        become. Unmasked positions stay. Computed and drawn in float64."""
        with torch.no_grad():
            a_t, a_s = (self.schedule.alpha(torch.tensor(v, dtype=torch.float64)).to(xt.device) for v in (t, s))
            mu = torch.softmax(logits.double(), dim=-1)  # [B, N, V]
            p_token = mu * ((a_s - a_t) / (1 - a_t))
            p_stay = (mu * ((1 - a_s) / (1 - a_t))).sum(-1, keepdim=True)
            draw = categorical(torch.cat([p_token, p_stay], -1).log(), generator)  # V = stay masked
        return torch.where(xt == self.mask_id, draw, xt)
