"""Characters in the text8 convention: 27 symbols, id 0 = space, ids 1..26 = a..z.

The masked diffusion models add one absorbing state, the mask, with id 27 == vocab_size;
`decode` renders it as "_" so partially masked sequences can be read.
Everything here works on whole byte strings with `bytes.translate` and numpy, never a Python
loop per character: text8 is 100M characters.
"""

from __future__ import annotations

import string

import numpy as np
import torch

from md4.errors import UserError

ALPHABET = " " + string.ascii_lowercase  # id i <-> ALPHABET[i]
MASK_CHAR = "_"
_INVALID = 255


def _byte_table(mapping: dict[int, int], default: int) -> bytes:
    table = bytearray([default]) * 256
    for src, dst in mapping.items():
        table[src] = dst
    return bytes(table)


# ASCII letters -> lowercase letter, every other byte -> space.
_NORMALIZE = _byte_table({ord(c): ord(c.lower()) for c in string.ascii_letters}, ord(" "))
# Character byte -> id; "_" -> mask id; anything else -> _INVALID.
_ENCODE = _byte_table({ord(c): i for i, c in enumerate(ALPHABET + MASK_CHAR)}, _INVALID)
_DECODE = np.frombuffer((ALPHABET + MASK_CHAR).encode("ascii"), dtype=np.uint8)


def normalize_bytes(raw: bytes) -> bytes:
    """text8 normalization of raw bytes; any non-ASCII byte (so any UTF-8 multi-byte
    character, or an invalid one) becomes a space, exactly as if decoded with errors="replace"."""
    a = np.frombuffer(raw.translate(_NORMALIZE), dtype=np.uint8)
    space = a == ord(" ")
    # Keep a letter always, a space only if it follows a letter: collapses runs, drops leading spaces.
    keep = ~space
    keep[1:] |= ~space[:-1]
    out = a[keep]
    if out.size and out[-1] == ord(" "):
        out = out[:-1]
    return out.tobytes()


def normalize_text8(text: str) -> str:
    """Lowercase, every character other than a-z becomes a space, runs of spaces collapse to
    one, ends stripped: "Hello, World!  It's 3pm" -> "hello world it s pm"."""
    return normalize_bytes(text.encode("ascii", errors="replace")).decode("ascii")


class CharTokenizer:
    """27 symbols (space, a..z) with ids 0..26; the mask id is 27 == vocab_size."""

    name = "char"
    ARGS: dict = {}  # constructor arguments a model's config.json may give (none)
    length = None  # sequences of any length
    vocab_size = len(ALPHABET)
    mask_id = len(ALPHABET)
    alphabet = ALPHABET

    def args(self) -> dict:
        return {}

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text made only of " a-z" (and "_" for a masked position) -> [len(text)] uint8 ids.
        Normalize arbitrary text with `normalize_text8` first."""
        raw = text.encode("ascii", errors="replace") if isinstance(text, str) else bytes(text)
        ids = bytearray(raw).translate(_ENCODE)  # bytearray, so the numpy view is writable
        bad = ids.find(_INVALID)
        if bad >= 0:
            char = text[bad] if isinstance(text, str) else chr(raw[bad]) if raw[bad] < 128 else "non-ASCII"
            raise UserError(
                f"Text has a character outside a-z and space ({char!r} at position {bad}); "
                "normalize it with md4.data.normalize_text8 first."
            )
        return np.frombuffer(ids, dtype=np.uint8)

    def decode(self, ids) -> str:
        """1-D ids (list, numpy array or tensor) -> text; the mask id shows as "_"."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > self.mask_id):
            raise ValueError(f"ids must lie in [0, {self.mask_id}], got [{ids.min()}, {ids.max()}]")
        return _DECODE[ids.astype(np.intp)].tobytes().decode("ascii")

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id})"
