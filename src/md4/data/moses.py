"""The MOSES benchmark's molecules (Polykovskiy et al. 2020) as SMILES strings.

The PyPI package `molsets` ships them as moses/dataset/data/{train,test}.csv.gz (1,584,663
and 176,074 molecules; a header line `SMILES`). They are read directly from the installed
package's folder, which is located without importing it (its imports pull in packages that do
not install today). Install it with `pip install --no-deps molsets` (a 52 MB wheel), or put the
two files in $MD4_DATA/moses/ or ~/.cache/md4/moses/.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from md4.data.corpus import data_dirs
from md4.errors import UserError

FILES = {"train": "train.csv.gz", "test": "test.csv.gz"}


def moses_dir() -> Path | None:
    """The folder holding train.csv.gz and test.csv.gz: $MD4_DATA/moses, the cache, then molsets."""
    candidates = [d / "moses" for d in data_dirs()]
    spec = importlib.util.find_spec("moses")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "dataset" / "data" for p in spec.submodule_search_locations]
    return next((d for d in candidates if all((d / f).is_file() for f in FILES.values())), None)


def read_smiles_csv(path: Path) -> list[str]:
    """The first column of a CSV of SMILES with a header line."""
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read the MOSES file {path} ({type(e).__name__}).") from None
    return [line.split(",", 1)[0] for line in lines[1:] if line]


def read_moses() -> dict[str, list[str]]:
    """{"train": [...], "test": [...]}: the MOSES train and test SMILES."""
    folder = moses_dir()
    if folder is None:
        raise UserError("The MOSES molecules were not found: pip install --no-deps molsets, or put train.csv.gz "
                        f"and test.csv.gz in {data_dirs()[-1] / 'moses'}.")
    return {split: read_smiles_csv(folder / name) for split, name in FILES.items()}
