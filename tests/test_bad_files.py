"""Every file md4 reads is checked for type and range before use, and every option for its range
(issue 13): one table of good files damaged one way each (or bad options), run through the `md4`
command in process. Each must end in one sentence on stderr that names the file and the field,
exit status 2, no traceback, and no file under the test's folder changed or removed."""

import json
import math
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from md4 import checkpoint
from md4.cli import main

REPO = Path(__file__).resolve().parents[1]
MERGES = next((p.resolve() for p in (REPO / ".." / "shared" / "data" / "tokenizers" / "gpt2.tiktoken",
                                     REPO / ".." / ".." / "shared" / "data" / "tokenizers" / "gpt2.tiktoken")
               if p.is_file()), None)
try:
    import tiktoken  # noqa: F401
except ImportError:
    MERGES = None
needs_gpt2 = pytest.mark.skipif(MERGES is None, reason="needs tiktoken and ../shared/data/tokenizers/gpt2.tiktoken")


# ---- good files to damage -----------------------------------------------------------------------------


class Files:
    """Good files made on demand under one folder: copies of the session's trained run and its
    model, a small prepared GPT-2 token folder, fake image datasets and an untrained image model."""

    def __init__(self, root: Path, trained_run: Path, corpus: Path, monkeypatch):
        self.root, self.trained_run, self.corpus, self.mp = root, trained_run, corpus, monkeypatch
        self.data = root / "data"  # $MD4_DATA: the image datasets
        self.data.mkdir()
        monkeypatch.setenv("MD4_DATA", str(self.data))

    def run(self) -> Path:
        run = self.root / "run"
        if not run.exists():
            shutil.copytree(self.trained_run, run)
        return run

    def newest(self, name: str) -> Path:
        """A file of the run copy's newest checkpoint."""
        return checkpoint.checkpoints(self.run())[-1] / name

    def model(self) -> Path:
        model = self.root / "model"
        if not model.exists():
            shutil.copytree(self.trained_run / "model", model)
        return model

    def resume(self) -> list[str]:
        """`md4 train` resuming the run copy with the options it was started with."""
        return ["train", "--out", str(self.run()), "--config", "tiny", "--set", f"data.corpus={self.corpus}", "--quiet"]

    def tokens(self) -> Path:
        """A prepared GPT-2 token folder written by hand (train 600 tokens, valid 200)."""
        folder = self.root / "tokens"
        if folder.exists():
            return folder
        folder.mkdir()
        rng = np.random.default_rng(0)
        splits = {}
        for split, n in (("train", 600), ("valid", 200), ("test", 0)):
            shards = []
            if n:
                rng.integers(0, 50257, n).astype("<u2").tofile(folder / f"{split}_000000.bin")
                shards.append({"file": f"{split}_000000.bin", "tokens": n})
            splits[split] = {"tokens": n, "documents": 1 if n else 0, "shards": shards}
        meta = {"format": "md4-tokens", "version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256,
                "dtype": "uint16", "splits": splits}
        (folder / "meta.json").write_text(json.dumps(meta))
        return folder

    def fashion(self, labels=None, pixels=np.uint8, levels: int = 256) -> str:
        """Fake Fashion-MNIST IDX files (40 training and 10 test images, pixel values below `levels`
        of type `pixels`); returns the corpus name at 7x7 (49 tokens)."""
        from md4.data.image_files import write_idx
        from md4.data.images import MNIST_FILES

        folder = self.data / "fashion-mnist"
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(1)
        for name, n in zip(MNIST_FILES, (40, 40, 10, 10)):
            if "labels" in name:
                write_idx(folder / name, rng.integers(0, 10, n).astype(np.uint8) if labels is None else labels[:n])
            else:
                write_idx(folder / name, rng.integers(0, levels, (n, 28, 28)).astype(pixels))
        return "fashion-mnist:7"

    def cifar(self, labels) -> str:
        """A fake cifar-10-batches-py folder: six batches of two images with `labels`."""
        from md4.data.image_files import CIFAR_TEST, CIFAR_TRAIN

        folder = self.data / "cifar-10-batches-py"
        folder.mkdir()
        for name in CIFAR_TRAIN + CIFAR_TEST:
            batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        return "cifar10"

    def image_model(self) -> Path:
        """An untrained `tiny` model folder for fashion-mnist:7 (saved as training saves one)."""
        from md4.config import load_config
        from md4.data.images import tokenizer_for
        from md4.build import Bundle, build, model_metadata

        folder = self.root / "image_model"
        if not folder.exists():
            name = self.fashion()
            cfg = load_config("tiny", [f"data.corpus={name}", "data.length=49"])
            tok = tokenizer_for(name)
            torch.manual_seed(0)
            weights = Bundle(*build(cfg, tok.vocab_size)).state_dict()
            checkpoint.save_model(folder, model_metadata(cfg, tok.vocab_size, tok.name, tok.args()), weights)
        return folder


