"""Tables: rows of categorical and numeric columns, one position per column.

    md4 data prepare Rdata.rdx --table --object ames --bins 8 --out data/ames
    md4 train --config tiny --out runs/ames --set data.corpus=data/ames --set data.length=74
    md4 impute runs/ames --rows test --hide 0.3

Reading: a CSV / TSV file with a header line (every cell a string; a column is numeric when every
non-missing cell parses as a number; "" and "NA" are missing), or an R data frame (md4.data.rdata:
a package's lazy-load data/Rdata.rdx, an .rda / .RData or .rds file; --object names the frame).
Factors, strings and logicals are categorical; integers and doubles numeric.

Values of column k (a vocabulary of its own):
- categorical: its distinct values, sorted (a factor: its levels in R's order, unused ones kept);
- numeric with at most --bins distinct values: those values (as categorical, printed as numbers);
- numeric otherwise: B <= --bins quantile bins, edges e_0 < ... < e_B the distinct quantiles
  q(j / bins), j = 0..bins, of the column's values (ties merge bins); bin b = [e_b, e_b+1) (the
  last one closed); a value below e_0 or above e_B falls in the first or last bin. Each bin keeps
  the median of its values: a sampled bin maps back to its interval and that median. A value
  held by more than 1/bins of the cells (the zeros of a zero-inflated column) gets a bin of its
  own, [a, next value above a), so a column may have a few more than --bins bins.
- missing: a value of its own, "NA", last in the column's list, in a column with missing cells.
  The model learns when cells are missing; when filling cells (imputation, infilling) NA is not
  allowed, so every filled cell gets a real value.
The vocabularies and bin edges are built from all rows (as records' vocabularies are), then the
rows are split into train / valid / test by the golden-ratio rule of `md4 data prepare`.

One vocabulary: column k owns the ids offset_k .. offset_k + size_k - 1 (offset_0 = 0, the
columns in order), V = sum size_k, and the mask is id V. A row is N = columns ids, no EOS or
padding. `TableTokenizer.allowed` is the [N, V] rule of md4.restrict: position k takes only
column k's ids, so the model's prediction at a column is a distribution over that column's
values alone, in training, evaluation and sampling, for every method (AR included: its logits at
n predict position n). GenMD4's per-token exponents w_i (md4.genmd4) are indexed by id, and the
ids of different columns are disjoint, so its learned schedules are per column (per value of each
column): `md4 inspect` lists them as column=value.

The prepared folder: meta.json (format "md4-table", the columns) and `{split}_rows.npy` [M, N]
uint16 (plain .npy, no pickle). Imputation (`impute_rows`, `md4 impute`) is at the end.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from md4.data.corpus import SPLITS
from md4.data.rdata import Column, data_frame, is_r_file, read_r, shown
from md4.data.records import RecordCorpus, folder_format
from md4.errors import UserError

FORMAT = "md4-table"
META = "meta.json"
MISSING = "NA"  # the value of a missing cell
MISSING_CELLS = ("", "NA")  # what a CSV cell holds when it is missing
FILL = "_"  # an infilling pattern's cell to generate (md4 sample --infill "a,_,3")
KINDS = ("categorical", "numeric")


# ----------------------------------------------------------------------------- reading files
def read_csv(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV (a .tsv: tab-separated) file with a header line;
    every row must have as many cells as the header."""
    from md4.data.prepare import _open_text

    path = Path(path)
    delimiter = "\t" if path.name.removesuffix(".gz").endswith(".tsv") else ","
    try:
        with _open_text(path) as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except (OSError, csv.Error) as e:
        raise UserError(f"Cannot read {path} as CSV ({e}).") from None
    if not rows:
        raise UserError(f"{path} is empty; a table needs a header line.")
    header, out = rows[0], []
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"Line {n} of {path} has {len(row)} cells but the header has {len(header)}.")
        out.append((n, row))
    return header, out


