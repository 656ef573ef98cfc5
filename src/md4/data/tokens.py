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
from md4.validate import fail, field, known_keys, mapping, one_of

META = "meta.json"
FORMAT = "md4-tokens"


def is_prepared(path: str | Path) -> bool:
    return (Path(path).expanduser() / META).is_file()


class TokenShards:
    """One split as a sequence of memory-mapped shards; len() is the number of tokens.

    A window never crosses a shard boundary: the W = sum_s max(0, len_s - N + 1) windows of
    length N are numbered shard by shard, and `crops` reads windows by number."""

    def __init__(self, files: list[Path], sizes: list[int], vocab_size: int | None = None):
        self.files, self.sizes = list(files), [int(s) for s in sizes]
        self.vocab_size = vocab_size  # ids read are checked to lie below it (None: not checked)
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
        rows = [self.checked(s, np.asarray(self.shard(s)[o : o + length], dtype=np.int64))
                for s, o in zip(which, starts)]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, length, dtype=torch.long)

    def checked(self, i: int, ids: np.ndarray) -> np.ndarray:
        """ids read from shard i, or a UserError when one lies outside the vocabulary."""
        if self.vocab_size is not None and ids.size and ids.max() >= self.vocab_size:
            raise UserError(f"Token shard {self.files[i]} holds the id {ids.max()}, outside the vocabulary of "
                            f"{self.vocab_size:,} that meta.json gives.")
        return ids

    def read(self) -> np.ndarray:
        """The whole split in memory: 1-D uint16 (for the small held-out splits)."""
        if not self.files:
            return np.zeros(0, dtype=np.uint16)
        return np.concatenate([self.checked(i, np.asarray(self.shard(i))) for i in range(len(self.files))])


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
    """meta.json checked field by field: format, tokenizer (a BPE_TOKENIZERS name), vocab_size and
    eot_id (the tokenizer's), dtype uint16, and splits (train, valid, test) each with
    shards [{file, tokens}]: every file a path inside the folder (no absolute path, no "..", no
    symbolic link out of it) holding exactly `tokens` uint16 ids, and the split's tokens their sum."""
    from md4.checkpoint import read_json
    from md4.data.bpe import BPE_TOKENIZERS

    path = folder / META
    meta = mapping(read_json(path), "the top level", path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not the metadata of a prepared md4 token corpus.")
    tokenizer = BPE_TOKENIZERS[one_of(meta.get("tokenizer"), BPE_TOKENIZERS, "tokenizer", path)]
    for key in ("vocab_size", "eot_id"):
        expected = getattr(tokenizer, key)
        if field(meta, key, int, path, default=expected) != expected:
            raise fail(key, path, f"is {meta[key]}, but the {tokenizer.name} tokenizer has {expected}")
    one_of(meta.get("dtype", "uint16"), ("uint16",), "dtype", path)
    splits = field(meta, "splits", dict, path)
    known_keys(splits, SPLITS, "splits", path)
    root = folder.resolve()
    for split, info in splits.items():
        where = f"splits.{split}"
        shards = field(mapping(info, where, path), "shards", list, path, prefix=f"{where}.")
        for i, shard in enumerate(shards):
            name = f"{where}.shards[{i}]"
            mapping(shard, name, path)
            file = field(shard, "file", str, path, prefix=f"{name}.")
            tokens = field(shard, "tokens", int, path, lo=0, prefix=f"{name}.")
            target = (folder / file).resolve()
            if Path(file).is_absolute() or ".." in Path(file).parts or not target.is_relative_to(root):
                raise fail(f"{name}.file", path, f"is {file!r}, outside the corpus folder; shards must lie inside it")
            size = target.stat().st_size if target.is_file() else None
            if size != 2 * tokens:
                held = "is missing" if size is None else f"holds {size // 2:,} uint16 ids"
                raise UserError(f"Token shard {folder / file} {held}, but meta.json says {tokens:,}.")
        total = sum(s["tokens"] for s in shards)
        if field(info, "tokens", int, path, lo=0, default=total, prefix=f"{where}.") != total:
            raise fail(f"{where}.tokens", path, f"is {info['tokens']:,}, but its shards hold {total:,}")
    return meta


def load_prepared(folder: str | Path, *, min_length: int = 2) -> Corpus:
    """A folder written by `md4 data prepare`: train memory-mapped, valid/test read into memory."""
    from md4.data.bpe import BPE_TOKENIZERS

    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    tokenizer = BPE_TOKENIZERS[meta["tokenizer"]]()
    splits = {}
    for split in SPLITS:
        info = meta["splits"].get(split, {"shards": []})
        shards = TokenShards([folder / s["file"] for s in info["shards"]], [s["tokens"] for s in info["shards"]],
                             tokenizer.vocab_size)
        splits[split] = shards if split == "train" else shards.read()
    train = splits["train"]
    if len(train) < min_length or int(train.windows(min_length - 1).sum()) < 1:
        raise UserError(f"The train split of {folder} has no shard of {min_length - 1:,} tokens; "
                        f"prepare more text or use a shorter sequence length.")
    if len(splits["valid"]) < min_length:
        raise UserError(f"The valid split of {folder} has {len(splits['valid']):,} tokens, fewer than the "
                        f"{min_length:,} needed; prepare it with a larger --valid fraction.")
    return Corpus(train, splits["valid"], splits["test"], tokenizer=tokenizer, name=folder.name)
