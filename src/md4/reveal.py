"""Samplers that decide up front (`jump`, exact), or by confidence (`confidence`, a heuristic),
when each position is revealed.

Both use MD4's token-independent schedule through its survival function: a position masked at
t = 1 is still masked at grid time t(j) with probability

    S_j = (1 - alpha_{t(j)}) / (1 - alpha_1),    j = 0..T,  S_T = 1,

(the jump-time view of shared/MATH.md: the reveal decisions of the ancestral sampler do not
depend on the tokens, so each position's reveal step can be drawn before anything else), and
its inverse `schedule_time` (the time of a given alpha: confidence with a threshold, ReMDM-loop).
Confidence orders (ORDERS) score a masked position's candidate token from the untruncated
prediction: top (its probability), margin (p1 - p2), entropy (exp(-entropy)).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from md4.categorical import categorical, inverse_cdf, uniforms
from md4.errors import UserError
from md4.truncation import NO_TRUNCATION, Truncation


def select_rows(denoiser, rows: torch.Tensor):
    """The denoiser for the sub-batch `rows`: per-row conditioning (class labels) follows the rows
    when the denoiser has select_rows (md4.guidance); any other denoiser is returned as is."""
    select = getattr(denoiser, "select_rows", None)
    return select(rows) if callable(select) else denoiser


def survival(model, t: torch.Tensor) -> torch.Tensor:
    """S(t) = (1 - alpha_t) / (1 - alpha_1) at times t (a grid: [T+1], increasing to 1): float64."""
    alpha = model.schedule.alpha(t.double())
    if alpha.shape != t.shape:
        raise UserError("The jump, confidence and remdm samplers need one masking schedule for all tokens (MD4).")
    return (1 - alpha) / (1 - model.schedule.alpha(torch.ones((), dtype=torch.float64)))


def schedule_time(model, alpha: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """The time t in [0, 1] with alpha_t = alpha (MD4's schedule decreases in t), by bisection:
    alpha [...] float64 -> t [...] float64 (0 or 1 for alphas beyond alpha_0 or alpha_1)."""
    lo, hi = torch.zeros_like(alpha, dtype=torch.float64), torch.ones_like(alpha, dtype=torch.float64)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        later = model.schedule.alpha(mid) > alpha  # the answer lies after mid
        lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
    return hi


def reveal_steps(model, x: torch.Tensor, grid: torch.Tensor, generator=None) -> torch.Tensor:
    """Each masked position's reveal step j in 1..T (it is revealed going from t(j) to t(j-1)),
    with P(j) = S_j - S_{j-1}; 0 for positions never revealed (probability S_0, about eps) and for
    positions that are not masked. x: [B, N] -> [B, N] long."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    step = torch.searchsorted(survival(model, grid).to(x.device), u, right=True)  # S_{j-1} <= u < S_j
    return torch.where(x == model.mask_id, step, torch.zeros_like(step))


@torch.no_grad()
def jump(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None, *,
         truncate: Truncation = NO_TRUNCATION, callback=None, progress: bool = False) -> torch.Tensor:
    """The ancestral chain visited only at the steps where something is revealed: x [B, N] -> [B, N].

    Draws every position's reveal step first (`reveal_steps`), then for each sample walks its
    distinct reveal steps from late to early: one denoiser call at t(j) on the current state, and
    the positions revealed at j draw their tokens from it. Same law as `ancestral` on the same
    grid, for any denoiser; calls per sample <= the number of masked positions whatever T is."""
    B, N = x.shape
    step = reveal_steps(model, x, grid, generator)
    ordered = step.sort(-1, descending=True).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered > 0
    K = int(first.sum(-1).max())
    events = torch.zeros(B, max(K, 1), dtype=torch.long, device=x.device)  # [B, K] reveal steps, latest first
    row = torch.arange(B, device=x.device)[:, None].expand(B, N)
    events[row[first], (first.cumsum(-1) - 1)[first]] = ordered[first]
    grid, now = grid.to(x.device), torch.ones(B, dtype=torch.float64, device=x.device)
    x = x.clone()
    for k in tqdm(range(K), desc="sampling", disable=not progress, leave=False):
        rows = (events[:, k] > 0).nonzero().squeeze(1)
        j = events[rows, k]
        sub, now_revealed = x[rows], step[rows] == j[:, None]
        logits = select_rows(denoiser, rows)(sub, grid[j].float())
        u = uniforms(sub.shape, generator, x.device)  # those of a full draw: same samples per seed
        sub[now_revealed] = inverse_cdf(truncate(logits[now_revealed]), u[now_revealed])
        x[rows] = sub
        now[rows] = grid[j - 1]
        if callback is not None:
            callback(x, now)
    return x


def top_confidence(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The probability of the drawn token (MaskGIT, LLaDA): [...] in [0, 1]."""
    return probs.gather(-1, tokens[..., None]).squeeze(-1)


def margin_confidence(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p(first) - p(second most likely token) (Dream's margin): [...] in [0, 1]."""
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def entropy_confidence(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """exp(-H(p)) = exp(sum_j p_j log p_j), one over the perplexity of the prediction (Dream's
    negative entropy, mapped to (0, 1] so that one threshold scale serves every order): [...]."""
    return torch.exp(torch.xlogy(probs, probs).sum(-1))


# confidence orders: (probs [..., V] of the untruncated prediction, drawn tokens [...]) -> [...] in [0, 1]
ORDERS = {"top": top_confidence, "margin": margin_confidence, "entropy": entropy_confidence}


def confidence_rule(order: str = "top", threshold: float | None = None):
    """The confidence sampler's options, checked: (the ORDERS function, the threshold or None)."""
    if order not in ORDERS:
        raise UserError(f"Unknown confidence order {order!r}; choose one of {', '.join(ORDERS)}.")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise UserError(f"The confidence threshold must be a number in [0, 1], got {threshold!r}.")
    return ORDERS[order], threshold


@torch.no_grad()
def confidence(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None, *,
               truncate: Truncation = NO_TRUNCATION, callback=None, progress: bool = False,
               order: str = "top", threshold: float | None = None) -> torch.Tensor:
    """Confidence-based unmasking (MaskGIT, LLaDA, Dream, Fast-dLLM): x [B, N] -> [B, N]. A heuristic
    that trades diversity for quality, not the model's distribution.

    At each step every masked position draws a candidate token from the truncated prediction and
    gets a confidence from the untruncated one (`order`: top = the drawn token's probability,
    margin = p(first) - p(second), entropy = exp(-entropy)); the most confident candidates are
    revealed. How many:
    - threshold None: the schedule's expectation. After the step to t(j-1) a sample with n
      positions to generate keeps round(n S_{j-1}) of them masked (none after the last step); steps
      that reveal nothing call no denoiser. At most T calls.
    - threshold TAU: every masked position whose confidence exceeds TAU, and at least the most
      confident one, until none is masked (Fast-dLLM's parallel decoding): between 1 and n calls per
      sample whatever T is; the grid is not used, the denoiser is called at the time whose expected
      masked fraction is the sample's (alpha_t = 1 - (1 - alpha_1) masked / n)."""
    score, threshold = confidence_rule(order, threshold)
    B, N = x.shape
    n_gen = (x == model.mask_id).sum(-1).double()
    grid = grid.to(x.device)
    x = x.clone()

    def reveal(rows: torch.Tensor, t: torch.Tensor, k: torch.Tensor | None) -> None:
        """Reveal the k (or, k None, the above-threshold) most confident masked positions of `rows` at t [R]."""
        sub = x[rows]
        sub_masked = sub == model.mask_id
        raw = select_rows(denoiser, rows)(sub, t)
        tokens = categorical(truncate(raw), generator)
        conf = score(torch.softmax(raw.double(), -1), tokens)
        conf = torch.where(sub_masked, conf, torch.full_like(conf, -1.0))
        ranked = conf.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(N, device=x.device).expand_as(ranked))
        chosen = rank < k[:, None] if k is not None else (conf > threshold) | (rank == 0)
        x[rows] = torch.where(sub_masked & chosen, tokens, sub)

    if threshold is None:
        S = survival(model, grid).to(x.device)
        for i in tqdm(range(len(grid) - 1, 0, -1), desc="sampling", disable=not progress, leave=False):
            masked = x == model.mask_id
            left = torch.zeros_like(n_gen) if i == 1 else torch.round(n_gen * S[i - 1])
            k = (masked.sum(-1) - left.long()).clamp(min=0)
            rows = (k > 0).nonzero().squeeze(1)
            if len(rows):
                reveal(rows, grid[i].float().expand(len(rows)), k[rows])
            if callback is not None:
                callback(x, grid[i - 1].expand(B))
        return x

    alpha_1 = model.schedule.alpha(torch.ones((), dtype=torch.float64))

    def now() -> torch.Tensor:  # [B] float64: the time of each sample's masked fraction
        fraction = (x == model.mask_id).sum(-1).double() / n_gen.clamp(min=1)
        return schedule_time(model, 1 - (1 - alpha_1) * fraction.cpu()).to(x.device)

    with tqdm(desc="sampling", disable=not progress, leave=False) as bar:
        while (rows := (x == model.mask_id).any(-1).nonzero().squeeze(1)).numel():
            reveal(rows, now()[rows].float(), None)
            if callback is not None:
                callback(x, now())
            bar.update()
    return x
