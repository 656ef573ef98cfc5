"""A loaded model as a language model over text: log-likelihood bounds and generation.

What lm-evaluation-harness asks of a model (md4.lmeval wraps these), usable on its own:

    loglikelihoods(model, [(context, continuation), ...])  -> [log p(continuation | context)]
    loglikelihoods(model, [("", text), ...])                 -> [log p(text)]  (rolling windows)
    generate(model, [prompt, ...], until=["\\n"])           -> [continuation]

Masked diffusion gives no exact likelihood, so the numbers are BOUNDS: for each scored window,
log p(cont | ctx) >= -NELBO(cont | ctx), where the conditional NELBO masks only the continuation
positions (the context is given, never masked; `nelbo(known=...)`), averaged over K stratified
draws of t (mc_samples, as `md4 eval`). The AR baseline's numbers are exact. The same seed gives
the same numbers: a text whose length is a multiple of the model length scores exactly
-(sum of `md4.evaluate.sequence_nelbo` over its consecutive chunks).

Text is encoded as the model's training data was: character models normalize it the text8 way
(lower case, every other character a space), so the scored text is that normalized text.
Windows: a continuation that fits the model length N is scored in one window with as much
context as fits (the context is cut on the left); a longer one in consecutive windows of N
positions, each token scored once, the last window filled up with earlier tokens as context
(the harness's rolling convention).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from md4.data import normalize_text8
from md4.errors import UserError
from md4.evaluate import bound_options, sequence_nelbo

# text normalization by tokenizer name, applied before encoding (BPE takes raw text)
NORMALIZE = {"char": normalize_text8}


def encode(model, text: str) -> list[int]:
    """Text -> token ids, normalized as the model's training text was; images are refused."""
    name = model.tokenizer.name
    if name == "image":
        raise UserError("This is an image model; text tasks need a text model.")
    text = NORMALIZE.get(name, str)(text)
    return [int(i) for i in model.tokenizer.encode(text)] if text else []


def split_ids(model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the whole text is encoded and split after the context's
    ids, so a boundary space (or a BPE merge) lands where the tokenizer puts it."""
    whole, ctx = encode(model, context + continuation), encode(model, context)
    if whole[: len(ctx)] != ctx:  # the context's last token merges with the continuation
        return ctx, encode(model, continuation)
    return ctx, whole[len(ctx):]


def windows(length: int, start: int, size: int) -> list[tuple[int, int, int]]:
    """Windows (lo, hi, first) covering positions start..length-1 of a sequence once each:
    positions lo..first-1 of the window are context, first..hi-1 are scored; hi - lo <= size."""
    if length <= start:
        return []
    if length - start <= size:
        return [(max(0, length - size), length, start)]
    out, first, hi = [], start, max(size, start + max(1, size // 2))  # the first keeps some context
    while first < length:
        hi = min(hi, length)
        out.append((max(0, hi - size), hi, first))
        first, hi = hi, hi + size
    return out


def model_limit(model) -> int:
    """The longest window: the training length N (the network's position table may be longer)."""
    return min(model.length, model.net.max_len)


@torch.no_grad()
def greedy(model, x: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Whether each row's scored tokens are the argmax predictions: [B] bool. x [B, n] long,
    scored [B, n] bool. AR: next-token argmax given the true prefix. Masked diffusion: argmax of one
    parallel step from the scored positions all masked (t = 1), not the multi-step sampler's output."""
    d, ones = model.method, torch.ones(len(x), device=x.device)
    if d.causal:
        logits = model.net(d.shift(x), torch.zeros_like(ones))
    else:
        logits = model.net(torch.where(scored, torch.full_like(x, d.mask_id), x), ones)
    return ((logits.argmax(-1) == x) | ~scored).all(-1)


def loglikelihoods(model, pairs: list[tuple[str, str]], mc_samples: int = 1, timesteps: int = 0,
                   batch_size: int = 32, seed: int = 0, with_greedy: bool = False):
    """Lower bounds on log p(continuation | context) in nats, one per (context, continuation) pair
    (a list of floats; with_greedy: a list of (float, bool) with `greedy`'s verdict).

    All windows of one length are scored together by `sequence_nelbo` (seeded once per length,
    in the order of the pairs), with `known` marking their context positions."""
    mc_samples, timesteps = bound_options(model, mc_samples, timesteps)
    size = model_limit(model)
    groups = defaultdict(list)  # window length -> [(pair index, ids, scored from)]
    for i, (context, continuation) in enumerate(pairs):
        ctx, cont = split_ids(model, context, continuation)
        ids = ctx + cont
        for lo, hi, first in windows(len(ids), len(ctx), size):
            groups[hi - lo].append((i, ids[lo:hi], first - lo))
    totals = [0.0] * len(pairs)
    is_greedy = [True] * len(pairs)
    for n, items in groups.items():
        x = torch.tensor([ids for _, ids, _ in items], dtype=torch.long)
        known = torch.arange(n)[None, :] < torch.tensor([f for _, _, f in items])[:, None]
        nelbo = sequence_nelbo(model.method, model.net, x, mc_samples=mc_samples, batch_size=batch_size,
                               timesteps=timesteps, seed=seed, device=model.device, known=known)
        verdict = (torch.cat([greedy(model, xb.to(model.device), kb.to(model.device)).cpu()
                              for xb, kb in zip(x.split(batch_size), (~known).split(batch_size))])
                   if with_greedy else torch.ones(len(items), dtype=torch.bool))
        for (i, _, _), v, g in zip(items, nelbo.tolist(), verdict.tolist()):
            totals[i] -= v
            is_greedy[i] &= g
    return list(zip(totals, is_greedy)) if with_greedy else totals


def cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    end = min([text.find(s) for s in until if s and s in text], default=len(text))
    return text[:end]


def generate(model, prompts: list[str], until: list[str] = (), max_tokens: int = 64, steps: int | None = None,
             sampler: str = "ancestral", temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """For each prompt, `max_tokens` new tokens (at most N - 1 with a prompt) generated after it by
    md4's samplers, with the prompt (cut on the left to fit the window) as known positions;
    the text is cut at the first stop string."""
    if not model.method.reverse_process:
        raise UserError(f"Generation after a prompt needs a masked diffusion model, not {model.config.method}.")
    size = model_limit(model)
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}.")
    out = []
    for prompt in prompts:
        ids = encode(model, prompt)
        new = min(max_tokens, size - 1 if ids else size)
        keep = ids[len(ids) - (size - new):] if ids else []
        known = torch.tensor(keep + [0] * new, dtype=torch.long)
        mask = torch.arange(len(known)) < len(keep)
        x = model.sample(1, steps=steps, length=len(known), seed=seed, known=known, known_mask=mask,
                         sampler=sampler, temperature=temperature, top_p=top_p)
        out.append(cut(model.tokenizer.decode(x[0, len(keep):].tolist()), list(until)))
    return out
