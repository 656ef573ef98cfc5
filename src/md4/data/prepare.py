"""`md4 data prepare`: a text corpus -> GPT-2 BPE token shards on disk (see md4.data.tokens).

    prepare(["plays.txt"], "data/shakespeare-gpt2")                  # text files or folders of them
    prepare(["owt.jsonl"], "data/owt", text_field="text")            # JSON lines, one document each
    prepare([], "data/owt", hf="Skylion007/openwebtext")             # a Hugging Face dataset (streamed)

Documents: a text file is one document, a JSONL line is one (its `text_field`), a dataset
record is one. Long documents are cut at line ends into pieces of about `piece_chars`
characters; a piece is the unit of parallel work and of the held-out split. Piece i goes to
valid when frac((i + 1) phi) < valid, to test when it lies in [valid, valid + test), else to
train (phi = the golden ratio: a deterministic, evenly spread choice with the asked-for fractions).
Each split is the concatenation of its pieces' tokens with `<|endoftext|>` after every
document's end, and wherever the next piece of the same document went to another split.
With `valid_docs` = D instead, the last D documents are the validation split and all others
train: MDLM's OpenWebText split (`train[-100000:]` of Skylion007/openwebtext), which HF_RECIPES
makes the default for that dataset.

Sequences, as the papers pack OpenWebText (MD4's prepare_openwebtext_data.py, SEDD's data.py):
the documents, each followed by `<|endoftext|>`, form one stream that is cut into sequences of
the model's length across document boundaries, with no BOS. Training here reads windows of
length N at random offsets of the train stream, evaluation its consecutive non-overlapping
N-token chunks (md4.data.eval_chunks). (MDLM's `wrap` mode instead puts <|endoftext|> as BOS
and EOS around 1022-token chunks.)

Pieces are tokenised in parallel processes (ordered results, so the output does not depend on
the number of processes) and written by this process, so a split's shards hold its tokens in
order. Shards are written under temporary names and renamed when complete; meta.json is
written last, so a folder with meta.json is a complete corpus. After an error (bad input, a
full disk, Ctrl-C) no shard of this call is left, nor the --out folder if this call made it.
"""

from __future__ import annotations

import gzip
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from md4.checkpoint import first_missing, naming, write_text_atomic
from md4.data.bpe import BPE_TOKENIZERS
from md4.data.corpus import SPLITS
from md4.data.tokens import FORMAT, META
from md4.errors import UserError

PHI = (math.sqrt(5) - 1) / 2
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
DEFAULT_VALID = 0.005
# Hugging Face datasets whose held-out split a paper fixes: prepare() defaults when neither
# valid nor valid_docs is given. OpenWebText: its last 100,000 documents (MDLM's validation set).
HF_RECIPES = {"Skylion007/openwebtext": {"valid_docs": 100_000}}


@dataclass
class Piece:
    index: int
    text: str
    split: str
    eot: bool  # end the piece with <|endoftext|>


