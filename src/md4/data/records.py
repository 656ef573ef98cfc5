"""Records: one variable-length sequence per line of a file (SMILES, peptides, names, ...).

    md4 data prepare mols.smi --records --out data/mols        # characters, 1% valid, 1% test
    md4 train --config tiny --out runs/mols --set data.corpus=data/mols --set data.length=64

Readers by file suffix (`.gz` allowed): .txt (each line), .smi (a line's first field),
.fasta/.fa/.faa (the sequence after each `>` header, lines joined), .jsonl (a string field,
--field), .csv/.tsv (one column, --field; without --field a .csv is a table: md4.data.tables).

Symbols are characters (default) or whitespace-separated words; the vocabulary is built from
the data: ids 0 = PAD, 1 = EOS, 2.. = the symbols in sorted order; the mask is id V.
A record r of length L becomes a row of the model length N:

    x = r_1 .. r_L  EOS  PAD .. PAD        (needs L + 1 <= N)

What is modeled: every position of x, the padding included. PAD is a deterministic function of
the EOS position, so -log p(x) = -log p(r) and the NELBO bounds the record's negative
log-likelihood *with its length*: a sample's length is drawn by the model. Per token, the bits
count the L + 1 real tokens (symbols and EOS), not the padding (md4.evaluate.record_summary).
Decoding cuts at the first EOS or PAD. An empty record is an error; records longer than N - 1
symbols are an error when the corpus is loaded for a model of length N, unless they were dropped
at preparation (--max-length, with the count printed and kept in meta.json).

The prepared folder: meta.json (format "md4-records", symbols, splits) and per split
`{split}_ids.npy` (all records' ids, concatenated) and `{split}_lengths.npy` (int32), plain
.npy files (no pickle). Records are assigned to splits by the golden-ratio rule of `md4 data
prepare` unless the source comes split (MOSES: its own test set, valid taken from train).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from md4.data.corpus import SPLITS, Splits, cache_dir
from md4.errors import UserError

FORMAT = "md4-records"
META = "meta.json"
PAD, EOS = 0, 1
SPECIALS = ("<pad>", "<eos>")
MASK_CHARS = ("_", "▒")  # how a masked position is written in infilling patterns and shown in decodes
JOINERS = {"chars": "", "words": " "}  # --symbols: how a record splits into symbols, and how they are joined back


# ----------------------------------------------------------------------------- the tokenizer
class RecordTokenizer:
    """Records <-> ids: 0 = PAD, 1 = EOS, 2 + k = symbols[k]; mask id = vocab_size.

    length: the model length N once known (set by the corpus loader, saved in config.json; None
    before), so that an infilling pattern can be laid out as a whole row: every row has N tokens."""

    name = "records"
    # constructor arguments a model's config.json gives (md4.pretrained.read_model_config):
    # a type, or the range of a whole number
    ARGS = {"symbols": list, "sep": str, "length": (1, 1 << 24)}

    def __init__(self, symbols: list[str], sep: str = "", length: int | None = None):
        self.symbols, self.sep, self.length = list(symbols), str(sep), int(length) if length else None
        if (len(set(self.symbols)) != len(self.symbols)
                or not all(isinstance(s, str) and s for s in self.symbols)):
            raise UserError("A record vocabulary must list distinct, non-empty symbols.")
        self.ids = {s: i + len(SPECIALS) for i, s in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols) + len(SPECIALS)
        self.mask_id = self.vocab_size
        self.mask_char = next((c for c in MASK_CHARS if c not in self.ids), "?")

    def args(self) -> dict:
        """What config.json stores to rebuild this tokenizer (md4.pretrained.load)."""
        return {"symbols": self.symbols, "sep": self.sep, "length": self.length}

    def split(self, record: str) -> list[str]:
        return record.split() if self.sep else list(record)

    def encode(self, record: str) -> np.ndarray:
        """One record -> [L] int64 symbol ids (no EOS); `mask_char` ("_") is a position to fill
        (the mask id). A symbol outside the vocabulary is a UserError."""
        out = []
        for k, s in enumerate(self.split(record)):
            if s == self.mask_char:
                out.append(self.mask_id)
            elif s in self.ids:
                out.append(self.ids[s])
            else:
                shown = ", ".join(self.symbols[:40]) + (" ..." if len(self.symbols) > 40 else "")
                raise UserError(f"Symbol {s!r} (position {k}) is not in this vocabulary ({shown}).")
        return np.asarray(out, dtype=np.int64)

    def encode_many(self, records: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): all records' ids concatenated ([sum L] uint8 or uint16) and [M] int32.
        Characters are looked up in one vectorized pass over the code points."""
        dtype = np.uint8 if self.vocab_size < 256 else np.uint16
        if self.sep:
            lengths = np.fromiter((len(r.split()) for r in records), dtype=np.int32, count=len(records))
            ids = [self.ids.get(s, -1) for r in records for s in r.split()]
            ids = np.asarray(ids, dtype=np.int64)
            symbols = [s for r in records for s in r.split()]
        else:
            lengths = np.fromiter(map(len, records), dtype=np.int32, count=len(records))
            text = "".join(records)
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            table = np.full(max([ord(s) for s in self.symbols] + [int(points.max(initial=0))]) + 1, -1, np.int64)
            table[[ord(s) for s in self.symbols]] = np.arange(len(self.symbols)) + len(SPECIALS)
            ids = table[points]
            symbols = text
        bad = np.flatnonzero(ids < 0)
        if len(bad):
            raise UserError(f"Symbol {symbols[bad[0]]!r} is not in the vocabulary of these records.")
        return ids.astype(dtype), lengths

    def decode(self, ids) -> str:
        """One row of ids -> the record: symbols up to the first EOS or PAD; masks show as `mask_char`."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().tolist()
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in (PAD, EOS):
                break
            if not 0 <= i <= self.mask_id:
                raise ValueError(f"ids must lie in [0, {self.mask_id}], got {i}")
            out.append(self.mask_char if i == self.mask_id else self.symbols[i - len(SPECIALS)])
        return self.sep.join(out)

    def rows(self, ids: np.ndarray, lengths: np.ndarray, length: int) -> np.ndarray:
        """[M, N] rows: each record, then EOS, then PAD (needs every L + 1 <= N)."""
        m = len(lengths)
        out = np.full((m, length), PAD, dtype=ids.dtype)
        out[np.arange(length) < lengths[:, None]] = ids  # row-major order = the records' order
        out[np.arange(m), lengths] = EOS
        return out

    def condition(self, text: str, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(known [N], known_mask [N]) for an infilling pattern or a prompt; `mask_char` = one symbol to fill.
        length None: the record is exactly the pattern (its EOS and padding are known, so the
        length is fixed); length N: the pattern starts the record and the rest, its end
        included, is generated."""
        ids = torch.as_tensor(self.encode(text))
        closed = length is None
        n = int(length or self.length or 0)
        if n < 1:
            raise UserError("This record model does not know its length; pass --length.")
        if len(ids) + closed > n:
            raise UserError(f"The pattern has {len(ids)} symbols; a record of this model holds at most {n - 1}.")
        known = torch.full((n,), PAD, dtype=torch.long)
        known_mask = torch.zeros(n, dtype=torch.bool)
        known[: len(ids)] = ids.clamp(max=self.mask_id - 1)
        known_mask[: len(ids)] = ids != self.mask_id
        if closed:
            known[len(ids)] = EOS
            known_mask[len(ids):] = True
        return known, known_mask

    structural = True  # md4.restrict: `allowed` reads the input's structure (non-causal networks only)

    def allowed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, V] bool: the values position n can hold given x [B, N] (mask id V = unknown).

        A row is s^L EOS PAD^(N-L-1) for some L in 0..N-1; what is unmasked bounds L to [lo, hi]
        (a symbol at i: L > i; EOS at i: L = i; PAD at i: L < i), and position n can be a symbol
        iff some allowed L > n, EOS iff lo <= n <= hi, PAD iff some allowed L < n (md4.restrict)."""
        n = x.shape[-1]
        idx = torch.arange(n, device=x.device)
        sym, eos, pad = (x >= len(SPECIALS)) & (x < self.mask_id), x == EOS, x == PAD
        zero, last = torch.zeros_like(x), torch.full_like(x, n - 1)
        lo = torch.maximum(torch.where(sym, idx + 1, zero), torch.where(eos, idx, zero)).amax(-1, keepdim=True)
        hi = torch.minimum(torch.where(eos, idx, last), torch.where(pad, idx - 1, last)).amin(-1, keepdim=True)
        out = torch.empty(*x.shape, self.vocab_size, dtype=torch.bool, device=x.device)
        out[..., PAD] = lo < idx
        out[..., EOS] = (lo <= idx) & (idx <= hi)
        out[..., len(SPECIALS):] = (hi > idx).unsqueeze(-1)
        return out

    def __repr__(self) -> str:
        return f"RecordTokenizer({len(self.symbols)} symbols, sep={self.sep!r}, length={self.length})"


def vocabulary(records: Iterable[str], symbols: str = "chars") -> list[str]:
    """The sorted distinct symbols of the records (characters, or whitespace-separated words)."""
    if symbols not in JOINERS:
        raise UserError(f"Unknown --symbols {symbols!r}; choose one of {', '.join(JOINERS)}.")
    if symbols == "words":
        return sorted({w for r in records for w in r.split()})
    return sorted(set("".join(records)))


# ----------------------------------------------------------------------------- reading files
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    from md4.data.prepare import _open_text

    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                yield n, line.rstrip("\r\n")
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None


def read_txt(path: Path, field: str | None = None) -> Iterator[tuple[int, str]]:
    return _lines(path)


def read_smi(path: Path, field: str | None = None) -> Iterator[tuple[int, str]]:
    """A SMILES file: the first whitespace-separated field of each line (a name may follow)."""
    for n, line in _lines(path):
        yield n, (line.split() or [""])[0]


def read_fasta(path: Path, field: str | None = None) -> Iterator[tuple[int, str]]:
    """The sequence of each `>` header, its lines joined, whitespace removed."""
    start, seq = None, []
    for n, line in _lines(path):
        if line.startswith(">"):
            if start is not None:
                yield start, "".join(seq)
            start, seq = n, []
        elif start is None and line.strip():
            raise UserError(f"Line {n} of {path} comes before any '>' header, so the file is not FASTA.")
        else:
            seq.append("".join(line.split()))
    if start is not None:
        yield start, "".join(seq)


def read_jsonl(path: Path, field: str | None = None) -> Iterator[tuple[int, str]]:
    from md4.data.prepare import json_text

    for n, line in _lines(path):
        yield n, json_text(line, n, path, field or "text", "--field") if line.strip() else ""


def read_column(path: Path, field: str | None = None) -> Iterator[tuple[int, str]]:
    """One column (--field) of a CSV / TSV file with a header line."""
    from md4.data.tables import read_csv

    header, rows = read_csv(path)
    if field is None:
        raise UserError(f"{path} is a table; name the column of records with --field (one of {', '.join(header)}).")
    if field not in header:
        raise UserError(f"{path} has no column {field!r}; its columns are {', '.join(header)}.")
    k = header.index(field)
    for n, row in rows:
        yield n, row[k]


READERS: dict[str, Callable[..., Iterator[tuple[int, str]]]] = {
    ".txt": read_txt, ".smi": read_smi, ".fasta": read_fasta, ".fa": read_fasta, ".faa": read_fasta,
    ".jsonl": read_jsonl, ".ndjson": read_jsonl, ".csv": read_column, ".tsv": read_column,
}


def reader_for(path: Path) -> Callable[..., Iterator[tuple[int, str]]]:
    suffix = "".join(Path(path.name.removesuffix(".gz")).suffixes[-1:]).lower()
    if suffix not in READERS:
        raise UserError(f"Cannot read records from {path.name}: use one of {', '.join(READERS)} (optionally .gz).")
    return READERS[suffix]


def read_records(path: str | Path, field: str | None = None) -> list[str]:
    """The records of one file; an empty record is a UserError naming its line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"File not found: {path}.")
    out = []
    for n, record in reader_for(path)(path, field):
        if not record.strip():
            raise UserError(f"Line {n} of {path} is an empty record; remove it (every record needs a symbol).")
        out.append(record)
    if not out:
        raise UserError(f"{path} holds no records.")
    return out


