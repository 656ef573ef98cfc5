"""Time grids and samplers for masked diffusion models.

A sampler walks a time grid 0 = t(0) < t(1) < ... < t(T) = 1 from t(T) down to t(0), starting
from a sequence whose masked positions are to be generated (all of them, or the unknown ones
when infilling) and revealing them; positions still masked at the end are filled with the argmax
of the prediction (shared/MATH.md, "Sampling"). Samplers, by name (`sample(..., sampler=NAME)`):

exact (the model's reverse process; same law as the paper's Algorithm 2 on the same grid):
- `ancestral`: the paper's Algorithm 2; each step calls the denoiser and `model.reverse_step`.
- `cached`: the same chain and the same random draws, but when the denoiser ignores t it is
  called again for a sample only after one of its positions changed; for the same seed it
  returns exactly what `ancestral` returns, with at most min(T, length) calls per sample.
- `mean`: the two-stage form of the same step (x_0 ~ mu, then x_s ~ q(x_s | x_t, x_0)); same law.
- `jump` (md4.reveal): each position's reveal step drawn up front; only those steps are visited.

heuristics (better samples per network call, perhaps, but not the model's law):
- `confidence` (md4.reveal): MaskGIT/LLaDA/Dream-style unmasking of the most confident
  positions (options `order`, `threshold`).
- `remdm` (md4.remdm): ReMDM's remasking of revealed tokens (options `remask`, `eta`, `t_on`,
  `t_off`, `alpha_on`); with eta = 0 it is `ancestral`, draw for draw.

Sampler options go through `sample(..., options={...})`: the keyword arguments of the sampler
function (`sampler_options(name)` lists them). Every sampler takes the same truncation of the
prediction (md4.truncation: temperature, top-k, top-p), which changes which token a position
takes, never when it is revealed (the model's `reveal` keeps the untruncated probability of
unmasking), reports each step to an optional `callback(x, t)` (md4.trace records it), and works
with classifier-free guidance (md4.guidance: class labels, or the prompt, which `sample` tells
the denoiser).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from md4.categorical import categorical
from md4.errors import UserError
from md4.remdm import Remasking, RemaskingStep
from md4.reveal import confidence, confidence_rule, jump, select_rows
from md4.truncation import NO_TRUNCATION, Truncation


def uniform_grid(steps: int) -> torch.Tensor:
    """t(i) = i / T, i = 0..T: [T+1] float64."""
    return torch.arange(steps + 1, dtype=torch.float64) / steps


def cosine_grid(steps: int) -> torch.Tensor:
    """t(i) = cos(pi/2 (1 - i/T)), i = 0..T: [T+1] float64, denser near t = 1 where sampling starts.

    With the linear schedule it visits the cosine schedule's alphas on the uniform grid, so few
    tokens are revealed in the first steps."""
    t = torch.cos(math.pi / 2 * (1 - uniform_grid(steps)))
    t[0] = 0.0
    return t


GRIDS = {"uniform": uniform_grid, "cosine": cosine_grid}


def time_grid(steps: int, grid: str = "cosine") -> torch.Tensor:
    if grid not in GRIDS:
        raise UserError(f"Unknown time grid {grid!r}; choose one of {', '.join(GRIDS)}.")
    if int(steps) < 1:
        raise UserError(f"The number of sampling steps must be at least 1, got {steps}.")
    return GRIDS[grid](int(steps))


def _default_device(denoiser, device):
    if device is not None:
        return torch.device(device)
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def ignores_time(denoiser) -> bool:
    """Whether the denoiser declares that it ignores t: `uses_time = False` on an md4.nn backbone
    built without time conditioning, or on an md4.guidance wrapper of one. Any other callable is
    taken to use t."""
    return getattr(denoiser, "uses_time", True) is False


def mean_step(model, xt: torch.Tensor, logits: torch.Tensor, t: float, s: float, generator=None,
              truncate: Truncation = NO_TRUNCATION) -> torch.Tensor:
    """The two-stage reverse step: x_0 ~ mu_theta(x_t) (truncated) at every position, then
    x_s ~ q(x_s | x_t, x_0) (`model.posterior_sample`). Same law as `model.reverse_step`."""
    x0 = categorical(truncate(logits), generator)
    return model.posterior_sample(xt, x0, t, s, generator)


class Truncated:
    """A truncation already applied: called with the logits it was computed from, it returns the
    truncated logits it holds ([B, N, V] float64). The cached sampler keeps them per sample and
    truncates again only the samples whose prediction changed."""

    identity = False

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        assert logits.shape == self.logits.shape
        return self.logits


def _walk(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator, truncate: Truncation,
          callback, progress: bool, cache: bool, step) -> torch.Tensor:
    """Walk the grid from t = 1 to 0 with `step(x_t, logits, t, s, generator, truncate) -> x_s`,
    given the denoiser's untruncated logits.

    cache=False calls the denoiser on the whole batch at every step. cache=True (denoisers that
    ignore t) keeps the logits of each sample, and their truncation (handed to the step as a
    `Truncated`), and recomputes both only for the samples whose x changed in the last step; the
    random draws are the same either way."""
    B = x.shape[0]
    logits = tokens = None
    keep = cache and not truncate.identity  # without truncation there is nothing to keep
    stale = torch.ones(B, dtype=torch.bool, device=x.device)
    for i in tqdm(range(len(grid) - 1, 0, -1), desc="sampling", disable=not progress, leave=False):
        t, s = grid[i].item(), grid[i - 1].item()
        if not cache or stale.all():
            logits = denoiser(x, torch.full((B,), t, device=x.device))
            if cache:  # rows are replaced in place below: never write into the denoiser's own tensor
                logits = logits.clone()
                tokens = truncate(logits) if keep else None  # truncation returns a new tensor
        elif stale.any():
            rows = stale.nonzero().squeeze(1)
            logits[rows] = select_rows(denoiser, rows)(x[rows], torch.full((len(rows),), t, device=x.device))
            if keep:
                tokens[rows] = truncate(logits[rows])
        new = step(x, logits, t, s, generator, Truncated(tokens) if keep else truncate)
        stale = (new != x).any(-1)
        x = new
        if callback is not None:
            callback(x, torch.full((B,), s, dtype=torch.float64))
    return x


@torch.no_grad()
def ancestral(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None, *,
              truncate: Truncation = NO_TRUNCATION, callback=None, progress: bool = False) -> torch.Tensor:
    """The ancestral sampler (the paper's Algorithm 2): x [B, N] long (masks where to generate)
    -> [B, N]; one denoiser call and one `model.reverse_step` per grid step."""
    return _walk(model, denoiser, x, grid, generator, truncate, callback, progress, False, model.reverse_step)


@torch.no_grad()
def cached(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None, *,
           truncate: Truncation = NO_TRUNCATION, callback=None, progress: bool = False) -> torch.Tensor:
    """`ancestral` with the prediction reused while a sample does not change: valid only when the
    denoiser ignores t (its registry entry says so; `sample` checks it). Calls per sample = steps
    in which it changed (plus the first), at most min(T, N + 1)."""
    return _walk(model, denoiser, x, grid, generator, truncate, callback, progress, True, model.reverse_step)


@torch.no_grad()
def mean(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None, *,
         truncate: Truncation = NO_TRUNCATION, callback=None, progress: bool = False) -> torch.Tensor:
    """The two-stage sampler (the reference code's `mean` sampler; the paper, App. G, found it worse
    than the one-stage step with float32 draws, not a difference in law): each step draws a full x_0
    from mu_theta, then reveals it at each masked position with probability
    (alpha_s - alpha_t) / (1 - alpha_t). x [B, N] -> [B, N]. With a token-dependent schedule
    (GenMD4) the reveal probability depends on the drawn x_0, so truncating mu would change when
    tokens are revealed: that combination is refused (the ancestral sampler keeps it)."""
    if not truncate.identity and not model.shared_schedule:
        raise UserError(f"With temperature, top-k or top-p the mean sampler would change when the tokens of a "
                        f"{type(model).__name__} model are revealed; use the ancestral sampler.")

    def step(xt, logits, t, s, generator, truncate):
        return mean_step(model, xt, logits, t, s, generator, truncate)

    return _walk(model, denoiser, x, grid, generator, truncate, callback, progress, False, step)


@torch.no_grad()
def remdm(model, denoiser, x: torch.Tensor, grid: torch.Tensor, generator=None, *,
          truncate: Truncation = NO_TRUNCATION, callback=None, progress: bool = False, remask: str = "cap",
          eta: float | None = None, t_on: float = 0.55, t_off: float = 0.05, alpha_on: float = 0.9) -> torch.Tensor:
    """ReMDM (md4.remdm): the ancestral walk with revealed tokens remasked with probability sigma,
    by the schedule `remask` (cap, rescale, conf, loop) with eta (None: the schedule's default)
    and, for loop, t_on, t_off and alpha_on. x [B, N] -> [B, N]; one denoiser call per grid step.
    eta = 0 gives `ancestral`'s samples for the same seed."""
    plan = Remasking(remask, eta, t_on, t_off, alpha_on)
    step = RemaskingStep(model, plan, x == model.mask_id)
    return _walk(model, denoiser, x, plan.times(model, grid), generator, truncate, callback, progress, False, step)


@dataclass(frozen=True)
class Sampler:
    """A sampler, `run(model, denoiser, x [B, N], grid [T+1], generator, *, truncate, callback,
    progress, **options) -> [B, N]`, and what it needs: `needs` names md4.method.Method capabilities
    that must hold for the model, `time_independent` asks for a denoiser that ignores t. `check`,
    if any, validates the options (`check(**options)` raises UserError) before any work; `exact`:
    the model's law (or exactly the ancestral chain's), not a heuristic."""

    run: Callable
    needs: tuple[str, ...] = ("reverse_process",)
    time_independent: bool = False
    check: Callable | None = None
    exact: bool = True


SAMPLERS = {
    "ancestral": Sampler(ancestral),
    "cached": Sampler(cached, time_independent=True),
    "mean": Sampler(mean, ("reverse_process", "predicts_mean")),
    "jump": Sampler(jump, ("reverse_process", "predicts_mean", "shared_schedule")),
    "confidence": Sampler(confidence, ("reverse_process", "predicts_mean", "shared_schedule"), check=confidence_rule,
                          exact=False),
    "remdm": Sampler(remdm, ("reverse_process", "predicts_mean", "shared_schedule"), check=Remasking, exact=False),
}
# the keyword arguments every sampler takes from `sample` itself, not from its options
COMMON = ("truncate", "callback", "progress")
# what a method lacks, for the error that names it
LACKS = {"reverse_process": "draws on its own, with no time grid",
         "predicts_mean": "has its own reverse step, not a mean prediction to draw tokens from",
         "shared_schedule": "has one masking schedule per token, not one for all tokens"}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise UserError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


def supported_samplers(model) -> list[str]:
    """The names of the samplers whose needs the method `model` (an md4.method.Method) meets."""
    return [name for name, s in SAMPLERS.items() if all(getattr(model, need) for need in s.needs)]


def check_sampler(model, name: str, time_independent: bool = False) -> Sampler:
    """The sampler `name` if the model (and a denoiser that ignores t, or not) meets its needs,
    else a UserError saying what is missing and which samplers apply."""
    sampler = get_sampler(name)
    lacking = [need for need in sampler.needs if not getattr(model, need)]
    if lacking:
        fits = supported_samplers(model)
        raise UserError(f"The {name} sampler does not apply: {type(model).__name__} {LACKS[lacking[0]]}"
                        + (f"; use {' or '.join(fits)}." if fits else "."))
    if sampler.time_independent and not time_independent:
        raise UserError(f"The {name} sampler needs a denoiser that ignores t (a model trained with "
                        "model.time_cond=false); use ancestral or jump for this one.")
    return sampler


@torch.no_grad()
def fill_masks(model, denoiser, x: torch.Tensor) -> torch.Tensor:
    """Positions still masked take the argmax of the prediction at t = 0 (rows with masks only)."""
    rows = (x == model.mask_id).any(-1).nonzero().squeeze(1)
    if len(rows):  # rare: a position that never unmasked
        sub = x[rows]
        logits = select_rows(denoiser, rows)(sub, torch.zeros(len(rows), device=x.device))
        x = x.clone()
        x[rows] = torch.where(sub == model.mask_id, logits.argmax(-1), sub)
    return x


def sampler_options(name: str) -> list[str]:
    """The options of sampler `name`: its function's keyword arguments beyond COMMON."""
    params = inspect.signature(get_sampler(name).run).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in COMMON]


def check_options(name: str, options: dict | None) -> dict:
    """The options for sampler `name`, checked (names and values): a UserError naming the valid
    ones for an option it does not take."""
    options = dict(options or {})
    valid = sampler_options(name)
    for key in options:
        if key not in valid:
            raise UserError(f"The {name} sampler takes no option {key!r}; "
                            + (f"its options: {', '.join(valid)}." if valid else "it takes no options."))
    check = get_sampler(name).check
    if check is not None:
        check(**options)
    return options


def with_prompt(denoiser, given: torch.Tensor, mask_id: int):
    """The denoiser told which positions of the batch were given ([B, N] bool: the prompt, known
    positions, or a window's context), when it asks (guidance that masks the prompt, md4.guidance);
    any other denoiser is returned as is."""
    attach = getattr(denoiser, "with_prompt", None)
    return attach(given, mask_id) if callable(attach) else denoiser


@torch.no_grad()
def sample(model, denoiser, num_samples: int, length: int, steps: int = 1000, grid: str = "cosine",
           generator=None, device=None, sampler: str = "ancestral", progress: bool = False, *,
           known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, block: int = 0,
           window: int | None = None, time_independent: bool | None = None, callback=None,
           options: dict | None = None) -> torch.Tensor:
    """Generate [num_samples, length] long sequences with no mask left.

    sampler, options: the sampler's name (SAMPLERS) and its options, a dict of its keyword
        arguments (`sampler_options(name)`; e.g. confidence: order, threshold; remdm: remask, eta,
        t_on, t_off, alpha_on), checked before any work.

    known, known_mask: [num_samples, length] long and bool (or [length], shared): the positions
        where known_mask is True keep the value of `known` (infilling, prompts); the rest is
        generated. With the exact denoiser the result follows p(x | known positions).
    temperature, top_k, top_p: truncation of the prediction (md4.truncation).
    block, window: semi-autoregressive generation (md4.conditional.blockwise): the first `window`
        positions at once, then `block` new positions at a time, each window conditioned on the
        last window - block positions generated.
    time_independent: the denoiser ignores t (needed by `cached`); None = read it from the
        denoiser's `uses_time` (md4.nn backbones and md4.guidance wrappers declare it).
    callback: called as callback(x [num_samples, length], t [num_samples]) after every step.
    A denoiser with classifier-free guidance on the prompt (md4.guidance.Guided without labels) is
    told the positions given at the start of each run (`with_prompt`).
    """
    from md4.conditional import blockwise, initial_state

    if time_independent is None:
        time_independent = ignores_time(denoiser)
    run = check_sampler(model, sampler, time_independent).run
    options = check_options(sampler, options)
    truncate = Truncation(temperature, top_k, top_p)
    for name, value in (("number of samples", num_samples), ("length", length)):
        if int(value) < 1:
            raise UserError(f"The {name} must be at least 1, got {value}.")
    device = _default_device(denoiser, device)
    times = time_grid(steps, grid)
    x = initial_state(num_samples, length, model.mask_id, known, known_mask, device)

    def generate(x_window, window_callback):
        den = with_prompt(denoiser, x_window != model.mask_id, model.mask_id)
        if window_callback is not None:
            window_callback(x_window, torch.ones(len(x_window), dtype=torch.float64))
        out = run(model, den, x_window, times, generator, truncate=truncate, callback=window_callback,
                  progress=progress, **options)
        out = fill_masks(model, den, out)
        if window_callback is not None:
            window_callback(out, torch.zeros(len(out), dtype=torch.float64))
        return out

    if block:
        return blockwise(generate, x, block, window or length, callback, progress)
    return generate(x, callback)