# ----------------------------------------------------------------------------- reading documents
def input_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and every non-hidden file under the folders named, in sorted order."""
    files = []
    for p in map(lambda q: Path(q).expanduser(), paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"Input {p} does not exist.")
    if not files:
        raise UserError("No input files: name text or JSONL files, folders of them, or --hf DATASET.")
    return files


def _open_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace")


def json_text(line: str, n: int, path: Path, field: str, option: str = "--text-field") -> str:
    """The string `field` of line n of a JSONL file; a UserError naming the line (and the option
    that names the field) when the line is no JSON object with that string."""
    try:
        record = json.loads(line)
    except ValueError:
        raise UserError(f"Line {n} of {path} is not valid JSON.") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise UserError(f"Line {n} of {path} has no string field {field!r} (set {option}).")
    return record[field]


def jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield json_text(line, n, path, text_field)


def file_documents(files: list[Path], text_field: str) -> Iterator[str | Path]:
    """Documents: a JSONL record's text, or a text file's path (read in pieces later)."""
    for f in files:
        if f.name.endswith(JSONL_SUFFIXES):
            yield from jsonl_documents(f, text_field)
        else:
            yield f


def hf_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    """Records of a Hugging Face dataset, streamed (NAME or NAME:CONFIG)."""
    try:
        import datasets
    except ImportError:
        raise UserError("--hf needs the `datasets` package (pip install datasets) and internet access.") from None
    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split=split, streaming=True)
        for record in ds:
            if not isinstance(record.get(text_field), str):
                raise UserError(f"Dataset {name} has no string field {text_field!r} (set --text-field).")
            yield record[text_field]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Could not load the Hugging Face dataset {name!r} ({type(e).__name__}: {e}).") from None


def split_text(text: str, piece_chars: int) -> Iterator[str]:
    """text cut after line ends into pieces of about piece_chars (a line longer than that is cut)."""
    start = 0
    while len(text) - start > piece_chars:
        cut = text.rfind("\n", start, start + piece_chars) + 1
        cut = cut if cut > start else start + piece_chars
        yield text[start:cut]
        start = cut
    yield text[start:]


def read_pieces(path: Path, piece_chars: int) -> Iterator[str]:
    """A text file in pieces of about piece_chars, cut after line ends, without reading it whole."""
    buf, size = [], 0
    with _open_text(path) as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= piece_chars:
                yield from split_text("".join(buf), piece_chars)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def document_pieces(docs: Iterable[str | Path], piece_chars: int) -> Iterator[tuple[str, bool]]:
    """(text, last piece of its document) for every piece of every document."""
    for doc in docs:
        parts = read_pieces(doc, piece_chars) if isinstance(doc, Path) else split_text(doc, piece_chars)
        prev = None
        for part in parts:
            if prev is not None:
                yield prev, False
            prev = part
        if prev is not None:
            yield prev, True


def split_of(i: int, valid: float, test: float) -> str:
    u = ((i + 1) * PHI) % 1.0
    return "valid" if u < valid else "test" if u < valid + test else "train"


def assign(pieces: Iterable[tuple[str, bool]], valid: float, test: float) -> Iterator[Piece]:
    """Number the pieces, give each its split and decide where <|endoftext|> goes."""
    prev = None
    for i, (text, doc_end) in enumerate(pieces):
        split = split_of(i, valid, test)
        if prev is not None:
            ptext, pend, psplit = prev
            yield Piece(i - 1, ptext, psplit, pend or psplit != split)
        prev = (text, doc_end, split)
    if prev is not None:
        yield Piece(i, prev[0], prev[2], True)


# ----------------------------------------------------------------------------- tokenising
_TOKENIZER = None


def _init_worker(name: str) -> None:
    global _TOKENIZER
    _TOKENIZER = BPE_TOKENIZERS[name]()


def encode_piece(piece: Piece) -> tuple[str, np.ndarray, int, bool]:
    """(split, uint16 ids with <|endoftext|> appended when piece.eot, characters, eot)."""
    ids = _TOKENIZER.encode(piece.text)
    if piece.eot:
        ids = np.append(ids, np.uint16(_TOKENIZER.eot_id))
    return piece.split, ids, len(piece.text), piece.eot


class ShardWriter:
    """Appends tokens to `{split}_{k:06d}.bin`, starting a new shard every shard_tokens tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.documents = 0
        self.tokens = 0  # written so far

    def _tmp(self, k: int) -> Path:
        return self.folder / f".{self.split}_{k:06d}.bin.tmp"

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype("<u2", copy=False)
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close_file()
                self.shards.append({"file": f"{self.split}_{len(self.shards):06d}.bin", "tokens": 0})
                self.file = open(self._tmp(len(self.shards) - 1), "wb")
            room = self.shard_tokens - self.shards[-1]["tokens"]
            with naming(self.file.name):
                ids[:room].tofile(self.file)
            self.shards[-1]["tokens"] += len(ids[:room])
            self.tokens += len(ids[:room])
            ids = ids[room:]

    def close_file(self) -> None:
        if self.file is not None:
            with naming(self.file.name):
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def take_tail(self, start: int, block: int = 1 << 24) -> Iterator[np.ndarray]:
        """This writer's tokens from stream position `start` on, in blocks of at most `block`,
        removed from its shards as they are read (the shards after `start` are deleted)."""
        self.close_file()
        end = 0
        for k, s in enumerate(self.shards):
            lo, end = end, end + s["tokens"]
            if end <= start:
                continue
            cut = max(start - lo, 0)
            data = np.memmap(self._tmp(k), dtype="<u2", mode="r", shape=(s["tokens"],))
            for i in range(cut, s["tokens"], block):
                yield np.array(data[i:i + block])
            del data
            if cut:
                os.truncate(self._tmp(k), 2 * cut)
            else:
                self._tmp(k).unlink()
            s["tokens"] = cut
        self.shards = [s for s in self.shards if s["tokens"]]  # those emptied were the last ones
        self.tokens = min(self.tokens, start)

    def discard(self) -> None:
        """Remove this writer's shards, temporary or renamed (after an error)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for k, s in enumerate(self.shards):
            self._tmp(k).unlink(missing_ok=True)
            (self.folder / s["file"]).unlink(missing_ok=True)

    def finish(self) -> dict:
        self.close_file()
        for k, s in enumerate(self.shards):
            os.replace(self._tmp(k), self.folder / s["file"])
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}


def held_out(hf: str | None, valid: float | None, valid_docs: int | None, test: float) -> tuple[float, int]:
    """(valid fraction, valid documents): those given, else the dataset's recipe, else DEFAULT_VALID."""
    if valid is not None and valid_docs:
        raise UserError("Give --valid (a fraction of pieces) or --valid-docs (the last documents), not both.")
    if valid is None and valid_docs is None:
        valid_docs = HF_RECIPES.get(hf or "", {}).get("valid_docs", 0)
    if valid_docs and test:
        raise UserError("With --valid-docs (the last documents as validation) there is no --test fraction; "
                        "leave --test at 0.")
    if (valid_docs or 0) < 0:
        raise UserError(f"--valid-docs must be at least 0, got {valid_docs}.")
    return (0.0 if valid_docs else DEFAULT_VALID if valid is None else valid), valid_docs or 0


