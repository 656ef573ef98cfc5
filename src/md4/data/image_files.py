"""Readers for image datasets in their standard file formats, and where the files are looked for.

    read_idx(path)             MNIST / Fashion-MNIST gzipped (or raw) IDX -> ndarray
    read_cifar_batch(bytes)    one CIFAR-10 python batch -> (images [M, 32, 32, 3] uint8, labels [M])
    read_cifar10(path)         the cifar-10-batches-py folder or cifar-10-python.tar.gz -> train, test
    read_imagenet_npz(path)    one downsampled-ImageNet npz batch -> (images [M, S, S, 3], labels [M] 0-based)
    read_amat(path)            binarized MNIST .amat text -> [M, 28, 28] uint8 in {0, 1}

CIFAR-10 batches are Python pickles, and a pickle can run code when loaded. They are read with a
restricted unpickler that can build only what the batches hold (dicts, lists, bytes, strings,
numbers and numpy arrays); anything else is refused before it runs. The npz files are read with
allow_pickle=False. Every other format is parsed directly.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from md4.data.corpus import cache_dir, data_dirs, download, read_bytes
from md4.errors import UserError

# IDX type codes (the third byte of the magic number) -> numpy dtype (big-endian).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def search_dirs() -> list[Path]:
    """Folders searched for dataset folders: $MD4_DATA, the download cache, then ../shared/data
    (beside the current folder or the repository), where the development copies live."""
    repo_root = Path(__file__).resolve().parents[3]
    return data_dirs() + [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]


def find_dir(subdir: str, required: tuple[str, ...]) -> Path | None:
    """The first search_dirs()/subdir holding every file in `required`, else None."""
    for d in search_dirs():
        if all((d / subdir / f).is_file() for f in required):
            return d / subdir
    return None


def fetch_dir(subdir: str, files: tuple[str, ...], base_url: str | None, what: str) -> Path:
    """The folder holding `files` (see find_dir), downloading them into the cache when allowed."""
    found = find_dir(subdir, files)
    if found is not None:
        return found
    places = " or ".join(str(d / subdir) for d in data_dirs())
    if base_url is None:
        raise UserError(f"{what} was not found; put {', '.join(files)} in {places}.")
    dest = cache_dir() / subdir
    for name in files:
        if not (dest / name).is_file():
            download(f"{base_url}/{name}", dest / name)
    return dest


# ----------------------------------------------------------------------------- IDX (MNIST)
def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """An IDX file's bytes (gzipped or not) -> ndarray of the shape its header gives."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{source} is not a valid gzip file ({e}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise UserError(f"{source} is not an IDX file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != header + count * dtype.itemsize:
        raise UserError(f"{source} is truncated or damaged: its header promises shape {shape}.")
    return np.frombuffer(raw, dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    return parse_idx(read_bytes(path), str(path))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an IDX file (gzipped when compress, default: when the name ends in .gz)."""
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}[array.dtype]
    raw = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw += array.astype(np.dtype(IDX_DTYPES[code])).tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    Path(path).write_bytes(gzip.compress(raw, mtime=0) if compress else raw)


# ----------------------------------------------------------------------------- CIFAR-10 pickles
def _numpy_builder(name: str):
    """numpy's own array-rebuilding function `name` (_reconstruct or _frombuffer)."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return getattr(multiarray if name == "_reconstruct" else numeric, name)


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only containers, strings, numbers and numpy arrays; refuses every other global.

    Containers and scalars need no globals at all; a numpy array is rebuilt through
    numpy's `_reconstruct(ndarray, shape, dtype)` + `__setstate__` (protocols <= 4) or
    `_frombuffer(bytes, dtype, shape, order)` (protocol 5), and a Python 3 pickle of protocol 2
    encodes bytes with `_codecs.encode`. Those are the only names allowed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if name in ("_reconstruct", "_frombuffer"):
            return _numpy_builder(name)
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def safe_unpickle(raw: bytes, source: str = "pickle"):
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:
        raise UserError(f"Refusing to read {source}: it is not a plain CIFAR-style pickle ({e}).") from None


def read_cifar_batch(raw: bytes, source: str = "CIFAR batch") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch ({b'data': [M, 3072] uint8 planar R, G, B; b'labels': [M]}) ->
    images [M, 32, 32, 3] uint8 (height, width, channel) and labels [M] int64."""
    d = safe_unpickle(raw, source)
    if not isinstance(d, dict):
        raise UserError(f"{source} does not hold a dict of data and labels.")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
        raise UserError(f"{source} lacks 'data' [M, 3072] or 'labels'.")
    if data.dtype != np.uint8:
        raise UserError(f"{source} holds 'data' of type {data.dtype}, not uint8 pixel values.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), class_labels(labels, len(data), source)


def class_labels(labels, count: int, source: str, num_classes: int | None = None) -> np.ndarray:
    """`labels` as [count] int64, checked: whole numbers (not strings or floats), one per image,
    each in 0..num_classes-1 when num_classes is given; else a UserError naming `source`."""
    try:
        a = np.asarray(labels)
    except ValueError:  # ragged nesting
        a = np.asarray([None])
    if a.dtype.kind not in "iu" or a.ndim != 1:
        kind = a.dtype if a.dtype.kind != "O" else "mixed objects"
        raise UserError(f"{source} holds labels of type {kind} with shape {a.shape}; they must be "
                        f"{count} whole class numbers.")
    if len(a) != count:
        raise UserError(f"{source} has {count} images but {len(a)} labels.")
    if num_classes is not None and len(a) and (a.min() < 0 or a.max() >= num_classes):
        raise UserError(f"{source} holds labels from {a.min()} to {a.max()}; they must lie in 0..{num_classes - 1}.")
    return a.astype(np.int64)


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)


def read_cifar10(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": ...} from the cifar-10-batches-py folder or the
    cifar-10-python.tar.gz archive (read in memory; nothing is extracted)."""
    path = Path(path)
    if path.is_dir():
        raw = {name: read_bytes(path / name) for name in CIFAR_TRAIN + CIFAR_TEST}
    else:
        raw = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and name in CIFAR_TRAIN + CIFAR_TEST:
                        raw[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"Cannot read the CIFAR-10 archive {path}: {e}.") from None
        missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if n not in raw]
        if missing:
            raise UserError(f"The CIFAR-10 archive {path} lacks {missing[0]}.")
    out = {}
    for split, names in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        parts = [read_cifar_batch(raw[n], f"{path}/{n}") for n in names]
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


