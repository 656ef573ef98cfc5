"""Images as sequences of discrete tokens, and the image datasets.

An image [H, W, C] of 8-bit values becomes N = H * W * C tokens in raster order: row by row,
pixel by pixel, and within a pixel channel by channel (R, G, B), each token a value in
{0..255} (V = 256), or {0, 1} for binarized images (V = 2). The mask id is V. A split is a 2-D
array [M, N] (one image per row): training draws random rows instead of random crops.

Dataset names (md4.data.load_corpus accepts them like text corpora):

    fashion-mnist, mnist      28x28x1, 10 classes   gzipped IDX (downloaded when reachable)
    mnist-10k                 28x28x1, 10 classes   the offline 10,000-digit copy in ../shared/data
    binarized-mnist           28x28x1, V = 2         Larochelle's .amat files (no labels)
    cifar10                   32x32x3, 10 classes   python pickle batches (read safely)
    imagenet32, imagenet64    SxSx3, 1000 classes   downsampled ImageNet npz batches (put them in place)

`NAME:S` downsamples to SxS by averaging SxS-pixel blocks (S must divide the size), e.g.
`fashion-mnist:14`. Valid is the last 2% of the official training set (the paper kept 2% of
the training set for validation), test the official test set (mnist-10k: 8000/1000/1000,
binarized-mnist: its own 50k/10k/10k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from md4.data import image_files as files
from md4.data.corpus import SPLITS, Splits
from md4.errors import UserError

VALID_FRACTION = 0.02


class ImageTokenizer:
    """[H, W, C] images <-> [N] token sequences (raster order, channels innermost)."""

    name = "image"
    # constructor arguments in a model's config.json: whole numbers in these ranges (token ids are uint8)
    ARGS = {"height": (1, 4096), "width": (1, 4096), "channels": (1, 4), "levels": (2, 256)}

    def __init__(self, height: int, width: int, channels: int = 1, levels: int = 256):
        self.height, self.width, self.channels, self.levels = int(height), int(width), int(channels), int(levels)
        self.vocab_size = self.levels
        self.mask_id = self.levels
        self.length = self.height * self.width * self.channels

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels

    def args(self) -> dict:
        """What config.json stores to rebuild this tokenizer (md4.load)."""
        return {"height": self.height, "width": self.width, "channels": self.channels, "levels": self.levels}

    def encode(self, images) -> np.ndarray:
        """[..., H, W, C] (or [..., H, W] when C = 1) values in 0..levels-1 -> [..., N] uint8."""
        a = np.asarray(images)
        if self.channels == 1 and a.shape[-2:] == (self.height, self.width):
            a = a[..., None]
        if a.shape[-3:] != self.shape:
            raise UserError(f"Images must have shape {self.shape} (height, width, channels), got {a.shape[-3:]}.")
        check_pixels(a, self.levels)
        return a.astype(np.uint8).reshape(*a.shape[:-3], self.length)

    def decode(self, ids) -> np.ndarray:
        """[N] ids (mask id allowed) -> [H, W, C] int64; masked values stay equal to mask_id."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[-1:] != (self.length,):
            raise ValueError(f"expected sequences of {self.length} tokens, got shape {ids.shape}")
        return ids.reshape(*ids.shape[:-1], *self.shape)

    def __repr__(self) -> str:
        return f"ImageTokenizer({self.height}x{self.width}x{self.channels}, levels={self.levels})"


def check_pixels(a: np.ndarray, levels: int, source: str = "The images") -> None:
    """UserError unless every value of `a` is a whole number in 0..levels-1."""
    if a.dtype.kind not in "iub":
        raise UserError(f"{source} hold pixel values of type {a.dtype}; they must be whole numbers.")
    if a.size and (a.min() < 0 or a.max() >= levels):
        raise UserError(f"{source} hold pixel values from {a.min()} to {a.max()}; they must lie in 0..{levels - 1}.")


