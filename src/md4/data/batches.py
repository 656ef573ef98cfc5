"""Batches of character ids for training (random crops) and evaluation (consecutive chunks).

Random offsets come from an explicit torch.Generator, so the data order is reproducible, and
resumable by saving `generator.get_state()` in a checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from md4.errors import UserError


def _as_tensor(data: np.ndarray | torch.Tensor, length: int) -> torch.Tensor:
    data = torch.as_tensor(data)  # zero-copy for a numpy array
    if data.ndim != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if len(data) < length:
        raise UserError(f"The data has {len(data):,} tokens, fewer than the sequence length {length:,}.")
    return data


def random_offsets(n: int, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[B] long start offsets, uniform over all n - length + 1 windows of data of length n."""
    return torch.randint(0, n - length + 1, (batch_size,), generator=generator)


def random_crops(
    data: np.ndarray | torch.Tensor, batch_size: int, length: int, generator: torch.Generator,
    rows: slice = slice(None),
) -> torch.Tensor:
    """[B, N] long: crops data[s : s + N] at B uniform random offsets s, gathered in one index op.

    rows: return only these rows of the batch (a data-parallel rank's share); all B offsets are
    drawn regardless, so the generator advances the same way. Prepared token shards
    (md4.data.tokens.TokenShards) are read window by window from disk."""
    from md4.data.tokens import TokenShards, random_windows

    if isinstance(data, TokenShards):
        return random_windows(data, batch_size, length, generator, rows)
    data = _as_tensor(data, length)
    starts = random_offsets(len(data), batch_size, length, generator)[rows]
    return data[starts[:, None] + torch.arange(length)].long()


def eval_chunks(data: np.ndarray | torch.Tensor, length: int) -> torch.Tensor:
    """[M, N] long: the M = len(data) // N consecutive non-overlapping chunks; the remainder is dropped.
    2-D data (one sequence per row, e.g. images) is returned as it is."""
    if is_rows(data):
        return _rows(data, length).long()
    data = _as_tensor(data, length)
    m = len(data) // length
    return data[: m * length].reshape(m, length).long()


def is_rows(data) -> bool:
    """Whether the data is 2-D, one sequence per row (images), rather than one token stream
    (a 1-D array or tensor, or md4.data.tokens.TokenShards read from disk)."""
    return getattr(data, "ndim", 1) == 2


def _rows(data: np.ndarray | torch.Tensor, length: int) -> torch.Tensor:
    data = torch.as_tensor(data)
    if data.shape[1] != length:
        raise UserError(f"The data has sequences of {data.shape[1]:,} tokens (one per row), but the sequence "
                        f"length is {length:,}; set data.length={data.shape[1]}.")
    return data


def random_rows(data, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` rows of a 2-D split picked at random with `seed`: (rows [num, N] long, indices [num])."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num]
    return torch.as_tensor(data)[idx].long(), idx


def split_labels(corpus, which: str) -> torch.Tensor | None:
    """[M] long labels of a split, or None for a corpus without labels (text)."""
    labels = getattr(corpus, "labels", None)
    y = labels(which) if callable(labels) else None
    return None if y is None else torch.as_tensor(y).long()


def check_labels(corpus, split: str, num_classes: int) -> torch.Tensor | None:
    """The split's labels [M] long when the model is class-conditional (num_classes > 0), else
    None; a UserError when the data has no labels or labels outside 0..num_classes-1."""
    if not num_classes:
        return None
    labels = split_labels(corpus, split)
    if labels is None:
        raise UserError(f"model.num_classes={num_classes} asks for a class-conditional model, but corpus "
                        f"{corpus.name!r} has no labels; set model.num_classes=0.")
    if len(labels) and labels.max() >= num_classes:
        raise UserError(f"Corpus {corpus.name!r} has labels up to {labels.max().item()}, but model.num_classes "
                        f"is {num_classes}.")
    return labels


def draw_batch(corpus, batch_size: int, length: int, generator: torch.Generator, rows: slice = slice(None),
               labels: bool = False, label_dropout: float = 0.0,
               null_label: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training batch: x0 [B, N] long and labels [B] long (or None). 1-D data (text) gives
    random crops; 2-D data [M, N] (images, one per row) gives random rows and, with labels=True,
    their labels, each replaced by `null_label` with probability `label_dropout`.

    rows: return only these rows of the batch (a data-parallel rank's share); the random draws
    are made for the whole batch regardless, so every rank's generator advances the same way and
    the ranks' shares together are exactly the batch one process would draw."""
    data = corpus.train
    if not is_rows(data):
        return random_crops(data, batch_size, length, generator, rows), None
    index = torch.randint(0, len(data), (batch_size,), generator=generator)
    x0 = _rows(data, length)[index[rows]].long()
    y = split_labels(corpus, "train") if labels else None
    if y is None:
        return x0, None
    from md4.guidance import drop_labels

    return x0, drop_labels(y[index], label_dropout, null_label, generator)[rows]