def number(cell: str) -> float | None:
    """A CSV cell as a finite number, or None."""
    try:
        x = float(cell)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def csv_columns(path: Path) -> tuple[list[str], list[Column]]:
    """A CSV file's columns: numeric where every non-missing cell is a number."""
    header, rows = read_csv(path)
    out = []
    for k in range(len(header)):
        cells = [None if row[k].strip() in MISSING_CELLS else row[k].strip() for _, row in rows]
        values = [number(c) if c is not None else math.nan for c in cells]
        if any(c is not None for c in cells) and None not in values:
            out.append(Column("numeric", np.asarray(values, dtype=np.float64)))
        else:
            out.append(Column("categorical", cells))
    return header, out


def read_table(path: str | Path, name: str | None = None) -> tuple[list[str], list[Column]]:
    """(column names, columns) of a CSV/TSV file or an R data frame (`name`: the object; needed
    when the R file holds several). An empty table (no rows or no columns) is a UserError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"File not found: {path}.")
    if is_r_file(path):
        objects = read_r(path, name)
        if len(objects) != 1:
            raise UserError(f"{path} holds several R objects; name the table with --object (one of {shown(objects)}).")
        (what, obj), = objects.items()
        names, columns = data_frame(obj, f"R object {what!r}")
    else:
        if name is not None:
            raise UserError(f"--object names an R object; {path.name} is a CSV file.")
        names, columns = csv_columns(path)
    if not names or not len(columns[0]):
        raise UserError(f"The table in {path} is empty (no rows or no columns).")
    return names, columns


# ----------------------------------------------------------------------------- the vocabulary
def number_label(x: float) -> str:
    return format(float(x), ".10g")


def column_spec(name: str, col: Column, bins: int) -> dict:
    """What a column's vocabulary is (the module docstring): {"name", "kind", "values"} plus, for
    numeric columns, "edges" [B + 1] and "medians" [B]. A column with one value is a UserError."""
    if col.kind == "numeric":
        v = np.asarray(col.values, dtype=np.float64)
        seen = v[~np.isnan(v)]
        missing = bool(np.isnan(v).any())
        distinct = np.unique(seen)
        if len(distinct) > bins:
            edges = quantile_edges(seen, distinct, bins)
            b = bin_of(edges, seen)
            medians = [float(np.median(seen[b == j])) if (b == j).any() else float(edges[j]) for j in range(len(edges) - 1)]
            labels = [f"[{number_label(lo)}, {number_label(hi)}{']' if j == len(edges) - 2 else ')'}"
                      for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
            spec = {"name": name, "kind": "numeric", "values": labels, "edges": edges.tolist(), "medians": medians}
        else:
            spec = {"name": name, "kind": "categorical", "values": [number_label(x) for x in distinct]}
    else:
        present = {c for c in col.values if c is not None}
        levels = [lv for lv in (col.levels or []) if lv is not None]
        values = levels + sorted(present - set(levels))
        missing = any(c is None for c in col.values)
        spec = {"name": name, "kind": "categorical", "values": values}
    if missing:
        spec["values"] = spec["values"] + [MISSING]
    if len(spec["values"]) < 2:
        shown_value = spec["values"][0] if spec["values"] else "nothing"
        raise UserError(f"Column {name!r} has only one value ({shown_value}); drop it, it tells the model nothing.")
    return spec


def quantile_edges(seen: np.ndarray, distinct: np.ndarray, bins: int) -> np.ndarray:
    """The distinct quantiles q(j / bins), j = 0..bins, plus, for each value a held by more than
    1/bins of the cells (an atom, e.g. the zeros of a zero-inflated column), a and the next value
    above it, so that a has a bin of its own."""
    edges = set(np.quantile(seen, np.linspace(0.0, 1.0, bins + 1)).tolist())
    values, counts = np.unique(seen, return_counts=True)
    for a in values[counts > len(seen) / bins]:
        above = distinct[distinct > a]
        edges.update([float(a)] + ([float(above[0])] if len(above) else []))
    return np.asarray(sorted(edges), dtype=np.float64)


def bin_of(edges, x: np.ndarray) -> np.ndarray:
    """The bin of each value: b with e_b <= x < e_b+1 (the last bin closed; outside: the end bins)."""
    edges = np.asarray(edges, dtype=np.float64)
    return np.clip(np.searchsorted(edges[1:-1], x, side="right"), 0, len(edges) - 2)


class TableTokenizer:
    """Rows <-> ids: column k's value j is id offset_k + j; the mask id is V (the module docstring).

    columns: the column specs (column_spec), saved in config.json; length: N = len(columns)."""

    name = "table"
    ARGS = {"columns": list, "length": (1, 1 << 24)}
    structural = False  # md4.restrict: the rule does not read the input, so AR networks use it too

    def __init__(self, columns: list[dict], length: int | None = None):
        self.columns = [dict(c) for c in columns]
        ok = bool(self.columns) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and c.get("kind") in KINDS
            and isinstance(c.get("values"), list) and len(c["values"]) >= 2
            and all(isinstance(v, str) for v in c["values"]) and len(set(c["values"])) == len(c["values"])
            and (c["kind"] != "numeric" or (isinstance(c.get("edges"), list) and isinstance(c.get("medians"), list)
                                            and len(c["edges"]) == len(c["medians"]) + 1 <= len(c["values"]) + 1))
            for c in self.columns)
        if not ok:
            raise UserError("A table vocabulary must list columns, each with a name, a kind "
                            f"({' or '.join(KINDS)}) and at least two distinct values (numeric: bin edges and medians).")
        sizes = [len(c["values"]) for c in self.columns]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.vocab_size = int(self.offsets[-1])
        self.mask_id = self.vocab_size
        self.length = len(self.columns)
        if length not in (None, self.length):
            raise UserError(f"A table of {self.length} columns makes rows of {self.length} tokens, not {length}.")
        self.column_of = np.repeat(np.arange(self.length), sizes)
        self.index = [{v: j for j, v in enumerate(c["values"])} for c in self.columns]
        self.names = [c["name"] for c in self.columns]

    def args(self) -> dict:
        return {"columns": self.columns, "length": self.length}

    # ------------------------------------------------------------------ cells <-> ids
    def missing_id(self, k: int) -> int | None:
        """The id of column k's NA value, or None when the column has none."""
        j = self.index[k].get(MISSING)
        return None if j is None else int(self.offsets[k] + j)

    def encode_column(self, k: int, col: Column, fill_missing: bool = False) -> np.ndarray:
        """[M] int64 ids of column k's cells: a missing cell is the column's NA value, or the mask
        id (a cell to fill) with fill_missing or when the column has no NA value. A value outside
        the vocabulary is a UserError."""
        spec, off = self.columns[k], int(self.offsets[k])
        missing = self.missing_id(k)
        missing = self.mask_id if missing is None or fill_missing else missing
        if spec["kind"] == "numeric":
            if col.kind != "numeric":
                bad = next((c for c in col.values if c is not None and number(c) is None), None)
                if bad is not None:
                    raise UserError(f"Column {spec['name']!r} holds numbers, not {bad!r}.")
                col = Column("numeric", np.asarray([math.nan if c is None else number(c) for c in col.values]))
            v = np.asarray(col.values, dtype=np.float64)
            return np.where(np.isnan(v), missing, off + bin_of(spec["edges"], np.nan_to_num(v)))
        cells = col.values if col.kind == "categorical" else [None if math.isnan(x) else number_label(x)
                                                              for x in col.values]
        out = np.empty(len(cells), dtype=np.int64)
        for i, c in enumerate(cells):
            if c is None:
                out[i] = missing
            elif c in self.index[k]:
                out[i] = off + self.index[k][c]
            else:
                raise UserError(f"Value {c!r} of column {spec['name']!r} (row {i + 1}) is not in this table's "
                                f"vocabulary ({shown(spec['values'])}).")
        return out

    def encode_table(self, names: list[str], columns: list[Column], fill_missing: bool = False) -> np.ndarray:
        """[M, N] int64 ids of a table with this tokenizer's columns (by name; others ignored);
        fill_missing: missing cells are the mask id (encode_column)."""
        lost = [n for n in self.names if n not in names]
        if lost:
            raise UserError(f"The table lacks the column(s) {shown(lost)} of this model.")
        return np.stack([self.encode_column(k, columns[names.index(n)], fill_missing) for k, n in enumerate(self.names)], 1)

    def label(self, token: int) -> str:
        k = int(self.column_of[token])
        return self.columns[k]["values"][token - int(self.offsets[k])]

    def value(self, token: int) -> str:
        """What a cell reads as: its value (numeric bins: the bin's median)."""
        k = int(self.column_of[token])
        j = token - int(self.offsets[k])
        spec = self.columns[k]
        if spec["kind"] == "numeric" and j < len(spec["medians"]):
            return number_label(spec["medians"][j])
        return spec["values"][j]

    def decode(self, ids) -> str:
        """A row of ids -> a CSV line of values (numeric: the bin's interval); masks show as "_".
        One id alone (md4 inspect's token labels) reads column=value."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().tolist()
        ids = np.asarray(ids).reshape(-1).tolist()
        if any(not 0 <= i <= self.mask_id for i in ids):
            raise ValueError(f"ids must lie in [0, {self.mask_id}]")
        if len(ids) == 1 and ids[0] != self.mask_id:
            return f"{self.names[int(self.column_of[ids[0]])]}={self.label(ids[0])}"
        return ",".join(FILL if i == self.mask_id else csv_cell(self.label(i)) for i in ids)

    def condition(self, text: str, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(known [N], known_mask [N]) for a CSV line of N cells, "_" or "" = a cell to generate;
        a numeric cell may be a number (its bin) or a bin's label."""
        cells = next(csv.reader([text]), [])
        if len(cells) != self.length:
            raise UserError(f"The pattern has {len(cells)} cells; a row of this table has {self.length} "
                            f"({shown(self.names)}).")
        known = torch.zeros(self.length, dtype=torch.long)
        known_mask = torch.zeros(self.length, dtype=torch.bool)
        for k, c in enumerate(cells):
            c = c.strip()
            if c in (FILL, ""):
                continue
            if c in self.index[k]:
                known[k] = int(self.offsets[k]) + self.index[k][c]
            else:
                known[k] = int(self.encode_column(k, Column("categorical", [c]))[0])
            known_mask[k] = True
        return known, known_mask

    # ------------------------------------------------------------------ restriction
    def allowed(self, x: torch.Tensor | None = None, fill: bool = False) -> torch.Tensor:
        """[N, V] bool: position k takes only column k's ids (md4.restrict); fill=True also
        excludes each column's NA value (what a cell to fill may become)."""
        out = torch.as_tensor(self.column_of[None, :] == np.arange(self.length)[:, None])
        if fill:
            for k in range(self.length):
                m = self.missing_id(k)
                if m is not None:
                    out[k, m] = False
        return out

    def __repr__(self) -> str:
        return f"TableTokenizer({self.length} columns, {self.vocab_size} values)"


