"""Tables (md4.data.tables) and R data files (md4.data.rdata): an R serialization written here
read back exactly (lazy-load database, .rda, .rds), per-column vocabularies and quantile bins,
the per-column restriction against enumeration, AR importance weights against the exact
likelihood, and prepare / train / impute / sample via the CLI."""

import bz2
import csv
import gzip
import itertools
import json
import lzma
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from md4.build import build
from md4.cli import main
from md4.config import load_config
from md4.data import load_corpus
from md4.data.rdata import NA_INTEGER, Column, data_frame, read_r
from md4.data.tables import (MISSING, FillDenoiser, TableTokenizer, ar_draws, column_spec, hide_cells, majority, mode,
                             read_table)
from md4.errors import UserError
from md4.restrict import NEG
from test_cli import user_error  # one sentence on stderr, exit status 2
from test_records import check_allowed_by_enumeration


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- an R serialization writer
class RWriter:
    """Just enough of R's XDR serialization (version 3) to write data frames: symbols are written
    once and then as back-references (REFSXP), as R does."""

    def __init__(self):
        self.out = bytearray(b"X\n")
        self.ints(3, 0x040201, 0x030500, 5)
        self.out += b"UTF-8"
        self.symbols = {}

    def ints(self, *values):
        self.out += struct.pack(f">{len(values)}i", *values)

    def flags(self, kind, obj=False, attr=False, tag=False, levels=0):
        self.ints(kind | obj << 8 | attr << 9 | tag << 10 | levels << 12)

    def chars(self, s):
        if s is None:
            self.ints(9, -1)  # NA_STRING
        else:
            self.flags(9, levels=8)  # UTF-8
            self.ints(len(s.encode()))
            self.out += s.encode()

    def symbol(self, name):
        if name in self.symbols:
            self.ints(255 | self.symbols[name] << 8)
        else:
            self.flags(1)
            self.chars(name)
            self.symbols[name] = len(self.symbols) + 1

    def attributes(self, attrs):
        for name, write in attrs:
            self.flags(2, tag=True)
            self.symbol(name)
            write()
        self.ints(254)

    def vector(self, kind, values, attrs=(), obj=False):
        self.flags(kind, obj=obj, attr=bool(attrs))
        self.ints(len(values))
        if kind in (10, 13):
            self.ints(*values)
        elif kind == 14:
            self.out += struct.pack(f">{len(values)}d", *values)
        elif kind == 16:
            for s in values:
                self.chars(s)
        else:  # 19: values are writers
            for write in values:
                write()
        if attrs:
            self.attributes(attrs)

    def compact_intseq(self, n, start):
        self.flags(238)
        self.flags(2)  # info: pairlist (class symbol, package symbol, type)
        self.symbol("compact_intseq")
        self.flags(2)
        self.symbol("base")
        self.flags(2)
        self.vector(13, [13])
        self.ints(254)
        self.vector(14, [float(n), float(start), 1.0])  # state
        self.ints(254)  # attributes: NULL

    def data_frame(self, columns: dict, n: int):
        names = list(columns)
        self.vector(19, [columns[k] for k in names], attrs=[
            ("names", lambda: self.vector(16, names)),
            ("class", lambda: self.vector(16, ["tbl_df", "tbl", "data.frame"])),
            ("row.names", lambda: self.vector(13, [NA_INTEGER, -n]))], obj=True)


def frame_bytes(w: RWriter | None = None) -> bytes:
    """A small data frame (a factor with an NA, doubles with NaN, strings with NA, a logical, an
    ALTREP integer sequence), written into `w` (default: a new serialization)."""
    w = w or RWriter()
    w.data_frame({
        "Status": lambda: w.vector(13, [1, 2, NA_INTEGER, 1], obj=True, attrs=[
            ("levels", lambda: w.vector(16, ["good", "bad"])), ("class", lambda: w.vector(16, ["factor"]))]),
        "Price": lambda: w.vector(14, [1.5, -2.0, float("nan"), 1e6]),
        "Home": lambda: w.vector(16, ["rent", None, "own", "rent"]),
        "Flag": lambda: w.vector(10, [1, 0, NA_INTEGER, 1]),
        "Id": lambda: w.compact_intseq(4, 7),
    }, 4)
    return bytes(w.out)


