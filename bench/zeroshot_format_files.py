"""Stand-ins for the five zero-shot test files, in their real formats, made from held-out text of a
prepared GPT-2 BPE corpus (`md4 data prepare`), for walking `md4 eval RUN --data NAME` where the
real sets cannot be had (no internet, no package ships them).

The numbers they give are format-path checks, not the paper's sets: the text is the corpus's own
held-out split (for the plays, Shakespeare), only dressed as each set's file:

- lambada_test.jsonl: {"text": passage} per line, passages of whole sentences, ~70 words, plain text;
- wikitext-2-raw/wiki.test.raw and wikitext-103-raw/wiki.test.raw (the real two share their test
  articles, so the two files are the same): " = Title = " / " = = Section = = " headings, blank
  lines " ", paragraphs on one line, tokens space-separated (" , " " . " " 's" " n't"), hyphens
  between letters as " @-@ ", every line starting with a space and ending with " \\n";
- ptb.test.txt (Mikolov's): one sentence per line, lower case, no punctuation, numbers "N", words
  outside the 10,000 most frequent training words "<unk>", " words \\n";
- One Billion Words' held-out shard 00000 (folder layout of the release): one tokenized sentence
  per line, case kept, sentences shuffled (seed 0).

    python bench/zeroshot_format_files.py PREPARED_DIR OUT_DIR [--split test]
    MD4_DATA=OUT_DIR md4 eval RUN --data ptb
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np

from md4.data.bpe import EOT_ID, gpt2_encoding
from md4.data.zeroshot import LM1B_DIR

WORDS = re.compile(r"n't|'s|'ll|'re|'ve|'d|'m|\w+(?:-\w+)*|[^\w\s]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z])")


def split_documents(prepared: Path, split: str) -> list[str]:
    """The split's documents (pieces between <|endoftext|>) as text."""
    meta = json.loads((prepared / "meta.json").read_text())
    ids = np.concatenate([np.fromfile(prepared / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])
    cuts = np.flatnonzero(ids == EOT_ID)
    parts = np.split(ids, cuts)
    enc = gpt2_encoding()
    return [t for t in (enc.decode([int(i) for i in p if i != EOT_ID]) for p in parts) if t.strip()]


def paragraphs(doc: str) -> list[str]:
    """Blank-line separated blocks, hard line breaks joined by spaces."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", doc) if block.strip()]


def sentences(paragraph: str) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph) if s.strip()]


def tokens(text: str) -> list[str]:
    """Space-separated tokens the way the corpora write them: clitics ("n't", "'s") and punctuation
    split off ("don't" -> "do n't")."""
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    return WORDS.findall(text)


def wikitext(docs: list[str]) -> str:
    lines = []
    for n, doc in enumerate(docs):
        lines += [" ", f" = Held-out text {n + 1} = ", " "]
        for para in paragraphs(doc):
            words = " ".join(tokens(para)).replace("-", " @-@ ")
            if re.match(r"(ACT|SCENE) ", para):
                lines += [f" = = {words} = = ", " "]
            else:
                lines += [f" {words} ", " "]
    return "\n".join(lines) + "\n"


def ptb(sents: list[str], vocab: set[str]) -> str:
    out = []
    for s in sents:
        words = [w.lower() for w in tokens(s) if re.match(r"\w|'", w)]
        words = ["N" if re.fullmatch(r"\d[\d,.]*", w) else w if w in vocab else "<unk>" for w in words]
        if words:
            out.append(" " + " ".join(words) + " ")
    return "\n".join(out) + "\n"


def lm1b(sents: list[str]) -> str:
    lines = [" ".join(tokens(s)) for s in sents]
    random.Random(0).shuffle(lines)
    return "\n".join(lines) + "\n"


def lambada(sents: list[str], words_per_passage: int = 70) -> str:
    out, passage = [], []
    for s in sents:
        passage.append(s)
        if sum(len(p.split()) for p in passage) >= words_per_passage:
            out.append(json.dumps({"text": " ".join(passage)}))
            passage = []
    return "\n".join(out) + "\n"


def ptb_vocab(prepared: Path, size: int = 10_000) -> set[str]:
    """The `size` most frequent lower-cased words of the training split (PTB's 10k vocabulary)."""
    counts = Counter(w.lower() for doc in split_documents(prepared, "train") for w in tokens(doc) if re.match(r"\w", w))
    return {w for w, _ in counts.most_common(size)}


def write_all(prepared: Path, out: Path, split: str = "test") -> dict[str, Path]:
    docs = split_documents(prepared, split)
    sents = [s for doc in docs for para in paragraphs(doc) for s in sentences(para)]
    files = {
        "lambada": (out / "lambada_test.jsonl", lambada(sents)),
        "wikitext2": (out / "wikitext-2-raw" / "wiki.test.raw", wikitext(docs)),
        "wikitext103": (out / "wikitext-103-raw" / "wiki.test.raw", wikitext(docs)),
        "ptb": (out / "ptb.test.txt", ptb(sents, ptb_vocab(prepared))),
        "lm1b": (out / LM1B_DIR / "news.en.heldout-00000-of-00050", lm1b(sents)),
    }
    for path, text in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return {name: path for name, (path, _) in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prepared", type=Path, help="a folder made by md4 data prepare (GPT-2 BPE)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    for name, path in write_all(args.prepared, args.out, args.split).items():
        print(f"{name:12s} {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