def csv_cell(text: str) -> str:
    """A value as one CSV cell (quoted when it holds a comma or a quote)."""
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


# ----------------------------------------------------------------------------- preparing
def prepare_table(path: str | Path, out: str | Path, *, name: str | None = None, bins: int = 8,
                  valid: float = 0.05, test: float = 0.05) -> dict:
    """Read the table at `path` (`name`: the R object), build the per-column vocabularies and
    write the folder `out` (the module docstring); returns the metadata written."""
    from md4.checkpoint import write_text_atomic
    from md4.data.prepare import split_of

    out = Path(out).expanduser()
    if (out / META).exists():
        raise UserError(f"{out} already holds a prepared corpus; choose another --out or delete it.")
    if bins < 2:
        raise UserError(f"--bins must be at least 2, got {bins}.")
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise UserError(f"--valid and --test must be fractions with a sum below 1, got {valid} and {test}.")
    names, columns = read_table(path, name)
    tok = TableTokenizer([column_spec(n, c, bins) for n, c in zip(names, columns)])
    rows = tok.encode_table(names, columns)
    dtype = np.uint8 if tok.vocab_size < 256 else np.uint16
    which = np.asarray([split_of(i, valid, test) for i in range(len(rows))])
    meta = {"format": FORMAT, "version": 1, "source": str(path), "object": name, "bins": bins,
            "columns": tok.columns, "splits": {}}
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        part = rows[which == split].astype(dtype)
        np.save(out / f"{split}_rows.npy", part, allow_pickle=False)
        meta["splits"][split] = {"rows": int(len(part))}
    write_text_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    return meta


