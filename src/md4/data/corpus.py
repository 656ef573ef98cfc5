"""A corpus: train / valid / test arrays of character ids, split contiguously by fractions.

Shared by every source (text8, shakespeare, any text file): where data files are looked for,
how a file is read with a one-sentence error, and how ids are split and checked.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import numpy as np

from md4.data.chars import CharTokenizer, normalize_bytes
from md4.errors import UserError

SPLITS = ("train", "valid", "test")
# The text8 convention: 90M / 5M / 5M of 100M characters.
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)


class Splits:
    """The SPLITS of a corpus by name: attributes train, valid, test."""

    def split(self, which: str) -> np.ndarray:
        if which not in SPLITS:
            raise UserError(f"Unknown split {which!r}; choose one of {', '.join(SPLITS)}.")
        return getattr(self, which)

    def sizes(self) -> str:
        """"train=M, valid=M, test=M" (sequences or tokens), for repr."""
        return ", ".join(f"{s}={len(self.split(s)):,}" for s in SPLITS)


@dataclass(repr=False, eq=False)
class Corpus(Splits):
    """train, valid, test: 1-D uint8 ids in [0, tokenizer.vocab_size)."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    tokenizer: CharTokenizer
    name: str

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {self.sizes()})"


def cache_dir() -> Path:
    """Where downloads go: $XDG_CACHE_HOME/md4, by default ~/.cache/md4."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "md4"


def data_dirs() -> list[Path]:
    """Folders searched for data files, in order: $MD4_DATA (if set), then the cache folder."""
    dirs = [Path(os.environ["MD4_DATA"]).expanduser()] if os.environ.get("MD4_DATA") else []
    return dirs + [cache_dir()]


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or a UserError naming the file when it cannot be read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"File not found: {path}.")
    if path.is_dir():
        raise UserError(f"Expected a file but {path} is a directory.")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None


def split_corpus(
    ids: np.ndarray,
    name: str,
    *,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    min_length: int = 2,
) -> Corpus:
    """Contiguous split: the first fractions[0] of ids train, the next fractions[1] valid,
    the rest test. Each split must hold at least min_length ids (e.g. sequence length + 1)."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise UserError(f"Split fractions must be three non-negative numbers summing to 1, got {fractions}.")
    if len(ids) == 0:
        raise UserError(f"Corpus {name!r} is empty: it has no letters a-z.")
    n_train = round(len(ids) * fractions[0])
    n_valid = round(len(ids) * fractions[1])
    parts = np.split(ids, [n_train, n_train + n_valid])
    for split, part in zip(SPLITS, parts):
        if len(part) < min_length:
            raise UserError(
                f"The {split} split of corpus {name!r} has {len(part):,} characters, fewer than the "
                f"{min_length:,} needed; use a longer text or a shorter sequence length."
            )
    return Corpus(*parts, tokenizer=CharTokenizer(), name=name)


def load_text_file(path: str | Path, *, min_length: int = 2, fractions=DEFAULT_FRACTIONS) -> Corpus:
    """Any text file, normalized text8-style (see `normalize_text8`) and split 90/5/5."""
    tokenizer = CharTokenizer()
    ids = tokenizer.encode(normalize_bytes(read_bytes(path)))
    return split_corpus(ids, Path(path).name, fractions=fractions, min_length=min_length)


def fetch(url: str, dest: Path, timeout: float = 60.0, check=None) -> Path:
    """Download url to dest atomically: a temporary file in dest's folder, checked by `check(path)`
    (which raises OSError when the content is wrong), then renamed into place. On failure nothing
    is left at dest and the OSError (or urllib's error) propagates for the caller to explain."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        print(f"downloading {url} to {dest}", file=sys.stderr)
        with os.fdopen(fd, "wb") as f, urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, f)
        if check is not None:
            check(tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful rename
    return dest


def download(url: str, dest: Path, timeout: float = 60.0, check=None, put: str | None = None) -> Path:
    """`fetch`, with any failure turned into one UserError that says what failed and what to put
    where instead (`put`, e.g. "text8.zip or text8 in FOLDER"; default: the file, in dest's folder)."""
    try:
        return fetch(url, dest, timeout, check)
    except Exception as e:
        where = put or f"it in {Path(dest).parent}"
        raise UserError(f"Could not download {url} ({e}); download it yourself and put {where}.") from None