def check_frame(obj):
    names, cols = data_frame(obj)
    assert names == ["Status", "Price", "Home", "Flag", "Id"] and obj.classes == ["tbl_df", "tbl", "data.frame"]
    assert cols[0].kind == "categorical" and cols[0].values == ["good", "bad", None, "good"]
    assert cols[0].levels == ["good", "bad"]
    assert cols[1].kind == "numeric" and cols[1].values[[0, 1, 3]].tolist() == [1.5, -2.0, 1e6]
    assert math.isnan(cols[1].values[2])
    assert cols[2].values == ["rent", None, "own", "rent"]
    assert cols[3].values == ["TRUE", "FALSE", None, "TRUE"]
    assert cols[4].kind == "numeric" and cols[4].values.tolist() == [7, 8, 9, 10]


def write_lazyload(folder, objects: dict, compressed: int):
    """A package's data/Rdata.rdb + Rdata.rdx, each object compressed as R does for `compressed`."""
    blob, index = bytearray(), {}
    for name, data in objects.items():
        if compressed == 1:
            chunk = zlib.compress(data)
        else:
            raw = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}])
            chunk = b"Z" + raw
        index[name] = (len(blob), 4 + len(chunk))
        blob += struct.pack(">I", len(data)) + chunk
    (folder / "Rdata.rdb").write_bytes(bytes(blob))
    w = RWriter()
    names = list(index)
    variables = [(lambda o=o, n=n: w.vector(13, [o, n])) for o, n in index.values()]
    w.vector(19, [lambda: w.vector(19, variables, attrs=[("names", lambda: w.vector(16, names))]),
                  lambda: w.vector(19, []), lambda: w.vector(13, [compressed])],
             attrs=[("names", lambda: w.vector(16, ["variables", "references", "compressed"]))])
    (folder / "Rdata.rdx").write_bytes(gzip.compress(bytes(w.out)))


@pytest.mark.parametrize("compressed", [1, 3])
def test_lazyload_database(tmp_path, compressed):
    other = RWriter()
    other.vector(16, ["x"])
    write_lazyload(tmp_path, {"frame": frame_bytes(), "other": bytes(other.out)}, compressed)
    check_frame(read_r(tmp_path, "frame")["frame"])
    assert set(read_r(tmp_path / "Rdata.rdx")) == {"frame", "other"}
    with pytest.raises(UserError, match="holds no R object 'nope'; it holds frame, other"):
        read_r(tmp_path, "nope")
    with pytest.raises(UserError, match="is an R character, not a data frame"):
        data_frame(read_r(tmp_path, "other")["other"], "R object 'other'")


@pytest.mark.parametrize("pack", [gzip.compress, bz2.compress, lzma.compress, bytes])
def test_rda_and_rds(tmp_path, pack):
    w = RWriter()  # .rda: RDX3, then a pairlist  frame = <data frame>
    w.flags(2, tag=True)
    w.symbol("frame")
    frame_bytes(w)
    w.ints(254)
    (tmp_path / "a.rda").write_bytes(pack(b"RDX3\n" + bytes(w.out)))
    body = frame_bytes()
    check_frame(read_r(tmp_path / "a.rda", "frame")["frame"])
    (tmp_path / "f.rds").write_bytes(pack(body))
    check_frame(read_r(tmp_path / "f.rds")["f"])
    (tmp_path / "cut.rds").write_bytes(pack(body[:-9]))
    with pytest.raises(UserError, match="ends in the middle of an R object"):
        read_r(tmp_path / "cut.rds")
    (tmp_path / "text.rda").write_bytes(pack(b"RDA3\nA\n..."))
    with pytest.raises(UserError, match="R ASCII or native save file"):
        read_r(tmp_path / "text.rda")


