"""Conditional generation: known positions (infilling, prompts) and semi-autoregressive blocks.

Masked diffusion conditions for free: the reverse process never changes a position that is
not masked, so a sampler started from a partially masked sequence generates only the masked
positions, and with the exact denoiser E[x_0 | x_t] it samples p(unknown | known).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from md4.errors import UserError


def initial_state(num_samples: int, length: int, mask_id: int, known=None, known_mask=None,
                  device=None) -> torch.Tensor:
    """The sampler's start: [num_samples, length] long, `known` where `known_mask` is True and
    the mask id elsewhere. known / known_mask: [num_samples, length] (or [length], shared by all
    samples) long / bool; None for unconditional generation."""
    x = torch.full((num_samples, length), mask_id, dtype=torch.long, device=device)
    if known is None and known_mask is None:
        return x
    if known is None or known_mask is None:
        raise UserError("Infilling needs both known (the tokens) and known_mask (where they are known).")
    known, known_mask = torch.as_tensor(known, device=device), torch.as_tensor(known_mask, device=device)
    if known_mask.dtype != torch.bool:
        raise UserError(f"known_mask must be a bool tensor, got {known_mask.dtype}.")
    if known.dtype.is_floating_point or known.dtype == torch.bool:
        raise UserError(f"known must hold integer token ids, got {known.dtype}.")
    for name, value in (("known", known), ("known_mask", known_mask)):
        if tuple(value.shape) not in ((length,), (num_samples, length)):
            raise UserError(f"{name} must have shape [{num_samples}, {length}] (or [{length}]), "
                            f"got {list(value.shape)}.")
    known = known.long().expand(num_samples, length)
    known_mask = known_mask.expand(num_samples, length)
    given = known[known_mask]
    if given.numel() and (given.min() < 0 or given.max() >= mask_id):
        raise UserError(f"Known tokens must lie in 0..{mask_id - 1}, got values in "
                        f"[{given.min().item()}, {given.max().item()}].")
    return torch.where(known_mask, known, x)


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Text -> [len] long ids; "_" is a position to fill (the mask id). Upper case is folded when
    the tokenizer has no upper-case letters (text8-style characters); any other character the
    tokenizer lacks is a UserError."""
    alphabet = getattr(tokenizer, "alphabet", "")
    if not any(c.isupper() for c in alphabet):
        text = text.lower()
    return torch.as_tensor(tokenizer.encode(text)).long()


def text_condition(tokenizer, text: str, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(known [length] long, known_mask [length] bool) for a prompt or an infilling pattern: the
    text fills the first positions ("_" = to generate), the rest of `length` is generated.
    length None = the text's own length. A tokenizer with its own `condition(text, length)`
    (records: md4.data.records) lays the pattern out itself."""
    if hasattr(tokenizer, "condition"):
        return tokenizer.condition(text, length)
    ids = encode_text(tokenizer, text)
    length = len(ids) if length is None else int(length)
    if len(ids) > length:
        raise UserError(f"The text has {len(ids)} characters, more than the sequence length {length}.")
    if len(ids) == 0:
        raise UserError("The prompt or infilling text is empty.")
    known = torch.zeros(length, dtype=torch.long)
    known_mask = torch.zeros(length, dtype=torch.bool)
    known[: len(ids)] = ids.clamp(max=tokenizer.mask_id - 1)
    known_mask[: len(ids)] = ids != tokenizer.mask_id
    return known, known_mask


def blockwise(generate, x: torch.Tensor, block: int, window: int, callback=None,
              progress: bool = False) -> torch.Tensor:
    """Semi-autoregressive generation of x [B, L] (known tokens, masks elsewhere) with a denoiser
    that sees `window` positions: the first window at once, then `block` new positions at a time,
    each window made of the last window - block positions already generated and the new ones.

    generate(x_window [B, w], callback) -> [B, w] fills the masks of one window; callback(x, t)
    receives the whole sequence [B, L]."""
    if int(window) < 1 or not 1 <= int(block) <= int(window):
        raise UserError(f"The block ({block}) must lie between 1 and the window ({window}).")
    L = x.shape[1]
    out = x.clone()
    end = min(window, L)
    starts = [(0, end)]
    while end < L:
        new = min(block, L - end)
        starts.append((end + new - window, end + new))
        end += new
    for start, stop in tqdm(starts, desc="blocks", disable=not progress or len(starts) == 1, leave=False):
        def whole(xw, t, start=start):
            full = out.clone()
            full[:, start:start + xw.shape[1]] = xw
            callback(full, t)

        out[:, start:stop] = generate(out[:, start:stop], whole if callback is not None else None)
    return out