# ----------------------------------------------------------------------------- named sources
def read_moses() -> dict[str, list[str]]:
    from md4.data.moses import read_moses as read

    return read()


# name -> () -> {split: records}: sources that come with their own splits
SOURCES: dict[str, Callable[[], dict[str, list[str]]]] = {"moses": read_moses}


# ----------------------------------------------------------------------------- preparing
def assign_splits(records: list[str], valid: float, test: float) -> dict[str, list[str]]:
    """Record i goes to valid / test / train by `md4 data prepare`'s golden-ratio rule."""
    from md4.data.prepare import split_of

    out = {s: [] for s in SPLITS}
    for i, r in enumerate(records):
        out[split_of(i, valid, test)].append(r)
    return out


def prepare_records(inputs: list[str | Path], out: str | Path, *, field: str | None = None, symbols: str = "chars",
                    valid: float = 0.01, test: float = 0.01, max_length: int = 0) -> dict:
    """Read the records of `inputs` (files, or one name of SOURCES), build the vocabulary, and
    write the folder `out` (see the module docstring); returns the metadata written.
    max_length > 0 drops records of more symbols (counted); 0 keeps all."""
    from md4.checkpoint import write_text_atomic

    out = Path(out).expanduser()
    if (out / META).exists():
        raise UserError(f"{out} already holds a prepared corpus; choose another --out or delete it.")
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise UserError(f"--valid and --test must be fractions with a sum below 1, got {valid} and {test}.")
    if len(inputs) == 1 and str(inputs[0]) in SOURCES:
        given = SOURCES[str(inputs[0])]()
        splits = assign_splits(given["train"], valid, 0.0) if "valid" not in given else given
        splits["test"] = given.get("test", splits.get("test", []))
    else:
        if not inputs:
            raise UserError("Name the files of records to prepare (or a source: " + ", ".join(SOURCES) + ").")
        splits = assign_splits([r for p in inputs for r in read_records(p, field)], valid, test)
    tok = RecordTokenizer(vocabulary([r for s in SPLITS for r in splits[s]], symbols), JOINERS[symbols])
    meta = {"format": FORMAT, "version": 1, "symbols": tok.symbols, "sep": tok.sep, "specials": list(SPECIALS),
            "source": [str(p) for p in inputs], "field": field, "max_length": max_length, "splits": {}}
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        ids, lengths = tok.encode_many(splits[split])
        dropped = 0
        if max_length and len(lengths) and lengths.max() > max_length:
            keep = lengths <= max_length
            ids = ids[np.repeat(keep, lengths)]
            dropped, lengths = int((~keep).sum()), lengths[keep]
        np.save(out / f"{split}_ids.npy", ids, allow_pickle=False)
        np.save(out / f"{split}_lengths.npy", lengths, allow_pickle=False)
        meta["splits"][split] = {"records": int(len(lengths)), "symbols": int(lengths.sum()),
                                 "max_length": int(lengths.max(initial=0)), "dropped_too_long": dropped}
    all_lengths = np.concatenate([np.load(out / f"{s}_lengths.npy") for s in SPLITS])
    meta["length_quantiles"] = {q: int(np.quantile(all_lengths, float(q))) for q in ("0.5", "0.99", "0.999", "1")}
    write_text_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    return meta