def edit_json(where, change):
    """Damage: rewrite the JSON file where(files) with change(data) applied (in place, or its
    return value when not None)."""
    def damage(f: Files) -> None:
        path = where(f)
        data = json.loads(path.read_text())
        new = change(data)
        path.write_text(json.dumps(data if new is None else new))
    return damage


def drop(d: dict, key) -> None:
    del d[key]


def edit_text(where, change):
    def damage(f: Files) -> None:
        where(f).write_text(change(where(f).read_text()))
    return damage


def edit_weights(change):
    """Damage: change(name, tensor) -> tensor applied to every weight of the model copy."""
    def damage(f: Files) -> None:
        path = f.model() / "model.safetensors"
        save_file({k: change(k, v) for k, v in load_file(path).items()}, path)
    return damage


def edit_optim(change):
    """Damage: the newest checkpoint's optim.pt replaced by change(state) (or changed in place)."""
    def damage(f: Files) -> None:
        path = f.newest("optim.pt")
        state = torch.load(path, weights_only=True)
        new = change(state)
        torch.save(state if new is None else new, path)
    return damage


def nothing(f: Files) -> None:
    pass


def model_config(f):
    return f.model() / "config.json"


def image_config(f):
    return f.image_model() / "config.json"


def state(f):
    return f.newest("state.json")


def meta(f):
    return f.tokens() / "meta.json"


def shard0(**fields):
    """Damage: the token folder's first training shard entry in meta.json updated with fields."""
    return edit_json(meta, lambda m: m["splits"]["train"]["shards"][0].update(fields))


def state_field(key, value):
    """Damage: state.json's `key` set to value (deleted when value is KeyError)."""
    return edit_json(state, lambda s: drop(s, key) if value is KeyError else s.update({key: value}))


def symlinked_shard(f: Files) -> None:
    outside = f.root / "outside.bin"
    np.zeros(600, "<u2").tofile(outside)
    (f.tokens() / "link.bin").symlink_to(outside)
    shard0(file="link.bin")(f)


def big_token_id(f: Files) -> None:
    np.full(200, 60000, "<u2").tofile(f.tokens() / "valid_000000.bin")


# commands: files -> argv
def eval_model(f):
    return ["eval", str(f.model()), "--limit", "2"]


def eval_image_model(f):
    return ["eval", str(f.image_model()), "--limit", "2"]


def resume(f):
    return f.resume()


def eval_on(data):
    """`md4 eval` of the text model on data(files) (a path or a corpus name)."""
    return lambda f: ["eval", str(f.model()), "--data", str(data(f)), "--limit", "2"]


def sample(*options):
    return lambda f: ["sample", str(f.model()), "--num", "1", "--steps", "2", *options]


def sample_image(*options):
    return lambda f: ["sample", str(f.image_model()), "--num", "1", "--steps", "2", "--out", str(f.root / "s.png"),
                      *options]


def command(*argv):
    """A command on the text model: MODEL in argv is its folder."""
    return lambda f: [str(f.model()) if a == "MODEL" else a for a in argv]


def nan_moment(state: dict) -> None:
    state["state"][0]["exp_avg"].fill_(math.nan)


def text_corpus_for_image_model(f: Files) -> None:
    edit_json(image_config, lambda c: c["config"]["data"].update(corpus=str(f.corpus)))(f)


def nan_weights(k, v):
    return torch.full_like(v, math.nan)


def one_inf_in_head(k, v):
    return v.index_fill(0, torch.tensor([0]), math.inf) if k.endswith("head.weight") else v


def huge_head(k, v):
    """Finite weights whose logits overflow float32: inf - inf = NaN in the NELBO."""
    return v.sign() * 1e38 if "head" in k else v


