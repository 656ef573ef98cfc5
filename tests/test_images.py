"""Image data: readers of the standard formats (on files the tests write), datasets as token rows,
batching of 2-D data, and the real Fashion-MNIST copy when ../shared/data is present."""

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from md4.data import draw_batch, eval_chunks, load_corpus
from md4.data import image_files as files
from md4.data.images import ImageTokenizer, downsample, load_images, tokenizer_for
from md4.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    for d in ([Path(os.environ["MD4_DATA"])] if os.environ.get("MD4_DATA") else []) + [REPO.parent / "shared" / "data"]:
        if (d / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file():
            return d
    return None


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """An empty $MD4_DATA and download cache; the tests put the files they need there."""
    monkeypatch.setenv("MD4_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "search_dirs", lambda: [tmp_path / "data"])
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def write_mnist_like(folder: Path, n_train: int = 100, n_test: int = 20, seed: int = 0):
    """Random 28x28 images with labels in the four gzipped IDX files of MNIST."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for name, a in arrays.items():
        files.write_idx(folder / name, a)
    return arrays


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("name,dtype", [("a.gz", np.uint8), ("b", np.uint8), ("c.gz", np.int32), ("d", np.float32)])
def test_idx_round_trip(tmp_path, name, dtype):
    a = (np.arange(2 * 3 * 5) * 37 % 251).astype(dtype).reshape(2, 3, 5)
    files.write_idx(tmp_path / name, a)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    b = files.read_idx(tmp_path / name)
    assert b.dtype == dtype and b.shape == (2, 3, 5) and np.array_equal(a, b)


def test_idx_header_by_hand(tmp_path):
    """The layout written by hand (magic 0x00000801, one big-endian size) reads back."""
    (tmp_path / "labels").write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
    assert files.read_idx(tmp_path / "labels").tolist() == [7, 0, 9]


def test_idx_damaged_files_are_user_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="not an IDX"):
        files.read_idx(tmp_path / "bad")
    files.write_idx(tmp_path / "ok", np.zeros((4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        files.read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(UserError, match="gzip"):
        files.read_idx(tmp_path / "bad.gz")


# ----------------------------------------------------------------------------- CIFAR-10
def cifar_batch(n: int, seed: int, protocol: int = 2) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A batch in the CIFAR-10 python format: {b'data': [n, 3072] planar, b'labels': [...], ...}."""
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    d = {b"batch_label": b"training batch 1 of 5", b"labels": labels,
         b"data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072), b"filenames": [b"x.png"] * n}
    return pickle.dumps(d, protocol=protocol), hwc, np.array(labels)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch(protocol):
    raw, hwc, labels = cifar_batch(5, 0, protocol)
    images, y = files.read_cifar_batch(raw)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, hwc) and np.array_equal(y, labels)
    # planar layout: data[k, c * 1024 + r * 32 + col] is channel c of pixel (r, col)
    d = pickle.loads(raw, encoding="bytes")
    assert images[3, 7, 11, 2] == d[b"data"][3, 2 * 1024 + 7 * 32 + 11]


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", ["system", "eval", "object"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "system":
        raw = pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=2)
    elif payload == "eval":
        raw = b"cbuiltins\neval\n(Vopen(%r, 'w')\ntR." % str(marker).encode()
    else:  # a harmless-looking class that is not on the allow-list
        raw = pickle.dumps({b"data": io.BytesIO(b"x"), b"labels": [0]})
    with pytest.raises(UserError, match="Refusing"):
        files.read_cifar_batch(raw)
    assert not marker.exists()


def test_cifar10_dataset_from_folder_and_archive(data_home):
    folder = data_home / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate(files.CIFAR_TRAIN + files.CIFAR_TEST):
        raw, hwc, labels = cifar_batch(10, i)
        (folder / name).write_bytes(raw)
        batches[name] = (hwc, labels)
    c = load_corpus("cifar10")
    assert (len(c.train), len(c.valid), len(c.test)) == (49, 1, 10)  # valid: the last 2% of 50 train images
    assert c.tokenizer.shape == (32, 32, 3) and c.train.shape[1] == 3072 and c.num_classes == 10
    first = batches["data_batch_1"][0][0]
    assert np.array_equal(c.train[0], first.reshape(-1))  # raster order, channels innermost
    assert np.array_equal(c.valid[0], batches["data_batch_5"][0][-1].reshape(-1))
    assert np.array_equal(c.test_labels, batches["test_batch"][1])
    # the same from cifar-10-python.tar.gz, read in memory
    tgz = data_home / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    out = files.read_cifar10(tgz)
    assert np.array_equal(out["train"][0][:50].reshape(50, -1)[:49], c.train)


# ----------------------------------------------------------------------------- ImageNet npz
def write_imagenet(path: Path, n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(1, 1001, n)
    np.savez(path, data=hwc.transpose(0, 3, 1, 2).reshape(n, -1), labels=labels, mean=np.zeros(3 * size * size))
    return hwc, labels


def test_imagenet_npz(tmp_path, data_home):
    hwc, labels = write_imagenet(tmp_path / "b.npz", 6, 8, 0)
    images, y = files.read_imagenet_npz(tmp_path / "b.npz", 8)
    assert np.array_equal(images, hwc) and np.array_equal(y, labels - 1)
    with pytest.raises(UserError, match="expected"):
        files.read_imagenet_npz(tmp_path / "b.npz", 16)
    np.savez(tmp_path / "obj.npz", data=np.array([{"a": 1}], dtype=object), labels=np.array([1]))
    with pytest.raises(UserError, match="Cannot read"):  # allow_pickle=False: object arrays refused
        files.read_imagenet_npz(tmp_path / "obj.npz", 8)
    d = data_home / "imagenet32"
    d.mkdir()
    tr1, y1 = write_imagenet(d / "train_data_batch_1.npz", 30, 32, 1)
    tr2, y2 = write_imagenet(d / "train_data_batch_2.npz", 20, 32, 2)
    te, yte = write_imagenet(d / "val_data.npz", 5, 32, 3)
    c = load_corpus("imagenet32:16")
    assert c.tokenizer.shape == (16, 16, 3) and c.num_classes == 1000
    assert (len(c.train), len(c.valid), len(c.test)) == (49, 1, 5)
    assert np.array_equal(c.test_labels, yte - 1) and np.array_equal(c.train_labels[30:], y2[:19] - 1)
    assert np.array_equal(c.test, c.tokenizer.encode(downsample(te, 16)))


# ----------------------------------------------------------------------------- binarized MNIST
def test_binarized_mnist_amat(data_home):
    d = data_home / "binarized_mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    bits = {s: rng.integers(0, 2, (n, 784)) for s, n in (("train", 7), ("valid", 3), ("test", 2))}
    for s, b in bits.items():
        (d / f"binarized_mnist_{s}.amat").write_text("\n".join(" ".join(map(str, row)) for row in b) + "\n")
    c = load_corpus("binarized-mnist")
    assert c.tokenizer.vocab_size == 2 and c.num_classes == 0 and c.labels("train") is None
    assert np.array_equal(c.valid, bits["valid"]) and np.array_equal(c.test, bits["test"])
    (d / "binarized_mnist_test.amat").write_text("0 1 2\n")
    with pytest.raises(UserError, match="amat"):
        load_corpus("binarized-mnist")


# ----------------------------------------------------------------------------- datasets as token rows
def test_fashion_mnist_layout_split_and_downsampling(data_home):
    arrays = write_mnist_like(data_home / "fashion-mnist", n_train=100, n_test=20)
    c = load_corpus("fashion-mnist")
    assert (len(c.train), len(c.valid), len(c.test)) == (98, 2, 20) and c.train.shape[1] == 784
    assert np.array_equal(c.train[5], arrays["train-images-idx3-ubyte.gz"][5].reshape(-1))
    assert np.array_equal(c.valid_labels, arrays["train-labels-idx1-ubyte.gz"][98:])
    small = load_corpus("fashion-mnist:14")
    assert small.tokenizer.shape == (14, 14, 1) and small.train.shape == (98, 196)
    img = arrays["t10k-images-idx3-ubyte.gz"][3].astype(float)
    expect = np.floor(img.reshape(14, 2, 14, 2).mean(axis=(1, 3)) + 0.5)  # 2x2 block means, rounded
    assert np.array_equal(small.test[3].reshape(14, 14), expect)
    for bad in ("fashion-mnist:5", "fashion-mnist:x", "binarized-mnist:14"):
        with pytest.raises(UserError):
            tokenizer_for(bad)


def test_missing_dataset_offline_is_one_sentence(data_home, monkeypatch):
    def offline(url, dest, timeout=60.0):
        raise UserError(f"Could not download {url} (no network); download it yourself and put it in {dest.parent}.")

    monkeypatch.setattr(files, "download", offline)
    with pytest.raises(UserError, match="Could not download"):
        load_corpus("mnist")
    with pytest.raises(UserError, match="image-net.org"):
        load_corpus("imagenet64")


def test_tokenizer_order_and_round_trip():
    tok = ImageTokenizer(2, 3, 3)
    img = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    ids = tok.encode(img)
    # token (r * W + c) * C + k is channel k of pixel (r, c)
    assert ids[(1 * 3 + 2) * 3 + 1] == img[1, 2, 1]
    assert np.array_equal(tok.decode(ids), img)
    with pytest.raises(UserError):
        ImageTokenizer(2, 2, 1, levels=2).encode(np.full((2, 2), 2))


def test_draw_batch_rows_and_labels():
    class Rows:  # row i is all i, its label i % 10
        train = np.repeat(np.arange(50, dtype=np.uint8)[:, None], 12, axis=1)

        def labels(self, which):
            return np.arange(50) % 10

    g = torch.Generator().manual_seed(0)
    x0, y = draw_batch(Rows(), 64, 12, g, labels=True)
    assert x0.shape == (64, 12) and x0.dtype == torch.long
    assert torch.equal(x0[:, 0] % 10, y) and (x0 == x0[:, :1]).all()  # whole rows with their own labels
    assert len(set(x0[:, 0].tolist())) > 20  # random rows, not the first ones
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(draw_batch(Rows(), 64, 12, g2)[0], x0)  # reproducible from the generator
    assert draw_batch(Rows(), 64, 12, torch.Generator().manual_seed(0))[1] is None  # labels only when asked
    # a data-parallel rank's rows: the two halves, each drawn from the same generator state, are the
    # batch one process draws, label dropout included
    whole = draw_batch(Rows(), 64, 12, torch.Generator().manual_seed(3), labels=True, label_dropout=0.5, null_label=10)
    halves = [draw_batch(Rows(), 64, 12, torch.Generator().manual_seed(3), rows, labels=True, label_dropout=0.5,
                         null_label=10) for rows in (slice(0, 32), slice(32, 64))]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    dropped = whole[1] == 10
    assert 10 < int(dropped.sum()) < 54 and torch.equal(whole[1][~dropped], whole[0][~dropped, 0] % 10)
    assert torch.equal(eval_chunks(Rows.train, 12), torch.as_tensor(Rows.train).long())
    with pytest.raises(UserError, match="data.length=12"):
        draw_batch(Rows(), 4, 10, g)


@pytest.mark.skipif(shared_data() is None, reason="the offline Fashion-MNIST copy (../shared/data or $MD4_DATA) is absent")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setenv("MD4_DATA", str(shared_data()))
    c = load_images("fashion-mnist")
    assert (len(c.train), len(c.valid), len(c.test)) == (58_800, 1_200, 10_000)
    assert np.bincount(c.test_labels).tolist() == [1000] * 10
    assert abs(np.concatenate([c.train, c.valid]).mean() - 72.94) < 0.01  # the README's train mean
    with gzip.open(shared_data() / "fashion-mnist" / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    assert np.array_equal(c.test[0], np.frombuffer(raw, np.uint8, 784, 16))