# ----------------------------------------------------------------------------- downsampled ImageNet
def read_imagenet_npz(path: str | Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One npz batch of downsampled ImageNet (Chrabaszcz et al. 2017): 'data' [M, 3 S S] uint8
    planar, 'labels' [M] in 1..1000 -> images [M, S, S, 3] uint8 and labels [M] int64 in 0..999."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data, labels = f["data"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise UserError(f"Cannot read the ImageNet batch {path} (an npz with 'data' and 'labels'): {e}.") from None
    if data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise UserError(f"{path}: 'data' has shape {data.shape}, expected [M, {3 * size * size}] for {size}x{size}.")
    labels = class_labels(np.asarray(labels).reshape(-1), len(data), str(path)) - 1
    if len(labels) and (labels.min() < 0 or labels.max() > 999):
        raise UserError(f"{path}: 'labels' must be {len(data)} class numbers in 1..1000.")
    return data.astype(np.uint8).reshape(-1, 3, size, size).transpose(0, 2, 3, 1).copy(), labels


# ----------------------------------------------------------------------------- binarized MNIST
def read_amat(path: str | Path) -> np.ndarray:
    """Binarized MNIST (Larochelle & Murray 2011) .amat: one image per line, 784 values 0/1 ->
    [M, 28, 28] uint8."""
    try:
        a = np.loadtxt(io.BytesIO(read_bytes(path)), dtype=np.uint8, ndmin=2)
    except ValueError as e:
        raise UserError(f"{path} is not a binarized-MNIST .amat file ({e}).") from None
    if a.shape[1] != 784 or a.max(initial=0) > 1:
        raise UserError(f"{path} is not a binarized-MNIST .amat file: expected rows of 784 zeros and ones.")
    return a.reshape(-1, 28, 28)