def last_documents_to_valid(train: ShardWriter, valid: ShardWriter, ends: deque, n: int) -> None:
    """Move the last n documents of the train stream to valid; `ends` holds the train token
    counts at the ends of the last n + 1 documents."""
    if len(ends) <= n:
        raise UserError(f"The input holds {train.documents:,} documents, not more than the {n:,} asked for "
                        f"validation (--valid-docs); give a smaller --valid-docs.")
    for block in train.take_tail(ends[0]):
        valid.write(block)
    train.documents -= n
    valid.documents += n


def prepare(inputs: list[str | Path], out: str | Path, *, hf: str | None = None, hf_split: str = "train",
            text_field: str = "text", valid: float | None = None, test: float = 0.0, tokenizer: str = "gpt2",
            workers: int = 0, piece_chars: int = 1 << 16, shard_tokens: int = 1 << 28,
            max_documents: int = 0, valid_docs: int | None = None, progress: bool = True) -> dict:
    """Tokenise `inputs` (or the dataset `hf`) into the folder `out`; returns the metadata written.
    valid: the fraction of pieces held out (default DEFAULT_VALID); valid_docs: the last documents
    held out instead (default: HF_RECIPES for the dataset, else none).
    workers: processes (0 = all CPUs, 1 = this process only)."""
    out = Path(out).expanduser()
    valid, valid_docs = held_out(hf, valid, valid_docs, test)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is an existing file, not a folder; choose another --out.")
    if (out / META).exists():
        raise UserError(f"{out} already holds a prepared corpus; choose another --out or delete it.")
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise UserError(f"--valid and --test must be fractions with a sum below 1, got {valid} and {test}.")
    if tokenizer not in BPE_TOKENIZERS:
        raise UserError(f"Unknown tokenizer {tokenizer!r}; choose one of {', '.join(BPE_TOKENIZERS)}.")
    if piece_chars < 1 or shard_tokens < 1 or workers < 0 or max_documents < 0:
        raise UserError("piece size and shard size must be at least 1; workers and max documents at least 0.")
    if hf and inputs:
        raise UserError("Give input files or --hf DATASET, not both.")
    tok = BPE_TOKENIZERS[tokenizer]()  # fails early (no tiktoken, no merges) before any work
    docs = hf_documents(hf, hf_split, text_field) if hf else file_documents(input_files(inputs), text_field)
    if max_documents:
        docs = (d for _, d in zip(range(max_documents), docs))
    made = first_missing(out)  # removed after an error
    out.mkdir(parents=True, exist_ok=True)
    writers = {s: ShardWriter(out, s, shard_tokens) for s in SPLITS}
    try:
        pieces = assign(document_pieces(docs, piece_chars), valid, test)
        workers = workers or os.cpu_count() or 1
        t0, chars = time.time(), 0
        ends = deque(maxlen=valid_docs + 1)  # train tokens at the ends of the last documents
        bar = tqdm(desc="tokenizing", unit="char", unit_scale=True, disable=not progress, dynamic_ncols=True)
        pool = None
        try:
            if workers > 1:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer,))
                results = pool.imap(encode_piece, pieces, chunksize=4)
            else:
                _init_worker(tokenizer)
                results = map(encode_piece, pieces)
            first = next(results, None)
            if first is None:
                raise UserError("The input holds no documents.")
            for split, ids, n_chars, eot in chain([first], results):
                writers[split].write(ids)
                writers[split].documents += eot
                if eot and valid_docs:
                    ends.append(writers[split].tokens)
                chars += n_chars
                bar.update(n_chars)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        if valid_docs:
            last_documents_to_valid(writers["train"], writers["valid"], ends, valid_docs)
        splits = {s: w.finish() for s, w in writers.items()}
        meta = {"format": FORMAT, "version": 1, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id, "dtype": "uint16", "fractions": {"valid": valid, "test": test},
                "valid_docs": valid_docs,
                "source": {"hf": hf, "split": hf_split} if hf else [str(p) for p in inputs],
                "characters": chars, "seconds": round(time.time() - t0, 3), "splits": splits}
        write_text_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    except BaseException:
        for w in writers.values():
            w.discard()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    for split, fraction in (("valid", valid), ("test", test)):
        if fraction > 0 and not splits[split]["tokens"]:
            print(f"warning: no piece landed in the {split} split; use a larger --{split} or a smaller --piece-chars",
                  file=sys.stderr)
    return meta
