"""SEDD absorbing (Lou, Meng, Ermon 2024): score entropy with the log-linear noise schedule.

Forward process: a continuous-time Markov chain in which each token jumps to the mask m at rate
sigma(t), so a token is still unmasked at time t with probability exp(-sigma_bar(t)),
sigma_bar(t) = int_0^t sigma. The log-linear schedule makes that probability linear in t:

    sigma_bar(t) = -log(1 - (1 - eps) t),   sigma(t) = (1 - eps) / (1 - (1 - eps) t),   eps = 1e-3

The network estimates the concrete score: at a masked position n, the ratios
s_y = p_t(x_t with x^n = y) / p_t(x_t) for the V real tokens y. As in SEDD, the score is
"scaled by sigma": network outputs o [B, N, V] give log s_y = l_y - log(exp(sigma_bar) - 1) with
l = o - log V, so that a network which ignores t can still be optimal (the true ratio is
E[x_0^n = y | x_t] / (e^sigma_bar - 1), i.e. l = log E[x_0^n = y | x_t]) and a fresh network,
whose outputs are near 0, starts with scores that sum to the right total (SEDD offsets by
log(V - 1) for the same reason). Below, "logits" l already include the offset: l = o - log V.

Denoising score entropy (the NELBO, in nats per sequence): with the true ratio
r_y = p_t|0(y | x_0) / p_t|0(m | x_0) = [y = x_0^n] / (e^sigma_bar - 1) and K(r) = r (log r - 1),

    L = int_0^1 E_{x_t} sum_{n: x_t^n = m} sigma(t) sum_y [ s_y - r_y log s_y + K(r_y) ] dt
      = int_0^1 E_{x_t} sum_{n masked} sigma(t) / (e^sigma_bar - 1) [ sum_y e^{l_y} - l_{x_0^n} - 1 ] dt.

For the log-linear schedule sigma / (e^sigma_bar - 1) = 1/t, and if the logits are normalised
(sum_y e^{l_y} = 1) the bracket is -log mu_{x_0^n}: MD4's loss with the linear schedule. SEDD
differs by leaving the scores unnormalised. The prior term at t = 1, where a fraction eps of
tokens is still unmasked, is N eps log V for the prior that keeps that fraction uniform; it is
added, so the bound is complete (the reconstruction term is 0: nothing is masked at t = 0).

Sampling: the Tweedie tau-leaping step from t to s < t. For a masked position, the exact
reverse transition is p(x_s = y | x_t = m) = (e^{sigma_bar(t) - sigma_bar(s)} - 1) s_y and
p(stay masked) = (1 - e^{-sigma_bar(s)}) / (1 - e^{-sigma_bar(t)}); with learned scores these
weights are normalised and drawn in float64 (SEDD.reveal). Temperature, top-k and top-p change
only which token is revealed, not the probability of unmasking.
"""

from __future__ import annotations

import math

import torch

from md4 import schedules
from md4.diffusion import MD4, free_positions
from md4.errors import UserError
from md4.truncation import NO_TRUNCATION, Truncation