@dataclass(repr=False, eq=False)
class ImageCorpus(Splits):
    """Splits of token rows [M, N] uint8 with labels [M] int64 (None when the dataset has none)."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None
    valid_labels: np.ndarray | None
    test_labels: np.ndarray | None
    tokenizer: ImageTokenizer
    name: str
    num_classes: int = 0

    def labels(self, which: str) -> np.ndarray | None:
        self.split(which)
        return getattr(self, f"{which}_labels")

    def __repr__(self) -> str:
        return f"ImageCorpus({self.name!r}, {self.tokenizer}, {self.sizes()}, classes={self.num_classes})"


@dataclass(frozen=True)
class ImageDataset:
    """A registered dataset: its native shape, levels and classes, and a reader returning
    {"train": (images, labels), "test": ..., optionally "valid": ...} with images [M, H, W, C]."""

    height: int
    width: int
    channels: int
    levels: int
    num_classes: int
    read: Callable[[], dict]


MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _read_mnist_like(subdir: str, base_url: str | None, what: str) -> Callable[[], dict]:
    def read():
        d = files.fetch_dir(subdir, MNIST_FILES, base_url, what)
        x_tr, y_tr, x_te, y_te = (files.read_idx(d / f) for f in MNIST_FILES)
        return {"train": (x_tr[..., None], y_tr), "test": (x_te[..., None], y_te)}
    return read


def _read_mnist_10k() -> dict:
    d = files.fetch_dir("mnist-10k", ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"), None, "The 10k MNIST copy")
    x, y = files.read_idx(d / "images-idx3-ubyte.gz")[..., None], files.read_idx(d / "labels-idx1-ubyte.gz")
    return {"train": (x[:8000], y[:8000]), "valid": (x[8000:9000], y[8000:9000]), "test": (x[9000:], y[9000:])}


AMAT = {s: f"binarized_mnist_{s}.amat" for s in SPLITS}


def _read_binarized_mnist() -> dict:
    d = files.fetch_dir("binarized_mnist", tuple(AMAT.values()),
                        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist", "Binarized MNIST")
    return {s: (files.read_amat(d / name)[..., None], None) for s, name in AMAT.items()}


def _read_cifar10() -> dict:
    folder = files.find_dir("cifar-10-batches-py", files.CIFAR_TRAIN + files.CIFAR_TEST)
    if folder is not None:
        return files.read_cifar10(folder)
    archive = files.find_dir("", ("cifar-10-python.tar.gz",))
    path = (archive / "cifar-10-python.tar.gz") if archive else files.download(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", files.cache_dir() / "cifar-10-python.tar.gz")
    return files.read_cifar10(path)


def _read_imagenet(size: int) -> Callable[[], dict]:
    def read():
        subdir = f"imagenet{size}"
        d = files.fetch_dir(subdir, ("val_data.npz",), None, f"Downsampled ImageNet {size}x{size} (from image-net.org, "
                            f"after registering; the npz version)")
        parts = [files.read_imagenet_npz(p, size) for p in sorted(d.glob("train_data_batch_*.npz"))]
        if not parts:
            raise UserError(f"{d} has val_data.npz but no train_data_batch_*.npz files.")
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return {"train": train, "test": files.read_imagenet_npz(d / "val_data.npz", size)}
    return read


IMAGE_DATASETS: dict[str, ImageDataset] = {
    "fashion-mnist": ImageDataset(28, 28, 1, 256, 10, _read_mnist_like(
        "fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com", "Fashion-MNIST")),
    "mnist": ImageDataset(28, 28, 1, 256, 10, _read_mnist_like(
        "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist", "MNIST")),
    "mnist-10k": ImageDataset(28, 28, 1, 256, 10, _read_mnist_10k),
    "binarized-mnist": ImageDataset(28, 28, 1, 2, 0, _read_binarized_mnist),
    "cifar10": ImageDataset(32, 32, 3, 256, 10, _read_cifar10),
    "imagenet32": ImageDataset(32, 32, 3, 256, 1000, _read_imagenet(32)),
    "imagenet64": ImageDataset(64, 64, 3, 256, 1000, _read_imagenet(64)),
}


def parse_name(name: str) -> tuple[ImageDataset, int] | None:
    """"fashion-mnist:14" -> (dataset, 14); "cifar10" -> (dataset, 32); None if not an image dataset."""
    base, _, size = str(name).partition(":")
    if base not in IMAGE_DATASETS:
        return None
    ds = IMAGE_DATASETS[base]
    if not size:
        return ds, ds.height
    if not size.isdigit() or int(size) < 1 or ds.height % int(size) or ds.width != ds.height:
        raise UserError(f"In {name!r} the size after ':' must divide {ds.height} (e.g. {base}:{ds.height // 2}).")
    if ds.levels != 256:
        raise UserError(f"{base} cannot be downsampled (its pixels are binary).")
    return ds, int(size)


def is_image_corpus(name: str) -> bool:
    return parse_name(name) is not None


def tokenizer_for(name: str) -> ImageTokenizer:
    """The tokenizer of image dataset `name` (its shape after any downsampling)."""
    ds, size = parse_name(name)
    return ImageTokenizer(size, size * ds.width // ds.height, ds.channels, ds.levels)


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """[M, H, W, C] uint8 -> [M, size, size, C]: the rounded mean of each block of pixels."""
    M, H, W, C = images.shape
    if size == H:
        return images
    f = H // size
    blocks = images.reshape(M, size, f, size, f, C).astype(np.float32).mean(axis=(2, 4))
    return np.floor(blocks + 0.5).astype(np.uint8)


def load_images(name: str, *, min_length: int = 0) -> ImageCorpus:
    """Read image dataset `name` (see the module docstring) as token rows with labels."""
    ds, size = parse_name(name)
    tok = tokenizer_for(name)
    raw = ds.read()
    if "valid" not in raw:  # the last 2% of the training set
        (x, y), n = raw["train"], len(raw["train"][0])
        cut = n - max(1, round(VALID_FRACTION * n))
        raw["train"], raw["valid"] = (x[:cut], None if y is None else y[:cut]), (x[cut:], None if y is None else y[cut:])
    out = {}
    for s in SPLITS:
        images, labels = raw[s]
        if images.dtype != np.uint8 or ds.levels != 256:  # else every value is in range
            check_pixels(images, ds.levels, f"The {s} images of {name!r}")
        out[s] = tok.encode(downsample(images, size))
        out[f"{s}_labels"] = None if labels is None else files.class_labels(
            labels, len(images), f"The {s} split of {name!r}", ds.num_classes)
    return ImageCorpus(**out, tokenizer=tok, name=name, num_classes=ds.num_classes)

