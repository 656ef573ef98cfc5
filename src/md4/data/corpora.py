"""`load_corpus(name_or_path)`: a named corpus from the registry, or any text file."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from md4.data.corpus import Corpus, load_text_file
from md4.data.images import ImageCorpus, is_image_corpus, load_images
from md4.data.records import SOURCES as RECORD_SOURCES
from md4.data.records import is_records, load_named, load_records
from md4.data.shakespeare import load_shakespeare
from md4.data.tables import is_table, load_table
from md4.data.text8 import FILE_NAMES as TEXT8_FILE_NAMES
from md4.data.text8 import load_text8
from md4.data.tokens import is_prepared, load_prepared
from md4.errors import UserError

# name -> loader(*, min_length) -> Corpus
CORPORA: dict[str, Callable[..., Corpus]] = {
    "text8": load_text8,
    "shakespeare": load_shakespeare,
    # record sources (md4.data.records), prepared into the cache on first use for the model length
    **{name: partial(load_named, name) for name in RECORD_SOURCES},
}


def load_corpus(name_or_path: str, *, min_length: int = 2) -> Corpus | ImageCorpus:
    """A registered corpus by name, else a folder prepared by `md4 data prepare` (GPT-2 BPE token
    shards, memory-mapped), else a file: `text8` / `text8.zip` are read as text8 (raw,
    standard split), any other file as UTF-8 text normalized text8-style and split 90/5/5.
    Every split has at least min_length characters (pass the sequence length + 1).
    Image datasets (md4.data.images: fashion-mnist, mnist, cifar10, ..., `NAME:SIZE`) give an
    ImageCorpus: splits of 2-D token rows, one image per row, with labels."""
    if is_image_corpus(name_or_path):
        return load_images(name_or_path, min_length=min_length)
    if name_or_path in CORPORA:
        return CORPORA[name_or_path](min_length=min_length)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise UserError(
            f"Unknown corpus {name_or_path!r}: it is neither one of {', '.join(CORPORA)} nor an existing file."
        )
    if is_records(path):  # a folder written by `md4 data prepare --records`
        return load_records(path, min_length=min_length)
    if is_table(path):  # a folder written by `md4 data prepare --table`
        return load_table(path, min_length=min_length)
    if is_prepared(path):  # a folder written by `md4 data prepare`
        return load_prepared(path, min_length=min_length)
    if path.name in TEXT8_FILE_NAMES:
        return load_text8(path, min_length=min_length)
    return load_text_file(path, min_length=min_length)
