"""Prepared token corpora: a folder of uint16 shards (`md4 data prepare`), memory-mapped.

    folder/meta.json            {"format": "md4-tokens", "tokenizer": "gpt2", "vocab_size": 50257,
                                 "eot_id": 50256, "dtype": "uint16",
                                 "splits": {"train": {"tokens", "documents", "shards": [{"file", "tokens"}]}, ...}}
    folder/train_000000.bin     raw little-endian uint16 ids, documents separated by eot_id
    folder/valid_000000.bin ...

The training split stays on disk: `TokenShards` memory-maps its shards and reads only the
N-token windows a batch asks for, so corpora far larger than memory work. The held-out splits
are read into memory (they are small) as plain arrays for `eval_chunks`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from md4.data.corpus import SPLITS, Corpus
from md4.errors import UserError

META = "meta.json"
FORMAT = "md4-tokens"


def is_prepared(path: str | Path) -> bool:
    return (Path(path).expanduser() / META).is_file()


class TokenShards:
    """One split as a sequence of memory-mapped shards; len() is the number of tokens.

    A window never crosses a shard boundary: the W = sum_s max(0, len_s - N + 1) windows of
    length N are numbered shard by shard, and `crops` reads windows by number."""

    def __init__(self, files: list[Path], sizes: list[int]):
        self.files, self.sizes = list(files), [int(s) for s in sizes]
        self._maps: list[np.memmap | None] = [None] * len(files)

    def __len__(self) -> int:
        return sum(self.sizes)

    def shard(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            try:
                self._maps[i] = np.memmap(self.files[i], dtype="<u2", mode="r", shape=(self.sizes[i],))
            except (OSError, ValueError) as e:
                raise UserError(f"Token shard {self.files[i]} is missing or shorter than meta.json says ({e}).")
        return self._maps[i]

    def windows(self, length: int) -> np.ndarray:
        """[S] number of length-N windows in each shard."""
        return np.maximum(np.asarray(self.sizes, dtype=np.int64) - length + 1, 0)

    def crops(self, index: torch.Tensor, length: int) -> torch.Tensor:
        """[k, N] long: the windows numbered `index` ([k] long, each in [0, W))."""
        per_shard = self.windows(length)
        ends = np.cumsum(per_shard)
        idx = index.numpy().astype(np.int64)
        which = np.searchsorted(ends, idx, side="right")
        starts = idx - (ends[which] - per_shard[which])
        rows = [np.asarray(self.shard(s)[o : o + length], dtype=np.int64) for s, o in zip(which, starts)]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, length, dtype=torch.long)

    def read(self) -> np.ndarray:
        """The whole split in memory: 1-D uint16 (for the small held-out splits)."""
        if not self.files:
            return np.zeros(0, dtype=np.uint16)
        return np.concatenate([np.asarray(self.shard(i)) for i in range(len(self.files))])


def random_windows(data: TokenShards, batch_size: int, length: int, generator: torch.Generator,
                   rows: slice = slice(None)) -> torch.Tensor:
    """[B, N] long (rows `rows` of it): B windows drawn uniformly with replacement. All B numbers
    are drawn whatever `rows` is, so every rank of a data-parallel run draws the same global batch
    from the same generator state and reads only its own rows."""
    total = int(data.windows(length).sum())
    if total < 1:
        raise UserError(f"The data has no shard of at least {length:,} tokens, the sequence length.")
    index = torch.randint(0, total, (batch_size,), generator=generator)
    return data.crops(index[rows], length)


def read_meta(folder: Path) -> dict:
    from md4.checkpoint import read_json

    meta = read_json(folder / META)
    if meta.get("format") != FORMAT or "splits" not in meta:
        raise UserError(f"{folder / META} is not the metadata of a prepared md4 token corpus.")
    return meta


def load_prepared(folder: str | Path, *, min_length: int = 2) -> Corpus:
    """A folder written by `md4 data prepare`: train memory-mapped, valid/test read into memory."""
    from md4.data.bpe import BPE_TOKENIZERS

    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    name = meta.get("tokenizer")
    if name not in BPE_TOKENIZERS:
        raise UserError(f"{folder} was prepared with an unknown tokenizer {name!r}.")
    tokenizer = BPE_TOKENIZERS[name]()
    splits = {}
    for split in SPLITS:
        info = meta["splits"].get(split, {"shards": []})
        shards = TokenShards([folder / s["file"] for s in info["shards"]], [s["tokens"] for s in info["shards"]])
        splits[split] = shards if split == "train" else shards.read()
    train = splits["train"]
    if len(train) < min_length or int(train.windows(min_length - 1).sum()) < 1:
        raise UserError(f"The train split of {folder} has no shard of {min_length - 1:,} tokens; "
                        f"prepare more text or use a shorter sequence length.")
    if len(splits["valid"]) < min_length:
        raise UserError(f"The valid split of {folder} has {len(splits['valid']):,} tokens, fewer than the "
                        f"{min_length:,} needed; prepare it with a larger --valid fraction.")
    return Corpus(train, splits["valid"], splits["test"], tokenizer=tokenizer, name=folder.name)
