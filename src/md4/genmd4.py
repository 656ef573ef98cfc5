"""GenMD4: masked diffusion whose masking schedule depends on the token's value (shared/MATH.md,
"GenMD4: state-dependent schedules").

Each token value i has its own learnable polynomial schedule, clipped like every md4 schedule:

    alpha_{t,i} = (1 - 2 eps)(1 - t^{w_i}) + eps,      w_i = exp(log_w_i) > 0,   eps = 1e-4

so w = 1 for every token is exactly md4.schedules.Linear. A larger w_i keeps token i longer in
the forward process, hence reveals it earlier in generation. (The reference code uses
w = softplus(raw) and 1 - (1 - eps) t^w; the exponential keeps weight decay meaningful, pulling
w towards the linear schedule, and the clipping above makes w = 1 match MD4 exactly. The family
of schedules is the same.)

With lambda_{t,j} = -alpha'_{t,j} / (1 - alpha_{t,j}) >= 0 (for the polynomial, about w_j / t), the
continuous-time NELBO of a sequence, with the lower time cut-off t1 of the reference code
(default 1e-3), is

    L = integral_{t1}^1 E_{q(x_t|x_0)} [ sum_{n: x_t^n = m} ( -lambda_{t,i} log mu^n_i + sum_j mu^n_j (lambda_{t,j} - lambda_{t,i}) ) ] dt
        + sum_n (1 - alpha_{t1,i}) (-log d_i),          d_j = (1 - alpha_{t1,j}) / sum_k (1 - alpha_{t1,k})

with i = x_0^n and mu^n = softmax of the denoiser's logits. The integrand is MATH.md's
sum_j (alpha'_j / (1 - alpha_j)) [x_{0,j} - mu_j + x_{0,j} log mu_j] rewritten with sum_j mu_j = 1,
so that the second term vanishes exactly when all w are equal (and L is MD4's). The last term is
the reconstruction term for [0, t1], as in the reference code: a position still masked at t1
(probability 1 - alpha_{t1,i}) is decoded with the data-independent guess d, which favours the
tokens that mask early; with equal w, d is uniform and the term is MD4's N (1 - alpha) log V,
taken at t1 instead of 0.

Why the cut-off: for w_j < 1 the rate lambda_{t,j} ~ w_j t^(w_j - 1) / eps is unbounded as t -> 0,
and for w_j <= 0.5 the one-sample estimator's second moment diverges (its mean stays finite).
On [t1, 1] every rate is bounded: lambda_{t,j} <= lambda_{t1,j} ~ w_j / t1 for w_j <= 1 (it
decreases in t), and for w_j > 1 it is bounded on all of [0, 1]. One-sample estimator: u ~ U(0,1)
(antithetic across the batch), t = t1 + (1 - t1) u, L ~ (1 - t1) [integrand at t] + reconstruction.
With t1 = 0 the bound and its estimator are exactly those of MD4's NELBO for equal w. The
discrete-time bound (timesteps = T) has bounded terms and keeps the grid t = i/T without cut-off.
"""

from __future__ import annotations

import torch
from torch import nn