# ----------------------------------------------------------------------------- vocabularies
def test_column_specs_and_bins():
    spec = column_spec("x", Column("numeric", np.arange(1.0, 101.0)), 4)
    assert spec["kind"] == "numeric" and spec["edges"] == [1.0, 25.75, 50.5, 75.25, 100.0]
    assert spec["values"] == ["[1, 25.75)", "[25.75, 50.5)", "[50.5, 75.25)", "[75.25, 100]"]
    assert spec["medians"] == [13.0, 38.0, 63.0, 88.0]
    zeros = np.r_[np.zeros(60), np.arange(1.0, 41.0), np.nan]  # an atom at 0 gets a bin of its own; NA a value
    spec = column_spec("z", Column("numeric", zeros), 4)
    assert spec["edges"][:2] == [0.0, 1.0] and spec["medians"][0] == 0.0 and spec["values"][-1] == MISSING
    few = column_spec("n", Column("numeric", np.array([3.0, 1.0, 3.0, 2.5])), 4)
    assert few == {"name": "n", "kind": "categorical", "values": ["1", "2.5", "3"]}
    cat = column_spec("c", Column("categorical", ["b", None, "a"], levels=["z", "b", "a"]), 4)
    assert cat["values"] == ["z", "b", "a", MISSING]  # a factor keeps its levels' order, unused ones too
    with pytest.raises(UserError, match="Column 'k' has only one value"):
        column_spec("k", Column("categorical", ["v", "v"]), 4)


def small_tokenizer() -> TableTokenizer:
    return TableTokenizer([
        {"name": "a", "kind": "categorical", "values": ["x", "y", MISSING]},
        {"name": "b", "kind": "numeric", "values": ["[0, 1)", "[1, 2]"], "edges": [0.0, 1.0, 2.0],
         "medians": [0.5, 1.5]},
        {"name": "c", "kind": "categorical", "values": ["p", "q"]}])


def test_tokenizer_layout_and_round_trip():
    tok = small_tokenizer()
    assert tok.offsets.tolist() == [0, 3, 5, 7] and tok.vocab_size == 7 and tok.mask_id == 7 and tok.length == 3
    rows = tok.encode_table(["c", "b", "a"], [Column("categorical", ["q", "p"]), Column("numeric", np.array([1.7, -5.0])),
                                              Column("categorical", ["y", None])])
    assert rows.tolist() == [[1, 4, 6], [2, 3, 5]]  # -5 falls in the first bin; a missing cell is NA
    filled = tok.encode_table(["a", "b", "c"], [Column("categorical", [None]), Column("numeric", np.array([np.nan])),
                                                Column("categorical", ["p"])], fill_missing=True)
    assert filled.tolist() == [[7, 7, 5]]
    assert tok.decode(rows[0]) == 'y,"[1, 2]",q' and tok.decode([4]) == "b=[1, 2]" and tok.value(4) == "1.5"
    known, mask = tok.condition("x,_,q")
    assert known[mask].tolist() == [0, 6] and mask.tolist() == [True, False, True]
    assert tok.condition(",0.3,")[0][1] == 3  # a number finds its bin
    with pytest.raises(UserError, match="Value 'z' of column 'a'"):
        tok.condition("z,_,_")
    with pytest.raises(UserError, match="The pattern has 2 cells; a row of this table has 3"):
        tok.condition("x,_")
    with pytest.raises(UserError, match="Column 'b' holds numbers, not 'big'"):
        tok.encode_column(1, Column("categorical", ["big"]))


def test_allowed_matches_enumeration():
    """The extension of records' exact test: every row of the product of the columns' values is
    valid, and at a masked cell exactly that column's values are allowed."""
    tok = small_tokenizer()
    rows = list(itertools.product(range(0, 3), range(3, 5), range(5, 7)))
    check_allowed_by_enumeration(tok, rows)
    fill = tok.allowed(fill=True)
    assert fill[0].nonzero().flatten().tolist() == [0, 1] and fill[2].nonzero().flatten().tolist() == [5, 6]


