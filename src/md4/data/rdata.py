"""R data files read without R: lazy-load databases, .rda / .RData, .rds (XDR serialization).

    frames = read_r(".../modeldata/data/Rdata.rdx", "ames")   # {"ames": RObject}
    names, columns = data_frame(frames["ames"])                # columns: Column(kind, values)

What R writes (R Internals, "Serialization formats"), and what is read here:

- serialization: b"X\\n" (XDR = big-endian), int version (2 or 3), int writer's R version, int
  oldest reader's version; version 3 adds int n + n bytes of the native encoding. Then one item.
- item: int flags = type (bits 0-7) | object (bit 8) | attributes (bit 9) | tag (bit 10) |
  levels << 12 (a CHARSXP's encoding bits). Vectors: int length (-1: two ints, a long length),
  then the elements (INTSXP / LGLSXP: ints, NA = -2^31; REALSXP: doubles, NA a NaN; STRSXP:
  CHARSXP items; VECSXP: items), then the attribute pairlist when bit 9 is set. Pairlists
  (LISTSXP, LANGSXP, ...): attributes, tag, CAR, CDR. CHARSXP: int length (-1 = NA_STRING),
  bytes. SYMSXP: its CHARSXP, entered in the reference table, as are environments; REFSXP
  (flags >> 8, or the next int when 0) refers back to the table (1-based). ALTREP (238): a class
  pairlist, a state and attributes; compact_intseq / compact_realseq (state: n, start, step),
  wrap_* (state: the vector) and deferred_string (state: the vector to print) are expanded.
- .rds: one gzip/bzip2/xz-compressed (or plain) serialization.
- .rda / .RData: the same, after the magic b"RDX2\\n" or b"RDX3\\n": a pairlist name -> object.
- lazy-load database (a package's data/Rdata.rdb + Rdata.rdx, what `LazyData: true` installs):
  the .rdx is an .rds of list(variables = list(name = c(offset, length)), references, compressed);
  each object is the .rdb's bytes [offset, offset + length): a 4-byte big-endian length of the
  uncompressed data, then zlib data (compressed = 1), or a type byte (b"Z" raw LZMA2, b"2"
  bzip2, b"1" zlib, b"0" none) and the data (compressed = 2 or 3).

Only the ASCII/native (b"A\\n", b"B\\n") encodings, byte code, external pointers and weak
references are refused, with a UserError naming what was found.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from md4.errors import UserError

NA_INTEGER = -(1 << 31)
# item types (SEXPTYPE) read here
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 9, 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP, S4SXP = 19, 20, 24, 25
REFSXP, NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, BASENAMESPACE = 255, 254, 253, 252, 251, 250
NAMESPACESXP, PACKAGESXP, PERSISTSXP, EMPTYENV, BASEENV, ATTRLANG, ATTRLIST, ALTREP = 249, 248, 247, 242, 241, 240, 239, 238
PAIRLISTS = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANG, ATTRLIST}
SINGLETONS = {NILVALUE: "NULL", GLOBALENV: "globalenv", UNBOUND: "unbound", MISSINGARG: "missing",
              BASENAMESPACE: "base namespace", EMPTYENV: "emptyenv", BASEENV: "baseenv"}
TYPE_NAMES = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex", STRSXP: "character",
              VECSXP: "list", EXPRSXP: "expression", RAWSXP: "raw", S4SXP: "S4"}


@dataclass(eq=False)
class RObject:
    """One R value: `type` a name of TYPE_NAMES (or "NULL", "symbol", "pairlist", "environment"),
    `value` a numpy array (logical / integer: int32 with NA_INTEGER; double: float64), a list of
    str | None (character; None = NA) or of RObject (list), a str (symbol), or for a pairlist a
    list of (tag | None, RObject); `attrs` name -> RObject."""

    type: str
    value: object = None
    attrs: dict = field(default_factory=dict)

    def attr(self, name: str):
        """The attribute's value (None when absent)."""
        a = self.attrs.get(name)
        return None if a is None else a.value

    @property
    def classes(self) -> list[str]:
        return [c for c in (self.attr("class") or []) if c is not None]


NULL = RObject("NULL")