from md4 import schedules
from md4.diffusion import MD4, Denoiser, antithetic_times
from md4.errors import UserError
from md4.truncation import NO_TRUNCATION, Truncation


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

        model = GenMD4(vocab_size=V, w=None, t1=1e-3)  # w: initial exponents [V] > 0, default ones (linear)
        model.schedule.alpha(t)                # [*t.shape, V]
        model.nelbo(denoiser, x0, generator=g) # [B] nats
        model.loss(denoiser, x0, generator=g)  # scalar: NELBO with the REINFORCE gradient for w
        model.sample(denoiser, num_samples=n, length=N, steps=T, grid="cosine", generator=g)

    The denoiser is called with the same t the schedule is evaluated at; in the continuous-time
    NELBO and the loss that t lies in [t1, 1] (the cut-off of the module docstring). Unless all w
    are equal the exact denoiser E[x_0 | x_t] depends on t (which tokens are still masked tells
    more as t changes), so md4.pretrained.build gives GenMD4 a time-conditioned network only.
    """

    description = "GenMD4: masked diffusion with a learned masking schedule per token (Shi et al. 2024)"
    shared_schedule = False  # alpha_t is [*t.shape, V]: the jump and confidence samplers do not apply
    needs_time_cond = True  # its exact denoiser depends on t unless all w are equal

    def __init__(self, vocab_size: int, w=None, t1: float = 1e-3):
        super().__init__(vocab_size, LearnablePoly(vocab_size, w))
        if not 0 <= t1 < 1:  # also rejects NaN
            raise UserError(f"GenMD4's time cut-off t1 must lie in [0, 1), got {t1}.")
        self.t1 = float(t1)

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

    def reconstruction(self, x0: torch.Tensor, at: float | None = None,
                       known: torch.Tensor | None = None) -> torch.Tensor:
        """The term for [0, t1]: sum_n (1 - alpha_{t1,x_0^n}) (-log d_{x_0^n}) nats, [B] (x0 [B, N]),
        with d = (1 - alpha_{t1}) / sum_j (1 - alpha_{t1,j}); `at` replaces t1; positions `known`
        ([B, N] bool) are left out. Differentiable in w.
        At 0 it is MD4's N eps log V (alpha_{0,i} = 1 - eps for every token, so d is uniform)."""
        at = self.t1 if at is None else at
        masked = 1 - self.schedule.alpha(torch.tensor(at, dtype=self.schedule.log_w.dtype, device=x0.device))  # [V]
        cost = masked * (masked.sum().log() - masked.log())  # (1 - alpha_{t1,i}) (-log d_i)
        per_position = cost[x0]
        return (per_position if known is None else per_position.masked_fill(known, 0.0)).sum(-1)

    def cutoff_times(self, u: torch.Tensor) -> torch.Tensor:
        """t = t1 + (1 - t1) u: uniform draws u in [0, 1) -> times in [t1, 1)."""
        return self.t1 + (1 - self.t1) * u

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

    # nelbo: MD4's skeleton with the hooks below (the cut-off in continuous time, the reconstruction term)
    def bound_times(self, t: torch.Tensor, timesteps: int = 0) -> torch.Tensor:
        """Continuous time: t1 + (1 - t1) t (`cutoff_times`); timesteps = T: MD4's grid i/T, no cut-off."""
        return super().bound_times(t, timesteps) if timesteps else self.cutoff_times(t)

    def time_weight(self, timesteps: int = 0) -> float:
        """1 - t1 in continuous time (the length of [t1, 1]), 1 on the discrete grid."""
        return 1.0 if timesteps else 1 - self.t1

    def constant_terms(self, x0: torch.Tensor, known: torch.Tensor | None = None, timesteps: int = 0) -> torch.Tensor:
        """The reconstruction term for [0, t1] ([B]); on the discrete grid MD4's, eps log V per free position."""
        return self.reconstruction(x0, at=0.0 if timesteps else None, known=known)

    def loss(self, denoiser: Denoiser, x0: torch.Tensor, generator=None, t: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss (scalar, nats per sequence): two draws x_t^(1), x_t^(2) at the same t.

        Its value is the batch mean of the two continuous-time NELBO estimates (with the cut-off:
        L^(k) = (1 - t1) x the masked terms, t in [t1, 1], plus the reconstruction term). Its
        gradient adds, for w, the leave-one-out REINFORCE term of the reference code,
            0.5 * stopgrad(L^(1) - L^(2)) * (log q(x_t^(1) | x_0) - log q(x_t^(2) | x_0)),
        which accounts for x_t's law depending on w; it is added as (term - stopgrad(term)), so it
        changes the gradient but not the value. The gradient is unbiased for that of the expected
        NELBO (tests/test_genmd4.py checks it exactly). Costs two denoiser passes of the batch."""
        if t is None:
            t = antithetic_times(len(x0), generator, x0.device)
        x0_2, t_2 = torch.cat([x0, x0]), self.bound_times(torch.cat([t, t]))
        xt = self.forward_sample(x0_2, t_2, generator)
        L1, L2 = (self.time_weight() * self.masked_terms(denoiser(xt, t_2), x0_2, xt, t_2)).chunk(2)
        q1, q2 = self.log_q(x0_2, xt, t_2).chunk(2)
        reinforce = 0.5 * (L1 - L2).detach() * (q1 - q2)
        return (0.5 * (L1 + L2) + reinforce - reinforce.detach() + self.constant_terms(x0)).mean()

    # ----------------------------------------------------------------- reverse process
    def reveal(self, logits: torch.Tensor, t: float, s: float, truncate: Truncation = NO_TRUNCATION):
        """The reverse step for the state-dependent forward process (see MD4.reveal for the form).

        Given x_0 = j, a position masked at t was still unmasked at s with probability
        r_j = (alpha_{s,j} - alpha_{t,j}) / (1 - alpha_{t,j}) (Bayes on the masking times). Replacing
        the unknown x_0 by the denoiser's mu = E[x_0 | x_t] gives, for each masked position,
            P(x_s = j) = mu_j r_j,    P(x_s = mask) = sum_j mu_j (1 - alpha_{s,j}) / (1 - alpha_{t,j})
        (they sum to one): P(unmask) = sum_j mu_j r_j, and the token given unmasking is proportional to
        mu_j r_j. Unlike MD4, whether a position unmasks depends on which token it would become. With
        truncation, P(unmask) stays the untruncated one and the token is proportional to mu'_j r_j,
        mu' the truncated prediction. Computed in float64."""
        a_t, a_s = (self.schedule.alpha(torch.tensor(v, dtype=torch.float64)).detach().to(logits.device)
                    for v in (t, s))
        r = (a_s - a_t) / (1 - a_t)  # [V]
        p_unmask = (torch.softmax(logits.double(), dim=-1) * r).sum(-1)
        return p_unmask, torch.log_softmax(truncate(logits), dim=-1) + r.log()
