"""Image models end to end on a few synthetic images: train, `md4 eval` in bits/dim, `md4 sample`
pictures (grid, trace, inpainting), md4.load; and bits per dimension against an exact answer."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import md4
from md4 import pictures
from md4.cli import main
from md4.data import image_files as files
from md4.evaluate import sequence_nelbo, summarize


def png_size(path) -> tuple[int, int]:
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])  # width, height


def test_png_writer_round_trip(tmp_path):
    """zlib-decode the IDAT of our PNG and compare the pixels."""
    import zlib

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    raw = pictures.write_png(tmp_path / "x.png", rgb).read_bytes()
    assert png_size(tmp_path / "x.png") == (7, 5)
    n = struct.unpack(">I", raw[33:37])[0]
    assert raw[37:41] == b"IDAT"
    rows = np.frombuffer(zlib.decompress(raw[41:41 + n]), np.uint8).reshape(5, 1 + 21)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(5, 7, 3), rgb)


def test_bits_per_dim_of_the_uniform_model_is_eight():
    """A denoiser predicting 1/256 everywhere: E[NELBO] = N log 256 (1 - eps) exactly (shared/MATH.md:
    weight (1 - 2 eps) / (1 - alpha_t) times E[#masked] = N (1 - alpha_t), plus N eps log V)."""
    x0 = torch.randint(0, 256, (600, 49), generator=torch.Generator().manual_seed(0))
    uniform = lambda xt, t: torch.zeros(*xt.shape, 256)  # noqa: E731
    nelbo = sequence_nelbo(md4.MD4(256), uniform, x0, mc_samples=2, batch_size=200)
    r = summarize(nelbo, 49)
    assert r["bits_per_token"] == pytest.approx(r["nats_per_sequence"] / (49 * math.log(2)))
    assert abs(r["bits_per_token"] - 8 * (1 - 1e-4)) < 4 * r["bits_per_token_se"]
    assert 0 < r["bits_per_token_se"] < 0.1


def synthetic_fashion(folder, n_train=60, n_test=12):
    """Class k: a bright horizontal bar at rows 2k..2k+5 on a dark background, a little noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)

    def images(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, 2 * k: 2 * k + 6] = 220
        return x, y

    (xtr, ytr), (xte, yte) = images(n_train), images(n_test)
    for name, a in (("train-images-idx3-ubyte.gz", xtr), ("train-labels-idx1-ubyte.gz", ytr),
                    ("t10k-images-idx3-ubyte.gz", xte), ("t10k-labels-idx1-ubyte.gz", yte)):
        files.write_idx(folder / name, a)


def train_images(tmp_path, monkeypatch, *sets: str) -> Path:
    """Train a tiny class-conditional model on synthetic Fashion-MNIST at 7x7; `sets` override the defaults."""
    monkeypatch.setattr(files, "search_dirs", lambda: [tmp_path / "data"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    synthetic_fashion(tmp_path / "data" / "fashion-mnist")
    run = tmp_path / "run"
    base = ["data.corpus=fashion-mnist:7", "data.length=49", "model.dim=32", "model.layers=1", "model.heads=2",
            "model.cond_dim=16", "train.steps=12", "train.batch_size=8", "train.eval_every=6", "train.ckpt_every=6",
            "train.threads=1", "train.max_minutes=0", "train.ema=0.9", "sample.steps=8"]
    args = ["train", "--config", "fashion-mnist", "--out", str(run), "--quiet"]
    assert main(args + [a for s in base + list(sets) for a in ("--set", s)]) == 0
    return run


@pytest.fixture
def image_run(tmp_path, monkeypatch):
    return train_images(tmp_path, monkeypatch)


def test_train_eval_sample_images(image_run, tmp_path, capsys):
    m = md4.load(image_run)
    assert m.tokenizer.shape == (7, 7, 1) and m.num_classes == 10 and m.net.positions is not None
    capsys.readouterr()
    assert main(["eval", str(image_run), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["unit"] == "bits/dim" and r["class_conditional"] and r["sequences"] == 12
    assert 0 < r["bits_per_token"] < 9 and r["bits_per_token_se"] > 0
    assert main(["eval", str(image_run), "--split", "test"]) == 0
    assert "bits/dim given the class" in capsys.readouterr().out

    g, t = tmp_path / "g.png", tmp_path / "t.png"
    assert main(["sample", str(image_run), "--num", "4", "--label", "3", "--guidance", "1.5", "--out", str(g),
                 "--trace", str(t), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["grid"] == str(g) and png_size(g) == (2 * 58 + 2, 2 * 58 + 2)  # 2x2 grid of 7x7 images at 8x
    assert png_size(t) == (9 * 58 + 2, 4 * 58 + 2)  # 9 frames (8 steps + the result), one row per sample
    i = tmp_path / "i.png"
    assert main(["sample", str(image_run), "--num", "3", "--inpaint", str(i), "--region", "bottom"]) == 0
    assert png_size(i) == (3 * 58 + 2, 3 * 58 + 2)  # originals, masked inputs, completions

    for bad in (["--label", "12"], ["--label", "x"], ["--guidance", "2"], ["--region", "middle", "--inpaint", str(i)]):
        assert main(["sample", str(image_run), "--num", "2", "--out", str(g)] + bad) == 2
    assert "error" in capsys.readouterr().err


def test_inpainting_keeps_known_pixels(image_run):
    m = md4.load(image_run)
    images = torch.randint(0, 256, (3, 49), generator=torch.Generator().manual_seed(0))
    for region in pictures.REGIONS:
        r = pictures.inpaint(m, images, image_run / f"{region}.png", region, labels=torch.tensor([0, 5, 9]),
                             guidance_weight=1.0, steps=6, progress=False)
        keep = r["known_mask"]
        assert 0 < keep[0].sum() < 49
        assert torch.equal(r["completions"][keep], images[keep])
        assert (r["completions"] < 256).all()


def test_pictures_flag_needs_an_image_model(trained_run, tmp_path):
    assert main(["sample", str(trained_run), "--num", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["sample", str(trained_run), "--num", "1", "--label", "1"]) == 2


def test_micro_batches_train_class_conditional_images(tmp_path, monkeypatch):
    """Gradient accumulation (the torchrun code path in one process) on labelled images; the step itself
    is compared with a hand computation in tests/test_distributed.py."""
    run = train_images(tmp_path, monkeypatch, "train.steps=4", "train.micro_batch=4", "train.eval_every=4",
                       "train.log_every=1", "method=genmd4", "model.time_cond=true")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_bpc"] for r in recs if "loss_bpc" in r]
    assert len(losses) == 4 and all(0 < v < 20 for v in losses)
    assert md4.load(run).num_classes == 10
