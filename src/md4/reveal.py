"""Samplers that decide up front, or by confidence, when each position is revealed.

Both use MD4's token-independent schedule through its survival function: a position masked at
t = 1 is still masked at grid time t(j) with probability

    S_j = (1 - alpha_{t(j)}) / (1 - alpha_1),    j = 0..T,  S_T = 1,

(the jump-time view of shared/MATH.md: the reveal decisions of the ancestral sampler do not
depend on the tokens, so each position's reveal step can be drawn before anything else).
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


def survival(model, grid: torch.Tensor) -> torch.Tensor:
    """S_j = (1 - alpha_{t(j)}) / (1 - alpha_1) on the grid: [T+1] float64, increasing to 1."""
    alpha = model.schedule.alpha(grid.double())
    if alpha.shape != grid.shape:
        raise UserError("The jump and confidence samplers need one masking schedule for all tokens (MD4).")
    return (1 - alpha) / (1 - alpha[-1])


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


@torch.no_grad()
def confidence(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None, *,
               truncate: Truncation = NO_TRUNCATION, callback=None, progress: bool = False) -> torch.Tensor:
    """Confidence-based unmasking (MaskGIT, LLaDA): x [B, N] -> [B, N].

    The number of masked positions follows the schedule's expectation: after the step to t(j-1)
    a sample with n positions to generate keeps round(n S_{j-1}) of them masked (none after the
    last step). At each step every masked position draws a candidate token from the truncated
    prediction, and the k most confident candidates (highest probability of the drawn token under
    the untruncated prediction) are revealed. Steps that reveal nothing call no denoiser. Not the model's distribution: a
    heuristic that trades diversity for quality."""
    B, N = x.shape
    S = survival(model, grid).to(x.device)
    n_gen = (x == model.mask_id).sum(-1).double()
    grid = grid.to(x.device)
    x = x.clone()
    for i in tqdm(range(len(grid) - 1, 0, -1), desc="sampling", disable=not progress, leave=False):
        masked = x == model.mask_id
        left = torch.zeros_like(n_gen) if i == 1 else torch.round(n_gen * S[i - 1])
        k = (masked.sum(-1) - left.long()).clamp(min=0)
        rows = (k > 0).nonzero().squeeze(1)
        if len(rows):
            sub, sub_masked = x[rows], masked[rows]
            raw = select_rows(denoiser, rows)(sub, grid[i].float().expand(len(rows)))
            tokens = categorical(truncate(raw), generator)
            conf = torch.softmax(raw.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
            conf = torch.where(sub_masked, conf, torch.full_like(conf, -1.0))
            order = conf.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=x.device).expand_as(order))
            x[rows] = torch.where(sub_masked & (rank < k[rows, None]), tokens, sub)
        if callback is not None:
            callback(x, grid[i - 1].expand(B))
    return x
