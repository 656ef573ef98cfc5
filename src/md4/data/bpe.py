"""The GPT-2 byte-pair encoding (50,257 tokens, `<|endoftext|>` = 50256) through `tiktoken`.

The merges are read from a local `gpt2.tiktoken` file when one is found (no network needed):
$MD4_GPT2_TIKTOKEN, then `tokenizers/gpt2.tiktoken` in $MD4_DATA, ~/.cache/md4 and ../shared/data
(relative to the current folder or to the repository root). Without a file, tiktoken's own
`gpt2` encoding is used, which downloads the merges once (internet needed).

The diffusion models add one absorbing state, the mask, with id 50257 == vocab_size; `decode`
renders it as "▒" so that partially masked sequences can be read.
"""

from __future__ import annotations

import base64
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from md4.data.corpus import data_dirs
from md4.errors import UserError

EOT_ID = 50256
VOCAB_SIZE = 50257
MASK_TEXT = "▒"
FILE = Path("tokenizers") / "gpt2.tiktoken"
# The GPT-2 pre-tokenisation pattern as tiktoken writes it (equivalent to the original release's).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def tiktoken_file_candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[3]  # src/md4/data/bpe.py -> repository
    found = [Path(os.environ["MD4_GPT2_TIKTOKEN"]).expanduser()] if os.environ.get("MD4_GPT2_TIKTOKEN") else []
    dirs = data_dirs() + [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]
    return found + [d / FILE for d in dirs]


def find_tiktoken_file() -> Path | None:
    return next((p for p in tiktoken_file_candidates() if p.is_file()), None)


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `<base64 token bytes> <rank>` per line -> {token bytes: rank}."""
    ranks = {}
    try:
        for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except OSError as e:
        raise UserError(f"Cannot read the GPT-2 merges file {path}: {e.strerror or e}.") from None
    except ValueError:
        raise UserError(f"{path} is not a tiktoken BPE file (line {n} is not `<base64> <rank>`).") from None
    if len(ranks) != EOT_ID or set(ranks.values()) != set(range(EOT_ID)):
        raise UserError(f"{path} does not hold the GPT-2 merges: expected ranks 0..{EOT_ID - 1}, got {len(ranks):,}.")
    return ranks


@lru_cache(maxsize=4)
def gpt2_encoding(path: str | None = None):
    """The tiktoken Encoding for GPT-2: from `path`, else a local file (see the module docstring),
    else tiktoken's download."""
    try:
        import tiktoken
    except ImportError:
        raise UserError("The GPT-2 tokenizer needs tiktoken: pip install tiktoken (or md4[bpe]).") from None
    path = Path(path) if path else find_tiktoken_file()
    if path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError(f"The GPT-2 merges could not be downloaded ({type(e).__name__}); put gpt2.tiktoken in "
                            f"{data_dirs()[-1] / 'tokenizers'} or set MD4_GPT2_TIKTOKEN to its path.") from None
    return tiktoken.Encoding(name="gpt2", pat_str=PATTERN, mergeable_ranks=read_ranks(path),
                             special_tokens={"<|endoftext|>": EOT_ID})


class GPT2Tokenizer:
    """GPT-2 BPE: text <-> ids in [0, 50257); id 50256 is `<|endoftext|>`, 50257 the mask."""

    name = "gpt2"
    ARGS: dict = {}  # constructor arguments a model's config.json may give (none: not a file path)
    length = None  # sequences of any length
    vocab_size = VOCAB_SIZE
    mask_id = VOCAB_SIZE
    eot_id = EOT_ID

    def __init__(self, path: str | Path | None = None):
        self.encoding = gpt2_encoding(str(path) if path else None)

    def args(self) -> dict:
        return {}

    def encode(self, text: str) -> np.ndarray:
        """1-D uint16 ids; a literal "<|endoftext|>" in the text is encoded as ordinary text."""
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.uint16)

    def decode(self, ids) -> str:
        """Text of a 1-D sequence of ids; the mask id shows as "▒"."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().tolist()
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if any(i < 0 or i > self.mask_id for i in ids):
            raise ValueError(f"ids must lie in [0, {self.mask_id}]")
        out, run = [], []
        for i in ids + [self.mask_id]:
            if i == self.mask_id:
                out.append(self.encoding.decode(run, errors="replace"))
                out.append(MASK_TEXT)
                run = []
            else:
                run.append(i)
        return "".join(out)[: -len(MASK_TEXT)]

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id})"


# Tokenizers by name, for prepared corpora (`md4 data prepare --tokenizer`).
BPE_TOKENIZERS = {"gpt2": GPT2Tokenizer}