# ---- the table ----------------------------------------------------------------------------------------
# (id, damage(files), command(files) -> argv, words the one-line message must hold)
CASES = [
    # a model folder's config.json (md4.pretrained.read_model_config)
    ("config.json is a list", edit_json(model_config, lambda c: [1, 2]), eval_model, ["config.json", "mapping"]),
    ("config.json vocab_size abc", edit_json(model_config, lambda c: c.update(vocab_size="abc")), eval_model,
     ["config.json", "vocab_size", "'abc'"]),
    ("config.json vocab_size -1", edit_json(model_config, lambda c: c.update(vocab_size=-1)), eval_model,
     ["config.json", "vocab_size", "-1"]),
    ("config.json vocab_size not the tokenizer's", edit_json(model_config, lambda c: c.update(vocab_size=30)),
     eval_model, ["config.json", "vocab_size", "27"]),
    ("config.json tokenizer_args a list", edit_json(model_config, lambda c: c.update(tokenizer_args=[1, 2])),
     eval_model, ["config.json", "tokenizer_args", "mapping"]),
    ("config.json tokenizer_args unknown key",
     edit_json(model_config, lambda c: c.update(tokenizer_args={"path": "/etc/passwd"})), eval_model,
     ["config.json", "tokenizer_args", "path"]),
    ("config.json tokenizer a number", edit_json(model_config, lambda c: c.update(tokenizer=5)), eval_model,
     ["config.json", "tokenizer"]),
    ("config.json format", edit_json(model_config, lambda c: c.update(format="other")), eval_model,
     ["config.json", "format"]),
    ("config.json config a string", edit_json(model_config, lambda c: c.update(config="abc")), eval_model,
     ["config.json", "config"]),
    ("config.json num_classes -3", edit_json(model_config, lambda c: c["config"]["model"].update(num_classes=-3)),
     eval_model, ["config.json", "model.num_classes", "-3"]),
    ("config.json data.length abc", edit_json(model_config, lambda c: c["config"]["data"].update(length="abc")),
     eval_model, ["config.json", "data.length"]),
    ("image config.json height abc", edit_json(image_config, lambda c: c["tokenizer_args"].update(height="abc")),
     eval_image_model, ["config.json", "tokenizer_args.height", "'abc'"]),
    ("image config.json levels 1000", edit_json(image_config, lambda c: c["tokenizer_args"].update(levels=1000)),
     eval_image_model, ["config.json", "tokenizer_args.levels", "1000"]),
    ("image config.json without width", edit_json(image_config, lambda c: drop(c["tokenizer_args"], "width")),
     eval_image_model, ["config.json", "tokenizer_args.width", "missing"]),
    ("image config.json shape not the length", edit_json(image_config, lambda c: c["tokenizer_args"].update(height=8)),
     eval_image_model, ["config.json", "data.length", "49"]),
    # a model folder's weights
    ("model.safetensors all NaN", edit_weights(nan_weights), eval_model, ["model.safetensors", "finite"]),
    ("model.safetensors one inf", edit_weights(one_inf_in_head), sample(), ["model.safetensors", "head.weight", "finite"]),
    ("logits overflow, sample", edit_weights(huge_head), sample(), ["logits", "finite"]),
    ("NELBO overflows", edit_weights(huge_head), command("eval", "MODEL", "--limit", "2", "--json"), ["NELBO", "finite"]),
    # a checkpoint's state.json (md4.checkpoint.check_state), read when md4 train resumes
    ("state.json step 1e999", edit_text(state, lambda t: re.sub(r'"step":\s*20', '"step": 1e999', t)), resume,
     ["state.json", "step", "inf"]),
    ("state.json step abc", state_field("step", "abc"), resume, ["state.json", "step", "'abc'"]),
    ("state.json step not the folder's", state_field("step", 7), resume, ["state.json", "step", "step_00000020"]),
    ("state.json run_loss abc", state_field("run_loss", "abc"), resume, ["state.json", "run_loss"]),
    ("state.json run_n -1", state_field("run_n", -1), resume, ["state.json", "run_n"]),
    ("state.json elapsed NaN", edit_text(state, lambda t: re.sub(r'"elapsed":\s*[^,}]+', '"elapsed": NaN', t)),
     resume, ["state.json", "elapsed"]),
    ("state.json without noise_rng", state_field("noise_rng", KeyError), resume, ["state.json", "noise_rng", "missing"]),
    ("state.json data_rng a number", state_field("data_rng", 5), resume, ["state.json", "data_rng"]),
    ("state.json torch_rng not base64", state_field("torch_rng", "!!not base64!!"), resume, ["state.json", "torch_rng"]),
    ("state.json torch_rng too short", state_field("torch_rng", "AAAA"), resume, ["state.json", "torch_rng"]),
    ("state.json is a list", edit_text(state, lambda t: "[1, 2]"), resume, ["state.json", "mapping"]),
    ("state.json extra key, bad step", edit_json(state, lambda s: s.update(new_key=[1], step=-20)), resume,
     ["state.json", "step", "-20"]),
    # a checkpoint's optim.pt (md4.checkpoint.check_optimizer_state)
    ("optim.pt a list", edit_optim(lambda s: [1, 2, 3]), resume, ["optim.pt", "mapping"]),
    ("optim.pt state a list", edit_optim(lambda s: {"state": [], "param_groups": []}), resume, ["optim.pt", "state"]),
    ("optim.pt without param_groups", edit_optim(lambda s: {"state": {}}), resume,
     ["optim.pt", "param_groups", "missing"]),
    ("optim.pt params a string", edit_optim(lambda s: s["param_groups"][0].update(params="abc")), resume,
     ["optim.pt", "param_groups[0].params"]),
    ("optim.pt NaN moment", edit_optim(nan_moment), resume,
     ["optim.pt", "state[0].exp_avg", "finite"]),
    # a prepared token folder's meta.json and shards (md4.data.tokens.read_meta)
    ("meta.json splits []", edit_json(meta, lambda m: m.update(splits=[])), eval_on(Files.tokens),
     ["meta.json", "splits", "mapping"]),
    ("meta.json shard without file", edit_json(meta, lambda m: drop(m["splits"]["train"]["shards"][0], "file")),
     eval_on(Files.tokens), ["meta.json", "splits.train.shards[0].file", "missing"]),
    ("meta.json dtype float32", edit_json(meta, lambda m: m.update(dtype="float32")), eval_on(Files.tokens),
     ["meta.json", "dtype"]),
    ("meta.json shard tokens abc", shard0(tokens="abc"), eval_on(Files.tokens),
     ["meta.json", "splits.train.shards[0].tokens", "'abc'"]),
    ("meta.json shard tokens -5", shard0(tokens=-5), eval_on(Files.tokens),
     ["meta.json", "splits.train.shards[0].tokens", "-5"]),
    ("meta.json shard tokens not the file's size", shard0(tokens=601), eval_on(Files.tokens),
     ["train_000000.bin", "601"]),
    ("meta.json split tokens not the shards' sum", edit_json(meta, lambda m: m["splits"]["valid"].update(tokens=7)),
     eval_on(Files.tokens), ["meta.json", "splits.valid.tokens"]),
    ("meta.json unknown split", edit_json(meta, lambda m: m["splits"].update(extra={"shards": []})),
     eval_on(Files.tokens), ["meta.json", "extra"]),
    ("meta.json vocab_size not gpt2's", edit_json(meta, lambda m: m.update(vocab_size=1000)), eval_on(Files.tokens),
     ["meta.json", "vocab_size"]),
    ("meta.json shard at an absolute path", shard0(file="/etc/passwd"), eval_on(Files.tokens),
     ["meta.json", "/etc/passwd", "outside"]),
    ("meta.json shard in a parent folder", shard0(file="../run/x.bin"), eval_on(Files.tokens),
     ["meta.json", "../run/x.bin", "outside"]),
    ("meta.json shard a symlink out", symlinked_shard, eval_on(Files.tokens), ["meta.json", "link.bin", "outside"]),
    ("token id beyond the vocabulary", big_token_id, eval_on(Files.tokens), ["valid_000000.bin", "60000"]),
    # image files (md4.data.image_files, md4.data.images)
    ("CIFAR labels strings", nothing, eval_on(lambda f: f.cifar([b"cat", b"dog"])), ["data_batch_1", "labels"]),
    ("CIFAR labels out of range", nothing, eval_on(lambda f: f.cifar([3, 10])), ["cifar10", "labels", "0..9"]),
    ("IDX labels out of range", nothing, eval_on(lambda f: f.fashion(np.full(40, 12, np.uint8))),
     ["fashion-mnist", "labels", "0..9"]),
    ("IDX labels float", nothing, eval_on(lambda f: f.fashion(np.zeros(40, np.float32))), ["labels", "float32"]),
    ("IDX pixels float", nothing, eval_on(lambda f: f.fashion(pixels=np.float32)), ["train images", "float32"]),
    ("IDX pixels beyond 255", nothing, eval_on(lambda f: f.fashion(pixels=np.int16, levels=300)),
     ["train images", "0..255"]),
    # configs, and a model given data of another kind
    ("model.num_classes -3", nothing, lambda f: ["train", "--out", str(f.root / "new"), "--config", "tiny", "--set",
                                                f"data.corpus={f.corpus}", "--set", "model.num_classes=-3"],
     ["model.num_classes", "-3"]),
    pytest.param("char model on a GPT-2 token folder", nothing, eval_on(Files.tokens), ["gpt2", "char", "tokens"],
                 marks=needs_gpt2, id="char model on a GPT-2 token folder"),
    ("char model on an image set", nothing, eval_on(Files.fashion), ["image", "char", "fashion-mnist:7"]),
    ("char model on CIFAR", nothing, eval_on(lambda f: f.cifar([3, 4])), ["image", "char", "cifar10"]),
    ("image model on a text file", nothing, lambda f: ["eval", str(f.image_model()), "--data", str(f.corpus)],
     ["image", "char", "english.txt"]),
    ("image model whose corpus became text", text_corpus_for_image_model, eval_image_model,
     ["english.txt", "image", "char"]),
    # options (issue 13, item 5)
    ("sample --steps 0", nothing, sample("--steps", "0"), ["--steps", "0"]),
    ("sample --length 0", nothing, sample("--length", "0"), ["--length", "0"]),
    ("sample --length -4", nothing, sample("--length", "-4"), ["--length", "-4"]),
    ("sample --guidance nan", nothing, sample("--guidance", "nan"), ["--guidance", "nan"]),
    ("sample --guidance inf", nothing, sample("--guidance", "inf"), ["--guidance", "inf"]),
    ("sample --block -1", nothing, sample("--block", "-1"), ["--block", "-1"]),
    ("image sample --prompt", nothing, sample_image("--prompt", "a cat"), ["--prompt", "image"]),
    ("image sample --infill", nothing, sample_image("--infill", "a _"), ["--infill", "image"]),
    ("image sample --length", nothing, sample_image("--length", "10"), ["--length", "image"]),
    ("image sample --temperature", nothing, sample_image("--temperature", "0.5"), ["--temperature", "image"]),
    ("image sample --region without --inpaint", nothing, sample_image("--region", "top"), ["--region", "--inpaint"]),
    ("text sample --region", nothing, sample("--region", "top"), ["--region", "image"]),
    ("eval --limit -1", nothing, command("eval", "MODEL", "--limit", "-1"), ["--limit", "-1"]),
    ("genppl --steps 0", nothing, command("genppl", "MODEL", "--judge", "smollm2", "--steps", "0"), ["--steps", "0"]),
    ("demo --samples 0", nothing, lambda f: ["demo", "--out", str(f.root / "demo"), "--samples", "0"], ["--samples"]),
    ("genppl --num 0", nothing, command("genppl", "MODEL", "--judge", "smollm2", "--num", "0"), ["--num", "0"]),
]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, damage, command, words",
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_file_or_option_is_one_sentence(case, damage, command, words, tmp_path, trained_run, corpus,
                                            monkeypatch, capsys):
    if MERGES is not None:
        monkeypatch.setenv("MD4_GPT2_TIKTOKEN", str(MERGES))
    torch.set_num_threads(1)
    files = Files(tmp_path, trained_run, corpus, monkeypatch)
    argv = command(files)  # makes the good files it needs
    damage(files)
    before = snapshot(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("md4: error: ") and lines[0].endswith("."), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in before} == before  # every file that was there is unchanged


def test_the_undamaged_files_work(tmp_path, trained_run, corpus, monkeypatch, capsys):
    """The table's good files, undamaged: the model evaluates, the image model evaluates on the
    fake images, and the run resumes (it has finished: nothing to train)."""
    torch.set_num_threads(1)
    f = Files(tmp_path, trained_run, corpus, monkeypatch)
    assert main(["eval", str(f.model()), "--limit", "2"]) == 0
    assert main(["eval", str(f.image_model()), "--limit", "2"]) == 0
    assert main(f.resume()) == 0
    assert main(["sample", str(f.model()), "--num", "1", "--steps", "2", "--length", "5"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "bits/token" in out