def test_build_restricts_md4_and_ar_networks_per_column():
    tok = small_tokenizer()
    x, t = torch.tensor([[7, 7, 7]]), torch.ones(1)
    for method in ("md4", "ar"):
        _, net = build(load_config("tiny", ["data.length=3", f"method={method}", "model.time_cond=true"]),
                       tok.vocab_size, tokenizer=tok)
        assert ((net(x, t)[0] != NEG) == tok.allowed()).all()
    assert ((FillDenoiser(net, tok)(x, t)[0] != NEG) == tok.allowed(fill=True)).all()


def test_hide_mode_majority():
    tok = small_tokenizer()
    rows = torch.tensor([[2, 3, 5]] * 400)
    hidden = hide_cells(rows, tok, 0.5, seed=0)
    assert not hidden[:, 0].any() and 0.4 < hidden[:, 1:].float().mean() < 0.6  # NA cells are never hidden
    draws = torch.tensor([[[0, 3, 5], [1, 4, 5], [1, 4, 6]]])
    assert mode(draws, 7).tolist() == [[1, 4, 5]]
    assert mode(draws, 7, torch.tensor([[0.9, 0.05, 0.05]])).tolist() == [[0, 3, 5]]
    train = np.array([[2, 3, 5], [2, 4, 6], [0, 4, 6], [2, 4, 5]])
    assert majority(train, tok).tolist() == [0, 4, 5]  # NA is never the majority; ties: the first value


def test_ar_weights_are_the_exact_likelihood_of_the_observed_cells():
    """log w = sum over observed cells of log p(x_n | x_<n), = -AR.nelbo with the hidden cells
    left out; with many draws the weighted draws approach the exact posterior p(h | o)."""
    tok = small_tokenizer()
    torch.manual_seed(1)
    method, net = build(load_config("tiny", ["data.length=3", "method=ar", "model.time_cond=true"]),
                        tok.vocab_size, tokenizer=tok)
    for p in net.parameters():
        p.data.normal_(0, 0.5)

    class Model:
        pass

    model = Model()
    model.method, model.net, model.tokenizer, model.device = method, net, tok, torch.device("cpu")
    rows, hidden = torch.tensor([[1, 4, 6]]), torch.tensor([[True, False, False]])
    x, logw = ar_draws(model, rows, hidden, draws=2000, seed=0)
    assert (x[0, :, 1:] == rows[0, 1:]).all() and set(x[0, :, 0].tolist()) <= {0, 1}
    exact = -method.nelbo(net, x[0], known=hidden.expand(2000, -1))
    assert torch.allclose(logw[0], exact.double(), atol=1e-4)
    joint = torch.stack([-method.nelbo(net, torch.tensor([[a, 4, 6]])) for a in (0, 1)]).flatten().double()
    posterior = torch.softmax(joint, 0)
    w = torch.softmax(logw[0], 0)
    estimate = torch.stack([w[x[0, :, 0] == a].sum() for a in (0, 1)])
    assert torch.allclose(estimate, posterior, atol=0.03)