def describe(meta: dict) -> str:
    """One line about a prepared table folder."""
    cols = meta["columns"]
    numeric = sum(c["kind"] == "numeric" for c in cols)
    return (", ".join(f"{s} {v['rows']:,}" for s, v in meta["splits"].items()) + f" rows; {len(cols)} columns "
            f"({numeric} numeric in <= {meta['bins']} bins, {len(cols) - numeric} categorical); "
            f"{sum(len(c['values']) for c in cols)} values; rows of data.length={len(cols)}")


# ----------------------------------------------------------------------------- loading
class TableCorpus(RecordCorpus):
    """Splits as rows [M, N] of ids, one position per column; `records(split)` decodes them as
    CSV lines."""


def is_table(path: str | Path) -> bool:
    return folder_format(path) == FORMAT


def load_table(folder: str | Path, *, min_length: int | None = None) -> TableCorpus:
    """A prepared table folder; min_length (the model length, data.length) must be its number
    of columns."""
    from md4.checkpoint import read_json
    from md4.validate import field, in_file, mapping

    folder = Path(folder).expanduser()
    path = folder / META
    meta = mapping(read_json(path), "the top level", path)
    tok = in_file(path, TableTokenizer, field(meta, "columns", list, path))
    if min_length is not None and min_length != tok.length:
        raise UserError(f"The table {folder} has {tok.length} columns, so rows of {tok.length} tokens; "
                        f"set data.length={tok.length}.")
    splits = {}
    for split in SPLITS:
        try:
            rows = np.load(folder / f"{split}_rows.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"The {split} split of {folder} is missing or damaged ({type(e).__name__}).") from None
        ok = rows.ndim == 2 and rows.shape[1] == tok.length and rows.dtype.kind == "u"
        if ok and len(rows):
            ids = rows.astype(np.int64)
            ok = ids.max() < tok.vocab_size and (tok.column_of[ids] == np.arange(tok.length)).all()
        if not ok:
            raise UserError(f"The {split} split of {folder} is damaged: its ids do not match the columns of {META}.")
        splits[split] = rows
    if len(splits["train"]) == 0 or len(splits["valid"]) == 0:
        raise UserError(f"{folder} has an empty train or valid split; prepare more rows or a larger --valid.")
    return TableCorpus(**splits, tokenizer=tok, name=folder.name)


# ----------------------------------------------------------------------------- imputation
class FillDenoiser(torch.nn.Module):
    """A network whose logits at cells to fill exclude each column's NA value (`allowed(fill=True)`)."""

    def __init__(self, net, tokenizer: TableTokenizer):
        super().__init__()
        self.net = net
        self.uses_time = getattr(net, "uses_time", True)
        self.register_buffer("fill", tokenizer.allowed(fill=True), persistent=False)

    def forward(self, x, t):
        from md4.restrict import restrict_logits

        return restrict_logits(self.net(x, t), self.fill.to(x.device))


def hide_cells(rows: torch.Tensor, tokenizer: TableTokenizer, fraction: float, seed: int) -> torch.Tensor:
    """[M, N] bool: each non-missing cell hidden independently with probability `fraction`."""
    if not 0 < fraction < 1:
        raise UserError(f"--hide must be a fraction between 0 and 1, got {fraction}.")
    g = torch.Generator().manual_seed(seed)
    na = torch.tensor([tokenizer.missing_id(k) if tokenizer.missing_id(k) is not None else -1
                       for k in range(tokenizer.length)])
    return (torch.rand(rows.shape, generator=g) < fraction) & (rows != na)


def mode(draws: torch.Tensor, vocab_size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N]: the (weighted) most frequent value of draws [M, K, N] at each cell."""
    m, k, n = draws.shape
    w = torch.ones(m, k, dtype=torch.float64) if weights is None else weights.double()
    counts = torch.zeros(m, n, vocab_size, dtype=torch.float64)
    counts.scatter_add_(2, draws.permute(0, 2, 1), w[:, None, :].expand(m, n, k).contiguous())
    return counts.argmax(-1)


@torch.no_grad()
def md4_draws(model, rows: torch.Tensor, hidden: torch.Tensor, draws: int, steps: int, seed: int,
              batch: int = 256) -> torch.Tensor:
    """[M, draws, N]: completions of each row's hidden cells by infilling (md4.sampling.sample
    with known = the row, known_mask = ~hidden), NA excluded at the filled cells; the `cached`
    sampler when the network ignores t (the same chain as `ancestral`, fewer network calls)."""
    from md4.sampling import ignores_time

    denoiser = FillDenoiser(model.net, model.tokenizer)
    sampler = "cached" if ignores_time(denoiser) else "ancestral"  # the same chain, fewer network calls
    g = torch.Generator(model.device).manual_seed(seed)
    known = rows.repeat_interleave(draws, 0).to(model.device)
    mask = (~hidden).repeat_interleave(draws, 0).to(model.device)
    out = [model.method.sample(denoiser, len(known[i: i + batch]), rows.shape[1], steps=steps, grid="cosine",
                               generator=g, device=model.device, sampler=sampler, known=known[i: i + batch],
                               known_mask=mask[i: i + batch]).cpu()
           for i in range(0, len(known), batch)]
    return torch.cat(out).view(len(rows), draws, -1)


@torch.no_grad()
def ar_draws(model, rows: torch.Tensor, hidden: torch.Tensor, draws: int, seed: int,
             batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """AR imputation: (draws [M, K, N], log-weights [M, K]).

    Left to right, a hidden cell n is drawn from p(x_n | x_<n) (NA excluded), an observed one is
    kept, which conditions each cell only on the cells before it. The proposal is
    q(h) = prod_{n hidden} p(x_n | x_<n), while the posterior is p(h | o) ∝ q(h) prod_{n observed}
    p(x_n | x_<n): the log-weight of a draw is sum_{n observed} log p(x_n | x_<n), and
    self-normalized importance weighting of the K draws estimates p(x_n | all observed cells).
    Cost: N network calls on [K M, N] (one per column, no KV cache), as MD4 with N steps."""
    from md4.restrict import restrict_logits

    fill = model.tokenizer.allowed(fill=True).to(model.device)
    g = torch.Generator(model.device).manual_seed(seed)
    ar, net, n = model.method, model.net, rows.shape[1]
    x_all = rows.repeat_interleave(draws, 0).to(model.device)
    h_all = hidden.repeat_interleave(draws, 0).to(model.device)
    outs, logws = [], []
    for i in range(0, len(x_all), batch):
        x, h = x_all[i: i + batch].clone(), h_all[i: i + batch]
        logw = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        zeros = torch.zeros(len(x), device=x.device)
        for k in range(n):
            logits = net(ar.shift(x)[:, : k + 1], zeros)[:, -1].double()
            logp = torch.log_softmax(logits, -1)
            drawn = torch.multinomial(torch.softmax(restrict_logits(logits[:, None], fill[k: k + 1])[:, 0], -1), 1,
                                      generator=g)[:, 0]
            logw += torch.where(h[:, k], 0.0, logp.gather(-1, x[:, k: k + 1])[:, 0])
            x[:, k] = torch.where(h[:, k], drawn, x[:, k])
        outs.append(x.cpu())
        logws.append(logw.cpu())
    return torch.cat(outs).view(len(rows), draws, n), torch.cat(logws).view(len(rows), draws)


def majority(train: np.ndarray, tokenizer: TableTokenizer) -> torch.Tensor:
    """[N]: each column's most frequent non-missing value in the training rows."""
    counts = np.bincount(np.asarray(train, dtype=np.int64).reshape(-1), minlength=tokenizer.vocab_size).astype(float)
    for k in range(tokenizer.length):
        if tokenizer.missing_id(k) is not None:
            counts[tokenizer.missing_id(k)] = -1
    return torch.tensor([int(tokenizer.offsets[k] + counts[tokenizer.offsets[k]: tokenizer.offsets[k + 1]].argmax())
                         for k in range(tokenizer.length)])


