"""ReMDM: remasking in MD4's reverse step (Wang, Schiff, Sahoo & Kuleshov 2025).

MD4's reverse step never changes a revealed token. ReMDM keeps the forward marginals
q(z_t | x) = Cat(alpha_t x + (1 - alpha_t) m) but lets the step from t to s < t remask a revealed
(generated) token with probability sigma, and reveals more to make up for it:

    z_t revealed:  z_s = mask with probability sigma, else z_t
    z_t masked:    z_s = x ~ mu_theta(z_t) with probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t)
                            = (alpha_s - alpha_t) / (1 - alpha_t) + sigma alpha_t / (1 - alpha_t),
                   else mask,

with 0 <= sigma <= sigma_max = min(1, (1 - alpha_s) / alpha_t) so both are probabilities. Then
E[masked fraction at s] = 1 - alpha_s whenever it was 1 - alpha_t at t, as in MD4; sigma = 0 is
MD4's ancestral step, draw for draw. With sigma > 0 tokens revealed early can be redrawn later
with more context: a heuristic, not the model's law. Schedules for sigma (`remask`):

    cap       sigma = min(eta, sigma_max)
    rescale   sigma = eta sigma_max,                                   0 <= eta <= 1
    conf      sigma^l = eta sigma_max softmax_l(-psi^l)                 0 <= eta <= 1
              over the revealed generated positions l of a sample, psi^l the probability of the
              token when it was revealed (untruncated prediction): the least confident are
              remasked first. The paper's setting is eta = 1. Masked positions take the mean sigma
              of the revealed ones in their reveal probability, so that as many tokens are revealed
              as remasked on average (the reference code gives them sigma = 0, which lets the masked
              fraction drift above the schedule's; both are heuristics).
    loop      sampling time u walks the grid; the model's time is tau(u):
                u >= t_on:         tau from 1 down to tau_on, where alpha_{tau_on} = alpha_on (MD4 steps)
                t_off <= u <= t_on:  tau = tau_on held: alpha_s = alpha_t = alpha_on, sigma = eta,
                                   so a fraction eta of the revealed tokens is remasked and as many
                                   masked ones revealed, at a constant masked fraction
                u <= t_off:        tau from tau_on down to 0 (MD4 steps)
              (tau is linear in u within each phase); eta <= (1 - alpha_on) / alpha_on.

Only positions that were masked when sampling began are ever remasked: prompts and known
positions stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from md4.categorical import inverse_cdf, uniforms
from md4.errors import UserError
from md4.reveal import schedule_time
from md4.truncation import NO_TRUNCATION, Truncation

DEFAULT_ETA = {"cap": 0.02, "rescale": 0.02, "conf": 1.0, "loop": 0.02}
FRACTION_ETA = ("rescale", "conf")  # schedules where eta scales sigma_max: at most 1


@dataclass(frozen=True)
class Remasking:
    """ReMDM's options, checked: remask (cap, rescale, conf, loop), eta (None: the schedule's
    default, DEFAULT_ETA), and for loop t_on, t_off (0 <= t_off < t_on < 1) and alpha_on (0, 1)."""

    remask: str = "cap"
    eta: float | None = None
    t_on: float = 0.55
    t_off: float = 0.05
    alpha_on: float = 0.9

    def __post_init__(self):
        if self.remask not in SCHEDULES:
            raise UserError(f"Unknown ReMDM schedule {self.remask!r}; choose one of {', '.join(SCHEDULES)}.")
        for name in ("eta", "t_on", "t_off", "alpha_on"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"The ReMDM option {name} must be a number, got {value!r}.")
        if self.eta is None:
            object.__setattr__(self, "eta", DEFAULT_ETA[self.remask])
        eta = self.eta
        if not eta >= 0 or (self.remask in FRACTION_ETA and eta > 1):  # `not >=` also rejects NaN
            raise UserError(f"ReMDM's eta must be >= 0{' and <= 1' if self.remask in FRACTION_ETA else ''} "
                            f"for {self.remask}, got {eta}.")
        if self.remask == "loop":
            if not 0 <= self.t_off < self.t_on < 1:
                raise UserError(f"ReMDM-loop needs 0 <= t_off < t_on < 1, got t_off = {self.t_off}, t_on = {self.t_on}.")
            if not 0 < self.alpha_on < 1:
                raise UserError(f"ReMDM-loop's alpha_on must lie in (0, 1), got {self.alpha_on}.")
            if eta > (1 - self.alpha_on) / self.alpha_on:
                raise UserError(f"ReMDM-loop's eta must be <= (1 - alpha_on) / alpha_on = "
                                f"{(1 - self.alpha_on) / self.alpha_on:.4g}, got {eta}.")

    def times(self, model, grid: torch.Tensor) -> torch.Tensor:
        """The model's times tau(u) at the sampling grid u: [T+1] float64 (the grid itself except for loop)."""
        if self.remask != "loop":
            return grid
        u = grid.double()
        tau_on = schedule_time(model, torch.tensor(self.alpha_on, dtype=torch.float64))
        early = tau_on + (1 - tau_on) * (u - self.t_on) / (1 - self.t_on)
        late = tau_on * u / self.t_off if self.t_off > 0 else torch.zeros_like(u)
        return torch.where(u >= self.t_on, early, torch.where(u <= self.t_off, late, tau_on))

    def sigma(self, a_t: torch.Tensor, a_s: torch.Tensor, revealed: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """sigma for the step with alphas a_t <= a_s (0-dim float64) at each position: [B, N] float64.
        `revealed` [B, N] bool: the revealed generated positions (the ones that may be remasked);
        psi [B, N]: each position's confidence when it was revealed (conf). A masked position uses
        sigma in its probability of being revealed."""
        sigma_max = torch.clamp((1 - a_s) / a_t, max=1.0)
        return SCHEDULES[self.remask](self.eta, sigma_max, a_t == a_s, revealed, psi)


def everywhere(sigma: torch.Tensor, revealed: torch.Tensor) -> torch.Tensor:
    """One sigma (0-dim) for every position: [B, N]."""
    return sigma.to(revealed.device).expand(revealed.shape)


def cap(eta, sigma_max, held, revealed, psi):
    return everywhere(torch.clamp(sigma_max, max=eta), revealed)


def rescale(eta, sigma_max, held, revealed, psi):
    return everywhere(eta * sigma_max, revealed)


def loop(eta, sigma_max, held, revealed, psi):
    """eta while alpha is held (alpha_s = alpha_t), else 0."""
    return everywhere(torch.tensor(eta if bool(held) else 0.0, dtype=torch.float64), revealed)


def conf(eta, sigma_max, held, revealed, psi):
    """eta sigma_max softmax(-psi) over the revealed positions of each sample; masked positions take
    the mean sigma of the revealed ones, so that as many are revealed as remasked on average."""
    weight = torch.where(revealed, torch.exp(-psi), torch.zeros_like(psi))
    total = weight.sum(-1, keepdim=True)
    sigma = eta * sigma_max * weight / torch.where(total > 0, total, torch.ones_like(total))
    mean = sigma.sum(-1, keepdim=True) / revealed.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(revealed, sigma, mean)


# sigma schedules: (eta, sigma_max 0-dim, alpha held (0-dim bool), revealed [B, N], psi [B, N]) -> [B, N]
SCHEDULES = {"cap": cap, "rescale": rescale, "conf": conf, "loop": loop}


class RemaskingStep:
    """The ReMDM step `(z_t, logits, t, s, generator, truncate) -> z_s` for md4.sampling's walk,
    for the batch whose positions to generate are `free` ([B, N] bool, masked at the start).

    Draws as MD4.reverse_step does: one uniform u per position (a masked position is revealed if
    u < P(reveal), a revealed one remasked if u < sigma), then one token per position from the
    truncated prediction, so that sigma = 0 gives the ancestral sampler's samples for the same seed."""

    def __init__(self, model, plan: Remasking, free: torch.Tensor):
        self.model, self.plan, self.free = model, plan, free
        self.psi = torch.zeros(free.shape, dtype=torch.float64, device=free.device)  # confidence at reveal (conf)

    def __call__(self, xt: torch.Tensor, logits: torch.Tensor, t: float, s: float, generator=None,
                 truncate: Truncation = NO_TRUNCATION) -> torch.Tensor:
        model = self.model
        a_t, a_s = (model.schedule.alpha(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        masked = xt == model.mask_id
        revealed = self.free & ~masked
        sigma = self.plan.sigma(a_t, a_s, revealed, self.psi)
        p_reveal, token_logits = model.reveal(logits, t, s, truncate)
        p_reveal = p_reveal + sigma * (a_t / (1 - a_t)).to(sigma.device)
        u = torch.rand(xt.shape, generator=generator, device=xt.device, dtype=torch.float64)
        reveal, remask = masked & (u < p_reveal), revealed & (u < sigma)
        u_token = uniforms(xt.shape, generator, xt.device)  # a full draw's uniforms: same samples per seed
        out = torch.where(remask, torch.full_like(xt, model.mask_id), xt)
        tokens = inverse_cdf(token_logits[reveal], u_token[reveal])  # inverted only where revealed
        out[reveal] = tokens
        if self.plan.remask == "conf":
            p = torch.softmax(logits[reveal].double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
            self.psi[reveal] = p
        return out