# ----------------------------------------------------------------------------- the CLI
def table_csv(path, n=240):
    rng = np.random.default_rng(0)
    lines = ["colour,size,weight,ok"]
    for i in range(n):
        colour = ["red", "green", "blue"][i % 3]
        size = {"red": 1.0, "green": 5.0, "blue": 9.0}[colour] + rng.random()
        weight = "" if i % 17 == 0 else str(int(rng.integers(10, 20)))
        lines.append(f"{colour},{size:.3f},{weight},{['yes', 'no'][i % 2]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prepare_train_impute_sample(tmp_path, capsys):
    src = table_csv(tmp_path / "t.csv")
    out = tmp_path / "prep"
    assert main(["data", "prepare", str(src), "--table", "--bins", "4", "--out", str(out)]) == 0
    assert "data.length=4" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    kinds = [(c["name"], c["kind"], len(c["values"])) for c in meta["columns"]]
    assert kinds[0] == ("colour", "categorical", 3) and kinds[3] == ("ok", "categorical", 2)
    assert kinds[1] == ("size", "numeric", 4) and kinds[2][1] == "numeric"  # weight: 10 integers > 4 bins
    assert meta["columns"][2]["values"][-1] == MISSING
    corpus = load_corpus(str(out), min_length=4)
    assert sum(len(corpus.split(s)) for s in ("train", "valid", "test")) == 240
    first = next(csv.reader(corpus.records("train")[:1]))
    assert len(first) == 4 and first[0] in ("red", "green", "blue") and first[3] in ("yes", "no")
    for method in ("md4", "ar"):
        run = tmp_path / method
        assert main(["train", "--config", "tiny", "--out", str(run), "--set", f"data.corpus={out}",
                     "--set", "data.length=4", "--set", "train.steps=3", "--set", f"method={method}",
                     "--set", "model.time_cond=true", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["impute", str(run), "--rows", "valid", "--draws", "2", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        names = {"md4": ["md4", "md4-one-pass", "majority"], "ar": ["ar-prefix", "ar-weighted", "majority"]}[method]
        assert list(report["methods"]) == names
        for r in report["methods"].values():
            assert 0 <= r["overall"]["accuracy"] <= 1 and r["overall"]["cells"] == report["hidden"] > 0
    # the majority baseline, counted by hand
    tok = TableTokenizer(meta["columns"])
    valid = torch.as_tensor(corpus.valid.astype(np.int64))
    hidden = hide_cells(valid, tok, 0.3, 0)
    best = majority(corpus.train, tok)
    assert report["methods"]["majority"]["overall"]["accuracy"] == pytest.approx(
        float((valid == best)[hidden].float().mean()))
    # a file with missing cells: they are filled (never with NA), the known ones kept
    (tmp_path / "few.csv").write_text("ok,colour,size,weight\nyes,red,,\nno,,9.5,12\n")
    assert main(["impute", str(tmp_path / "md4"), "--rows", str(tmp_path / "few.csv"), "--hide", "0",
                 "--out", str(tmp_path / "filled.csv")]) == 0
    assert "filled 3 missing cells of 2 rows" in capsys.readouterr().out
    header, *lines = (tmp_path / "filled.csv").read_text().splitlines()
    assert header == "colour,size,weight,ok" and len(lines) == 2
    first, second = csv.reader(lines)
    assert first[0] == "red" and first[3] == "yes" and first[1] and first[2] not in ("", MISSING)
    assert second[1:] == ["9.5", "12", "no"] and second[0] in ("red", "green", "blue")
    assert main(["sample", str(tmp_path / "md4"), "--num", "2", "--steps", "4", "--json",
                 "--infill", "blue,_,_,no"]) == 0
    for s in json.loads(capsys.readouterr().out)["samples"]:
        assert s.startswith("blue,") and s.endswith(",no")


def test_genmd4_schedules_are_per_column_value(tmp_path, capsys):
    """GenMD4 learns one exponent per id; the ids of different columns are disjoint, so `md4
    inspect` lists one schedule per column=value."""
    src = table_csv(tmp_path / "t.csv", n=60)
    assert main(["data", "prepare", str(src), "--table", "--bins", "4", "--out", str(tmp_path / "p")]) == 0
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "g"), "--set", f"data.corpus={tmp_path / 'p'}",
                 "--set", "data.length=4", "--set", "train.steps=2", "--set", "method=genmd4",
                 "--set", "model.time_cond=true", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "g"), "--out", str(tmp_path / "w.png"), "--json"]) == 0
    labels = [r["token"] for r in json.loads(capsys.readouterr().out)["order"]]
    tok = TableTokenizer(json.loads((tmp_path / "p" / "meta.json").read_text())["columns"])
    assert sorted(labels) == sorted(f"{c['name']}={v}".replace(" ", "␣") for c in tok.columns for v in c["values"])