class _Reader:
    """An XDR serialization, item by item (the module docstring)."""

    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where, self.refs = data, 0, where, []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise UserError(f"{self.where} ends in the middle of an R object; the file is truncated or damaged.")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        if n < 0:
            raise UserError(f"{self.where} holds a vector of negative length; the file is damaged.")
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(fmt)
            raise UserError(f"{self.where} is " + (f"R's {kind} serialization; only XDR (R's default) is read."
                                                    if kind else "not an R serialization."))
        version = self.int()
        self.int(), self.int()
        if version == 3:
            self.take(self.int())
        elif version != 2:
            raise UserError(f"{self.where} uses R serialization version {version}; versions 2 and 3 are read.")

    def chars(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        return raw.decode("latin-1" if levels & 4 else "utf-8", errors="replace")

    def item(self) -> RObject:
        flags = self.int()
        kind, has_attr, levels = flags & 0xFF, flags & (1 << 9), flags >> 12
        if kind in SINGLETONS:
            return NULL if kind == NILVALUE else RObject(SINGLETONS[kind])
        if kind == REFSXP:
            k = (flags >> 8) or self.int()
            if not 1 <= k <= len(self.refs):
                raise UserError(f"{self.where} refers to R object {k} of {len(self.refs)}; the file is damaged.")
            return self.refs[k - 1]
        if kind == SYMSXP:
            out = RObject("symbol", self.item().value)
            self.refs.append(out)
            return out
        if kind in (PACKAGESXP, NAMESPACESXP, PERSISTSXP):
            if self.int() != 0:
                raise UserError(f"{self.where} holds a damaged reference to an R package or namespace.")
            out = RObject("environment", [self.item().value for _ in range(self.int())])
            self.refs.append(out)
            return out
        if kind == ENVSXP:
            self.int()  # locked
            out = RObject("environment")
            self.refs.append(out)
            _enclos, frame, _hashtab, attrs = self.item(), self.item(), self.item(), self.item()
            out.value = frame.value
            out.attrs = pairlist_attrs(attrs)
            return out
        if kind in PAIRLISTS:
            return self.pairlist(flags)
        if kind == ALTREP:
            return self.altrep()
        if kind == CHARSXP:
            return RObject("character", self.chars(levels))
        out = self.vector(kind)
        if has_attr:
            out.attrs = pairlist_attrs(self.item())
        return out

    def pairlist(self, flags: int) -> RObject:
        """A pairlist read iteratively along its CDRs: [(tag, value)]."""
        items, attrs, first = [], {}, True
        while True:
            kind = flags & 0xFF
            a = pairlist_attrs(self.item()) if flags & (1 << 9) else {}
            if first:
                attrs, first = a, False
            tag = self.item().value if flags & (1 << 10) else None
            items.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF not in PAIRLISTS or kind != flags & 0xFF:
                self.pos -= 4
                rest = self.item()
                if rest.type != "NULL":
                    items.append((None, rest))
                return RObject("pairlist", items, attrs)

    def vector(self, kind: int) -> RObject:
        if kind in (LGLSXP, INTSXP):
            n = self.length()
            return RObject(TYPE_NAMES[kind], np.frombuffer(self.take(4 * n), ">i4").astype(np.int32))
        if kind in (REALSXP, CPLXSXP):
            n = self.length() * (2 if kind == CPLXSXP else 1)
            return RObject(TYPE_NAMES[kind], np.frombuffer(self.take(8 * n), ">f8").astype(np.float64))
        if kind == RAWSXP:
            return RObject("raw", np.frombuffer(self.take(self.length()), np.uint8).copy())
        if kind == STRSXP:
            values = []
            for _ in range(self.length()):
                flags = self.int()
                if flags & 0xFF != CHARSXP:
                    raise UserError(f"{self.where} holds a character vector with a non-string element.")
                values.append(self.chars(flags >> 12))
            return RObject("character", values)
        if kind in (VECSXP, EXPRSXP):
            return RObject(TYPE_NAMES[kind], [self.item() for _ in range(self.length())])
        if kind == S4SXP:
            return RObject("S4")
        raise UserError(f"{self.where} holds an R object of type {kind} (byte code, an external pointer or "
                        f"similar), which this reader does not read.")

    def altrep(self) -> RObject:
        info, state, attrs = self.item(), self.item(), self.item()
        cls = info.value[0][1].value if info.type == "pairlist" and info.value else None
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (float(v) for v in state.value[:3])
            seq = start + step * np.arange(int(n))
            out = RObject("integer", seq.astype(np.int32)) if cls == "compact_intseq" else RObject("double", seq)
        elif isinstance(cls, str) and cls.startswith("wrap_"):
            out = state.value[0]
        elif cls == "deferred_string":
            arg = state.value[0][1] if state.type == "pairlist" else state
            out = RObject("character", as_strings(arg))
        else:
            raise UserError(f"{self.where} holds an R ALTREP object of class {cls!r}, which this reader does not "
                            f"expand.")
        out = RObject(out.type, out.value, dict(out.attrs))
        out.attrs.update(pairlist_attrs(attrs))
        return out


def pairlist_attrs(obj: RObject) -> dict:
    """An attribute pairlist -> {name: RObject}."""
    if obj.type != "pairlist":
        return {}
    return {tag: value for tag, value in obj.value if tag is not None}


def as_strings(obj: RObject) -> list[str | None]:
    """A vector as R's as.character would print it (NA -> None)."""
    v = obj.value
    if obj.type == "character":
        return list(v)
    if obj.type == "integer":
        return [None if i == NA_INTEGER else str(int(i)) for i in v]
    if obj.type == "logical":
        return [None if i == NA_INTEGER else ("TRUE" if i else "FALSE") for i in v]
    if obj.type == "double":
        return [None if np.isnan(x) else format(float(x), ".15g") for x in v]
    raise UserError(f"An R {obj.type} vector cannot be read as strings.")


# ----------------------------------------------------------------------------- files
def decompress(data: bytes) -> bytes:
    """gzip / bzip2 / xz data by its magic bytes; anything else is returned as it is."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def unserialize(data: bytes, where: str) -> RObject:
    """One serialized R object (the module docstring)."""
    reader = _Reader(data, where)
    reader.header()
    return reader.item()


def _xz_raw(data: bytes) -> bytes:
    """R's type-3 data: a raw LZMA2 stream (R's filter chain: LZMA2 at preset 9 | extreme)."""
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    return lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters).decompress(data)


# the type byte of a type-2 / type-3 lazy-load object -> how its data decompresses
CHUNK_TYPES = {b"Z": _xz_raw, b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}


def lazyload_chunk(blob: bytes, where: str, compressed: int = 1) -> bytes:
    """One object of a lazy-load .rdb: a 4-byte big-endian length, then (compressed = 1) zlib
    data, or (compressed = 2, 3) a type byte of CHUNK_TYPES and the data."""
    if len(blob) < 5:
        raise UserError(f"{where} is damaged (an object of {len(blob)} bytes).")
    n = struct.unpack(">I", blob[:4])[0]
    kind = blob[4:5] if compressed in (2, 3) else b"1"
    body = blob[5:] if compressed in (2, 3) else blob[4:]
    if kind not in CHUNK_TYPES:
        raise UserError(f"{where} holds an object compressed in an unknown way ({kind!r}).")
    try:
        out = CHUNK_TYPES[kind](body)
    except (zlib.error, OSError, lzma.LZMAError, ValueError) as e:
        raise UserError(f"{where} holds an object that does not decompress ({e}).") from None
    if len(out) != n:
        raise UserError(f"{where} holds an object of {len(out)} bytes where its header says {n}.")
    return out


def read_lazyload(rdx: Path, names: list[str] | None = None) -> dict[str, RObject]:
    """The objects of a lazy-load database (`names`, or all) by name."""
    index = unserialize(decompress(read_file(rdx)), str(rdx))
    variables = dict(zip(index.attr("names") or [], index.value or []))
    if "variables" not in variables:
        raise UserError(f"{rdx} is not the index of an R lazy-load database (no 'variables').")
    where = dict(zip(variables["variables"].attr("names") or [], variables["variables"].value))
    compressed = int(variables["compressed"].value[0]) if "compressed" in variables else 1
    rdb = rdx.with_suffix(".rdb")
    blob = read_file(rdb)
    out = {}
    for name in names if names is not None else list(where):
        if name not in where:
            raise UserError(f"{rdx.parent} holds no R object {name!r}; it holds {shown(where)}.")
        offset, length = (int(v) for v in where[name].value[:2])
        out[name] = unserialize(lazyload_chunk(blob[offset: offset + length], str(rdb), compressed), f"{rdb} ({name})")
    return out


def read_rda(path: Path) -> dict[str, RObject]:
    """An .rda / .RData file: its objects by name."""
    data = decompress(read_file(path))
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        kind = "an R ASCII or native save file" if data[:4] in (b"RDA2", b"RDA3", b"RDB2", b"RDB3") else "not R data"
        raise UserError(f"{path} is {kind}; save.image / save with the default (XDR) format are read.")
    obj = unserialize(data[5:], str(path))
    if obj.type != "pairlist":
        raise UserError(f"{path} does not hold named R objects.")
    return {tag: value for tag, value in obj.value if tag is not None}


def read_rds(path: Path) -> dict[str, RObject]:
    """An .rds file: its one object, named after the file."""
    return {path.name.split(".")[0]: unserialize(decompress(read_file(path)), str(path))}


def read_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None


def shown(names) -> str:
    names = list(names)
    return ", ".join(names[:30]) + (f" and {len(names) - 30} more" if len(names) > 30 else "") if names else "nothing"


def is_r_file(path: str | Path) -> bool:
    """Whether `path` is read by read_r: .rda, .RData, .rds, .rdb, .rdx, or a folder with Rdata.rdx."""
    path = Path(path)
    return (path / "Rdata.rdx").is_file() or path.suffix.lower() in (".rda", ".rdata", ".rds", ".rdb", ".rdx")


def read_r(path: str | Path, name: str | None = None) -> dict[str, RObject]:
    """The R objects of a file (or of a package's data folder holding Rdata.rdx): only `name`
    when given (a UserError when absent, naming the objects there)."""
    path = Path(path).expanduser()
    if (path / "Rdata.rdx").is_file():
        path = path / "Rdata.rdx"
    if not path.exists():
        raise UserError(f"File not found: {path}.")
    suffix = path.suffix.lower()
    if suffix in (".rdb", ".rdx"):
        return read_lazyload(path.with_suffix(".rdx"), None if name is None else [name])
    objects = read_rds(path) if suffix == ".rds" else read_rda(path)
    if name is None:
        return objects
    if name not in objects:
        raise UserError(f"{path} holds no R object {name!r}; it holds {shown(objects)}.")
    return {name: objects[name]}


# ----------------------------------------------------------------------------- data frames
@dataclass
class Column:
    """A data frame column: kind "categorical" (values: list of str | None, None = NA; `levels`
    the factor's levels, or None) or "numeric" (values: float64 array, NaN = NA)."""

    kind: str
    values: object
    levels: list | None = None

    def __len__(self) -> int:
        return len(self.values)


def column(obj: RObject, name: str) -> Column:
    """One column of a data frame: factors by their levels, logical and character as strings,
    integer and double as numbers."""
    if obj.type == "integer" and "factor" in obj.classes:
        levels = obj.attr("levels") or []
        codes = np.asarray(obj.value, dtype=np.int64)
        if ((codes != NA_INTEGER) & ((codes < 1) | (codes > len(levels)))).any():
            raise UserError(f"Factor column {name!r} has codes outside its {len(levels)} levels.")
        return Column("categorical", [None if c == NA_INTEGER else levels[c - 1] for c in codes.tolist()],
                      list(levels))
    if obj.type in ("character", "logical"):
        return Column("categorical", as_strings(obj))
    if obj.type == "integer":
        v = obj.value.astype(np.float64)
        v[obj.value == NA_INTEGER] = np.nan
        return Column("numeric", v)
    if obj.type == "double":
        return Column("numeric", np.asarray(obj.value, dtype=np.float64))
    raise UserError(f"Column {name!r} is an R {obj.type} vector; a table's columns are numbers, strings, "
                    f"logicals or factors.")


def data_frame(obj: RObject, what: str = "the R object") -> tuple[list[str], list[Column]]:
    """(column names, columns) of an R data frame (or tibble, or a named list of equal-length vectors)."""
    if obj.type != "list" or not obj.attr("names"):
        cls = "/".join(obj.classes) or obj.type
        raise UserError(f"{what} is an R {cls}, not a data frame.")
    names = [n if n is not None else f"V{i + 1}" for i, n in enumerate(obj.attr("names"))]
    columns = [column(v, n) for n, v in zip(names, obj.value)]
    if len({len(c) for c in columns}) > 1:
        raise UserError(f"The columns of {what} have different lengths.")
    return names, columns
