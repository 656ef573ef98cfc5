"""text8: the first 100M characters of a 2006 English Wikipedia dump, already reduced to
a-z and space (Mahoney). Split by the standard convention: 90M train, 5M valid, 5M test.

The file is used exactly as it is (it starts with a space), not re-normalized, so the splits
match published numbers. `text8` or `text8.zip` is looked for in an explicit path, $MD4_DATA and
~/.cache/md4; if absent, text8.zip is downloaded to the cache.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from md4.data.chars import CharTokenizer
from md4.data.corpus import DEFAULT_FRACTIONS, Corpus, cache_dir, data_dirs, download, read_bytes, split_corpus
from md4.errors import UserError

URL = "http://mattmahoney.net/dc/text8.zip"
FILE_NAMES = ("text8", "text8.zip")


def find_text8(path: str | Path | None = None) -> Path | None:
    """The explicit path if given (a file, or a folder holding text8 / text8.zip), else the
    first text8 or text8.zip in data_dirs(); None if there is none."""
    dirs = data_dirs() if path is None else [Path(path).expanduser()]
    if path is not None and not dirs[0].is_dir():
        return dirs[0]  # a file; read_text8 reports it if missing
    for d in dirs:
        for name in FILE_NAMES:
            if (d / name).is_file():
                return d / name
    if path is not None:
        raise UserError(f"Neither text8 nor text8.zip is in {dirs[0]}.")
    return None


def is_zip(path) -> None:
    """OSError unless the downloaded file is a zip archive (a proxy's HTML page is not)."""
    if not zipfile.is_zipfile(path):
        raise OSError("the downloaded file is not a zip archive")


def read_text8(path: str | Path) -> bytes:
    """The raw characters of a text8 file, plain or zipped (the single member, or 'text8')."""
    raw = read_bytes(path)
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        return raw
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            names = z.namelist()
            member = "text8" if "text8" in names else names[0] if len(names) == 1 else None
            if member is None:
                raise UserError(f"{path} holds no member named text8 (it has {len(names)} files).")
            return z.read(member)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"Cannot read the zip archive {path}: {e}.") from None


def load_text8(
    path: str | Path | None = None,
    *,
    min_length: int = 2,
    fractions=DEFAULT_FRACTIONS,
    allow_download: bool = True,
) -> Corpus:
    """text8 split 90/5/5 (of the real 100M file: exactly 90M / 5M / 5M)."""
    found = find_text8(path)
    if found is None:
        places = " or ".join(str(d) for d in data_dirs())
        if not allow_download:
            raise UserError(f"text8 was not found; put text8.zip or text8 (from {URL}) in {places}.")
        found = download(URL, cache_dir() / "text8.zip", check=is_zip, put=f"text8.zip or text8 in {places}")
    raw = read_text8(found)
    try:
        ids = CharTokenizer().encode(raw)
    except UserError:
        raise UserError(f"{found} is not a text8 file: it has characters other than a-z and space.") from None
    return split_corpus(ids, "text8", fractions=fractions, min_length=min_length)