def test_bad_tables(tmp_path, capsys):
    def prepare(path, *more):
        return ["data", "prepare", path, "--table", "--out", tmp_path / "o", *more]

    (tmp_path / "empty.csv").write_text("a,b\n")
    assert "is empty" in user_error(capsys, prepare(tmp_path / "empty.csv"))
    (tmp_path / "one.csv").write_text("a,b\n1,x\n2,x\n")
    assert "Column 'b' has only one value (x)" in user_error(capsys, prepare(tmp_path / "one.csv"))
    write_lazyload(tmp_path, {"frame": frame_bytes()}, 1)
    assert "holds no R object 'ames'" in user_error(capsys, prepare(tmp_path / "Rdata.rdx", "--object", "ames"))
    assert "--bins applies to --table only" in user_error(
        capsys, ["data", "prepare", tmp_path / "one.csv", "--records", "--bins", "3", "--out", tmp_path / "o"])
    src = table_csv(tmp_path / "t.csv", n=60)
    assert main(["data", "prepare", str(src), "--table", "--out", str(tmp_path / "p")]) == 0
    assert "set data.length=4" in user_error(capsys, ["train", "--config", "tiny", "--out", tmp_path / "r", "--set",
                                                      f"data.corpus={tmp_path / 'p'}", "--quiet"])
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "--set", f"data.corpus={tmp_path / 'p'}",
                 "--set", "data.length=4", "--set", "train.steps=2", "--quiet"]) == 0
    (tmp_path / "bad.csv").write_text("colour,size,weight,ok\npurple,1,12,yes\n")
    assert "Value 'purple' of column 'colour'" in user_error(capsys, ["impute", tmp_path / "r", "--rows",
                                                                      tmp_path / "bad.csv"])
    assert "not in this table's vocabulary" in user_error(capsys, ["sample", tmp_path / "r", "--infill", "purple,_,_,_"])
    assert "--hide must be a fraction" in user_error(capsys, ["impute", tmp_path / "r", "--hide", "1.5"])


def test_read_table_csv(tmp_path):
    (tmp_path / "a.csv").write_text('x,y,z\n1,"a, b",\n2.5,NA,3\nNA,c,4\n')
    names, cols = read_table(tmp_path / "a.csv")
    assert names == ["x", "y", "z"] and [c.kind for c in cols] == ["numeric", "categorical", "numeric"]
    assert cols[0].values[:2].tolist() == [1.0, 2.5] and math.isnan(cols[0].values[2])
    assert cols[1].values == ["a, b", None, "c"]
    with pytest.raises(UserError, match="--object names an R object"):
        read_table(tmp_path / "a.csv", "x")


def test_bench_table_pools_columns():
    """bench/imputation.py's table: accuracy pooled over the columns of each half of the row."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("imputation", Path(__file__).parents[1] / "bench" / "imputation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stat = [{"accuracy": 0.5, "se": 0.1, "cells": 10}, {"accuracy": 1.0, "se": 0.0, "cells": 30}]
    method = {"overall": {"accuracy": 0.875, "se": 0.05, "cells": 40},
              "kinds": {"categorical": {"accuracy": 0.875, "se": 0.05, "cells": 40},
                        "numeric": {"accuracy": math.nan, "se": math.nan, "cells": 0}},
              "columns": {"a": stat[0], "b": stat[1]}}
    assert bench.pooled(method, ["a", "b"])["accuracy"] == pytest.approx(0.875)
    table = bench.table_md({"methods": {"md4": method}, "runs": {}, "draws": 4})
    assert "| md4 | 0.875 ± 0.050 | 0.875 ± 0.050 | 0.500 ± 0.158 | 1.000 ± 0.000 |" in table
    assert "columns 1-1 (10)" in table and "numeric" not in table