class LogLinear(schedules.Schedule):
    """SEDD's log-linear noise as a masking schedule: alpha_t = exp(-sigma_bar(t)) = 1 - (1 - eps) t."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        super().__init__(eps)

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1 - self.eps)) if isinstance(t, torch.Tensor) else -(1 - self.eps)

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma_bar(t) = -log(1 - (1 - eps) t)."""
        return -torch.log1p(-(1 - self.eps) * t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise rate sigma(t) = d sigma_bar / dt = (1 - eps) / (1 - (1 - eps) t)."""
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


# The smallest time used: at t = 0 nothing is masked but sigma / (e^sigma_bar - 1) = 1/t is
# infinite, and 0 * inf is NaN. The bias of evaluating t < T_MIN at T_MIN is O(T_MIN).
T_MIN = 1e-6


def log_ratio(output: torch.Tensor) -> torch.Tensor:
    """Network output o [B, N, V] -> l = o - log V, the log of the score times (e^sigma_bar - 1)."""
    output = output.to(torch.promote_types(output.dtype, torch.float32))  # bf16 -> float32, float64 stays
    return output - math.log(output.shape[-1])


def score_entropy(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                  noise: LogLinear, mask_id: int) -> torch.Tensor:
    """The score entropy integrand at time t: [B] nats (l = logits [B, N, V], x0/xt [B, N], t [B]).

    sum_{n masked} sigma(t) / (e^sigma_bar(t) - 1) * (sum_y e^{l_y} - l_{x_0^n} - 1)."""
    logits = logits.float()
    weight = noise.sigma(t) / torch.expm1(noise.sigma_bar(t))  # [B]
    l_x0 = logits.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    bracket = torch.logsumexp(logits, dim=-1).exp() - l_x0 - 1  # >= -log softmax(l)_{x0} >= 0
    bracket = torch.where(xt == mask_id, bracket, torch.zeros_like(bracket)).sum(-1)
    return weight.to(bracket.device) * bracket


class SEDD(MD4):
    """SEDD absorbing with the log-linear schedule; shares MD4's forward process (mask each token
    with probability 1 - exp(-sigma_bar(t))) and sampler loop, with its own loss and reverse step."""

    description = "SEDD absorbing: score-entropy discrete diffusion with the log-linear schedule (Lou et al. 2024)"
    continuous_time_only = True
    predicts_mean = False  # the network gives score ratios: only samplers that use reverse_step apply

    def __init__(self, vocab_size: int, schedule: str | schedules.Schedule = "loglinear"):
        name = getattr(schedule, "name", schedule)
        if name not in ("loglinear", "linear"):
            raise UserError(f"SEDD uses the log-linear noise schedule; set schedule=loglinear, not {name!r}.")
        super().__init__(vocab_size, LogLinear())

    def prior(self, length: int) -> float:
        """The t = 1 term: N eps log V nats (a fraction eps of tokens is unmasked, uniform under the prior)."""
        return length * self.schedule.eps * math.log(self.vocab_size)

    # nelbo (MD4's skeleton): one-sample unbiased estimate of the score entropy bound, [B] nats
    def bound_times(self, t: torch.Tensor, timesteps: int = 0) -> torch.Tensor:
        """Continuous time only; t below T_MIN is evaluated at T_MIN."""
        if timesteps:
            raise UserError("SEDD's bound is in continuous time only; leave --timesteps at 0 for a SEDD model.")
        return t.clamp(min=T_MIN)

    def masked_terms(self, logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     timesteps: int = 0) -> torch.Tensor:
        """The score entropy integrand at t: [B] nats (`score_entropy` of the network's output)."""
        return score_entropy(log_ratio(logits), x0, xt, t, self.schedule, self.mask_id)

    def constant_terms(self, x0: torch.Tensor, known: torch.Tensor | None = None, timesteps: int = 0) -> float:
        """The prior term at t = 1 of the free positions (nothing is masked at t = 0: no
        reconstruction term)."""
        return self.prior(free_positions(x0.shape[1], known))

    def reveal(self, logits: torch.Tensor, t: float, s: float, truncate: Truncation = NO_TRUNCATION):
        """The Tweedie tau-leaping step from t to s < t at a masked position (see MD4.reveal for the
        form), from the network's outputs [..., V]. The unnormalised weights of becoming y and of
        staying masked are (e^{sigma_bar(t) - sigma_bar(s)} - 1) s_y and
        (1 - e^{-sigma_bar(s)}) / (1 - e^{-sigma_bar(t)}), so P(unmask) = U / (U + stay) with U the
        sum of the former, and the token given unmasking follows s_y, i.e. softmax of the outputs.
        Truncation changes that token distribution only; U, hence when tokens are revealed, is the
        untruncated model's (issue 13, item 8). Computed in float64."""
        sb_t, sb_s = (self.schedule.sigma_bar(torch.tensor(v, dtype=torch.float64, device=logits.device))
                      for v in (t, s))
        log_score = log_ratio(logits).double() - torch.log(torch.expm1(sb_t))  # log s_y [..., V]
        log_unmask = torch.log(torch.expm1(sb_t - sb_s)) + torch.logsumexp(log_score, dim=-1)  # log U [...]
        log_stay = torch.log(-torch.expm1(-sb_s)) - torch.log(-torch.expm1(-sb_t))
        return torch.sigmoid(log_unmask - log_stay), truncate(logits)  # U / (U + stay), without overflow