def impute_rows(model, rows: torch.Tensor, hidden: torch.Tensor, draws: int = 8, steps: int | None = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Predictions [M, N] of the hidden cells (the others are the rows' own), by name:
    a masked diffusion model gives "md4" (the mode of `draws` infilled completions, `steps` steps,
    default N) and "md4-one-pass" (one_pass: each cell's most likely value given the observed
    cells, the cells filled independently); an AR model gives "ar-prefix" (the mode of its draws, each cell conditioned on
    the cells before it) and "ar-weighted" (importance-weighted: on all observed cells)."""
    if model.method.causal:
        x, logw = ar_draws(model, rows, hidden, draws, seed)
        w = torch.softmax(logw, -1)
        out = {"ar-prefix": mode(x, model.tokenizer.vocab_size),
               "ar-weighted": mode(x, model.tokenizer.vocab_size, w)}
        ess = (1.0 / (w ** 2).sum(-1)).mean().item()
        return {k: torch.where(hidden, v, rows) for k, v in out.items()} | {"ess": torch.tensor(ess)}
    x = md4_draws(model, rows, hidden, draws, steps or rows.shape[1], seed)
    return {"md4": torch.where(hidden, mode(x, model.tokenizer.vocab_size), rows),
            "md4-one-pass": torch.where(hidden, one_pass(model, rows, hidden), rows)}


@torch.no_grad()
def one_pass(model, rows: torch.Tensor, hidden: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """[M, N]: the most likely value of every hidden cell under the denoiser's prediction given
    all observed cells at once, p(x_n | observed) (one network call; t = the row's hidden
    fraction, the masking level of the linear schedule)."""
    denoiser = FillDenoiser(model.net, model.tokenizer)
    out = []
    for i in range(0, len(rows), batch):
        x, h = rows[i: i + batch].to(model.device), hidden[i: i + batch].to(model.device)
        xt = torch.where(h, model.method.mask_id, x)
        out.append(denoiser(xt, h.float().mean(-1)).argmax(-1).cpu())
    return torch.cat(out)


def accuracy(pred: torch.Tensor, rows: torch.Tensor, hidden: torch.Tensor, tokenizer: TableTokenizer) -> dict:
    """Accuracy over the hidden cells ± binomial SE, overall, by kind of column (numeric: binned;
    columns with few values count as categorical) and per column (numeric: bin accuracy)."""
    correct = (pred == rows) & hidden

    def stat(c, h):
        n = int(h.sum())
        p = float(c.sum()) / n if n else math.nan
        return {"accuracy": p, "se": math.sqrt(p * (1 - p) / n) if n else math.nan, "cells": n}

    kinds = np.asarray([c["kind"] == "numeric" and "numeric" or "categorical" for c in tokenizer.columns])
    return {"overall": stat(correct, hidden),
            "kinds": {kind: stat(correct[:, kinds == kind], hidden[:, kinds == kind]) for kind in KINDS},
            "columns": {name: stat(correct[:, k], hidden[:, k]) for k, name in enumerate(tokenizer.names)}}


def impute_report(model, rows: torch.Tensor, hidden: torch.Tensor, train: np.ndarray, draws: int = 8,
                  steps: int | None = None, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """(report, predictions): the cells to fill are `hidden` and the rows' mask ids (cells
    missing in a file); accuracy is scored on `hidden` (their true values are the rows').
    report: {"methods": {name: accuracy(...)}, "ess": AR's mean effective sample size, "draws"}
    with the per-column majority of the training rows as the baseline "majority"."""
    tok = model.tokenizer
    fill = hidden | (rows == tok.mask_id)
    preds = impute_rows(model, rows, fill, draws=draws, steps=steps, seed=seed)
    ess = preds.pop("ess", None)
    preds["majority"] = torch.where(fill, majority(train, tok).expand_as(rows), rows)
    report = {"methods": {k: accuracy(v, rows, hidden, tok) for k, v in preds.items()}, "draws": draws,
              "steps": steps or rows.shape[1], "rows": len(rows), "hidden": int(hidden.sum())}
    if ess is not None:
        report["ess"] = float(ess)
    return report, preds


def format_report(report: dict, names: list[str]) -> str:
    """A markdown table: accuracy ± SE per column (hidden cells) and overall, one column per method."""
    methods = list(report["methods"])
    head = "| column | cells | " + " | ".join(methods) + " |\n|---|---:|" + "---:|" * len(methods)
    lines = [head]
    for name in ["overall", *names]:
        stats = [report["methods"][m]["overall" if name == "overall" else "columns"] for m in methods]
        stats = [s if name == "overall" else s[name] for s in stats]
        cells = " | ".join(f"{s['accuracy']:.3f} ± {s['se']:.3f}" if s["cells"] else "-" for s in stats)
        lines.append(f"| {'**all**' if name == 'overall' else name} | {stats[0]['cells']} | {cells} |")
    ess = f"; AR effective sample size {report['ess']:.2f} of {report['draws']}" if "ess" in report else ""
    return "\n".join(lines) + (f"\n{report['rows']} rows, {report['hidden']} hidden cells, mode of "
                               f"{report['draws']} draws, {report['steps']} steps{ess}")


def write_filled(path: str | Path, tokenizer: TableTokenizer, rows: torch.Tensor, filled: torch.Tensor,
                 raw: list[list[str]]) -> None:
    """A CSV of the model's columns: each cell the file's own (raw [M][N] strings) where it was
    known, the filled value (numeric: its bin's median) where it was filled."""
    from md4.checkpoint import write_text_atomic

    lines = [",".join(csv_cell(n) for n in tokenizer.names)]
    for r, f, cells in zip(rows.tolist(), filled.tolist(), raw):
        lines.append(",".join(csv_cell(c if a == b else tokenizer.value(b)) for a, b, c in zip(r, f, cells)))
    write_text_atomic(Path(path), "\n".join(lines) + "\n")


def raw_cells(names: list[str], columns: list[Column], wanted: list[str]) -> list[list[str]]:
    """[M][N] strings: the cells of the `wanted` columns as read ("" for missing)."""
    def text(col: Column) -> list[str]:
        if col.kind == "numeric":
            return ["" if math.isnan(x) else number_label(x) for x in col.values]
        return ["" if c is None else c for c in col.values]

    cols = [text(columns[names.index(n)]) for n in wanted]
    return [list(row) for row in zip(*cols)]