# ----------------------------------------------------------------------------- loading
@dataclass(repr=False, eq=False)
class RecordCorpus(Splits):
    """Splits as rows [M, N] (record, EOS, PAD...); `records(split)` decodes them."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    tokenizer: RecordTokenizer
    name: str

    def records(self, which: str) -> list[str]:
        return [self.tokenizer.decode(row) for row in self.split(which)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.tokenizer}, {self.sizes()})"


def folder_format(path: str | Path) -> str | None:
    """The "format" of a prepared folder's meta.json (records, tables), or None."""
    meta = Path(path).expanduser() / META
    try:
        return json.loads(meta.read_text()).get("format") if meta.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def is_records(path: str | Path) -> bool:
    return folder_format(path) == FORMAT


def load_records(folder: str | Path, *, min_length: int = 2) -> RecordCorpus:
    """A prepared records folder as rows of the model length N = min_length (the CLI passes
    data.length). A record of N or more symbols is a UserError (it would lose its end)."""
    from md4.checkpoint import read_json
    from md4.validate import field, in_file, mapping

    folder = Path(folder).expanduser()
    path = folder / META
    meta = mapping(read_json(path), "the top level", path)
    tok = in_file(path, RecordTokenizer, field(meta, "symbols", list, path), field(meta, "sep", str, path, default=""),
                  length=min_length)
    splits = {}
    for split in SPLITS:
        try:
            ids = np.load(folder / f"{split}_ids.npy", allow_pickle=False)
            lengths = np.load(folder / f"{split}_lengths.npy", allow_pickle=False).astype(np.int64)
        except (OSError, ValueError) as e:
            raise UserError(f"The {split} split of {folder} is missing or damaged ({type(e).__name__}).") from None
        if (ids.ndim != 1 or lengths.ndim != 1 or ids.dtype.kind != "u" or (lengths < 1).any()
                or lengths.sum() != len(ids) or (len(ids) and not 2 <= ids.min() <= ids.max() < tok.vocab_size)):
            raise UserError(f"The {split} split of {folder} is damaged: its ids and lengths disagree, or ids lie "
                            f"outside the {len(tok.symbols)} symbols of {META}.")
        if len(lengths) and lengths.max() >= min_length:
            n = int((lengths >= min_length).sum())
            raise UserError(f"{n:,} {split} record(s) of {folder} have {min_length} or more symbols (the longest "
                            f"{lengths.max()}), but a row of length {min_length} holds at most {min_length - 1} and "
                            f"the end token; set data.length={lengths.max() + 1} or prepare with --max-length.")
        splits[split] = tok.rows(ids, lengths, min_length)
    if len(splits["train"]) == 0 or len(splits["valid"]) == 0:
        raise UserError(f"{folder} has an empty train or valid split; prepare more records or a larger --valid.")
    return RecordCorpus(**splits, tokenizer=tok, name=folder.name)


