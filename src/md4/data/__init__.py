"""Data: the text8 character vocabulary, corpora (text8, shakespeare, any text file), image datasets, batching."""

from md4.data.batches import (check_labels, draw_batch, eval_chunks, random_crops, random_offsets, random_rows,
                              split_labels)
from md4.data.chars import CharTokenizer, normalize_text8
from md4.data.corpora import CORPORA, load_corpus
from md4.data.corpus import Corpus, load_text_file, split_corpus
from md4.data.images import IMAGE_DATASETS, ImageCorpus, ImageTokenizer, load_images
from md4.data.shakespeare import load_shakespeare
from md4.data.text8 import load_text8

__all__ = [
    "CORPORA",
    "CharTokenizer",
    "Corpus",
    "check_labels",
    "IMAGE_DATASETS",
    "ImageCorpus",
    "ImageTokenizer",
    "draw_batch",
    "eval_chunks",
    "load_corpus",
    "load_images",
    "load_shakespeare",
    "load_text8",
    "load_text_file",
    "normalize_text8",
    "random_crops",
    "random_offsets",
    "random_rows",
    "split_corpus",
    "split_labels",
]