def load_named(name: str, *, min_length: int = 2) -> RecordCorpus:
    """A source of SOURCES prepared once into the cache (records of at most min_length - 1
    symbols; longer ones are dropped there, with the count printed), then loaded."""
    folder = cache_dir() / "records" / f"{name}-max{min_length - 1}"
    if not is_records(folder):
        meta = prepare_records([name], folder, max_length=min_length - 1)
        dropped = {s: v["dropped_too_long"] for s, v in meta["splits"].items() if v["dropped_too_long"]}
        print(f"prepared {name} into {folder}" + (f"; dropped records longer than {min_length - 1} symbols: "
              + ", ".join(f"{s} {n:,}" for s, n in dropped.items()) if dropped else ""), file=sys.stderr)
    return load_records(folder, min_length=min_length)


# ----------------------------------------------------------------------------- evaluation
def real_tokens(tokenizer, rows: torch.Tensor) -> torch.Tensor | None:
    """[M] float64: the real tokens of each row (symbols and EOS, not the padding) for a record
    tokenizer; None for any other tokenizer (every position is real)."""
    if not isinstance(tokenizer, RecordTokenizer):
        return None
    return (rows != PAD).sum(-1).double()


def describe(meta: dict) -> str:
    """One line about a prepared records folder: sizes, vocabulary, lengths, drops."""
    sp = meta["splits"]
    q = meta.get("length_quantiles", {})
    dropped = sum(v.get("dropped_too_long", 0) for v in sp.values())
    return (", ".join(f"{s} {v['records']:,}" for s, v in sp.items()) + f" records; {len(meta['symbols'])} symbols; "
            f"length median {q.get('0.5')}, 99.9% {q.get('0.999')}, max {q.get('1')}"
            + (f"; {dropped:,} longer than {meta['max_length']} dropped" if dropped else ""))
