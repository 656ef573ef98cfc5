"""The Hugging Face Hub: repo ids, loading from the Hub cache offline, `md4 push` against a fake HfApi.

Nothing here touches the network: loading runs with HF_HUB_OFFLINE=1 over a cache folder laid
out as huggingface_hub lays it out, and pushing goes to monkeypatched HfApi methods."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from md4 import hub, publish
from md4.cli import main


def user_error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("md4: error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("text, parsed", [
    ("org/name", ("org/name", None)),
    ("my-org/tiny.v2@main", ("my-org/tiny.v2", "main")),
    ("org/name@0123abcd", ("org/name", "0123abcd")),
    ("runs/demo", ("runs/demo", None)),  # a missing local folder of this form is looked up on the Hub
    ("name", None), ("/abs/path", None), ("./org/name", None), ("a/b/c", None),
    ("org/na--me", None), ("org/../x", None), ("-org/name", None), ("org/name@", None),
])
def test_parse_repo_id(text, parsed):
    assert hub.parse_repo_id(text) == parsed


def test_existing_folder_is_never_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("org/name") == Path("org/name")  # local first, even when it looks like a repo id
    assert hub.resolve("no/such/folder") == Path("no/such/folder")  # not a repo id: left to model_folder


def hub_cache(root: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """A Hub cache folder (HF_HUB_CACHE) holding `repo_id`: snapshots/<commit>/ copied from the
    given folders, refs/<branch> naming a commit. Returns the cache folder."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit, src in snapshots.items():
        dest = repo / "snapshots" / commit
        dest.mkdir(parents=True)
        for f in src.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    for branch, commit in refs.items():
        (repo / "refs" / branch).write_text(commit)
    return root


OFFLINE_SCRIPT = r"""
import json, sys, torch, md4
from md4.cli import main
local, out = sys.argv[1], {}
hubm, ref = md4.load("org/tiny"), md4.load(local)
out["same_weights"] = all(torch.equal(a, b) for a, b in zip(hubm.net.state_dict().values(), ref.net.state_dict().values()))
out["source"] = str(hubm.source)
out["old_steps"] = md4.load("org/tiny@" + "b" * 40).config.sample.steps
out["kw_steps"] = md4.load("org/tiny", revision="b" * 40).config.sample.steps
out["sample_rc"] = main(["sample", "org/tiny", "--num", "2", "--steps", "4", "--json"])
out["missing_rc"] = main(["eval", "org/absent"])
print("\nRESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def staged(trained_run, tmp_path_factory):
    pytest.importorskip("huggingface_hub", reason="the hub extra (pip install 'md4[hub]') is not installed")
    return publish.stage(trained_run, "org/tiny", tmp_path_factory.mktemp("staged"))


def test_load_from_hub_cache_offline(trained_run, staged, tmp_path):
    """md4.load("org/tiny"), "org/tiny@<commit>" and `md4 sample org/tiny` resolve through the Hub
    cache with HF_HUB_OFFLINE=1 (a fresh process: huggingface_hub reads its settings at import)."""
    older = tmp_path / "older"
    older.mkdir()
    (older / "model.safetensors").write_bytes((staged / "model.safetensors").read_bytes())
    meta = json.loads((staged / "config.json").read_text())
    meta["config"]["sample"]["steps"] = 7
    (older / "config.json").write_text(json.dumps(meta))
    cache = hub_cache(tmp_path / "hub", "org/tiny", {"a" * 40: staged, "b" * 40: older}, {"main": "a" * 40})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(trained_run)], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.split("RESULT ")[-1])
    assert out["same_weights"]
    assert Path(out["source"]) == cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    assert out["old_steps"] == out["kw_steps"] == 7  # the pinned revision, not main
    assert out["sample_rc"] == 0
    samples = json.loads(r.stdout.split("RESULT ")[0].strip().splitlines()[-1])["samples"]
    assert len(samples) == 2 and all(len(s) == 32 for s in samples)
    assert out["missing_rc"] == 2
    assert "md4: error: No model or run folder at org/absent, and the Hub model org/absent is not in the local " \
           "cache" in r.stderr


def test_model_card(trained_run, staged):
    card = (staged / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "md4" and front["license"] == "apache-2.0"
    assert {"md4", "masked-diffusion"} <= set(front["tags"]) and front["pipeline_tag"] == "text-generation"
    recs = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last_valid = [r for r in recs if "valid_bpc" in r][-1]
    last_train = [r for r in recs if "loss_bpc" in r][-1]
    assert f"| {last_train['step']} | {last_train['loss_bpc']:.4f} | {last_valid['valid_bpc']:.4f} " \
           f"(step {last_valid['step']}) |" in card
    assert 'md4.load("org/tiny")' in card and "md4 sample org/tiny" in card
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == cfg  # the training config, whole
    import md4

    n = sum(p.numel() for p in md4.load(trained_run).net.parameters())
    assert f"{n:,} parameters" in card
    for name in ("config.json", "model.safetensors"):
        assert (staged / name).read_bytes() == (trained_run / "model" / name).read_bytes()


def test_push_uploads_through_hfapi(trained_run, monkeypatch, capsys, tmp_path):
    hf = pytest.importorskip("huggingface_hub", reason="the hub extra (pip install 'md4[hub]') is not installed")
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload_folder", repo_id, files))
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    monkeypatch.setattr(hf.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hf.HfApi, "upload_folder", upload_folder)
    assert main(["push", str(trained_run), "org/tiny", "--private"]) == 0
    assert "pushed to https://hub.invalid/org/tiny/commit/1" in capsys.readouterr().out
    (c1, repo1, kw), (c2, repo2, files) = calls
    assert (c1, repo1, kw["private"], kw["exist_ok"]) == ("create_repo", "org/tiny", True, True)
    assert (c2, repo2, sorted(files)) == ("upload_folder", "org/tiny", ["README.md", "config.json", "model.safetensors"])
    assert files["model.safetensors"] == (trained_run / "model" / "model.safetensors").read_bytes()

    def refuse(self, repo_id, **kw):
        raise hf.errors.LocalTokenNotFoundError("no token")

    monkeypatch.setattr(hf.HfApi, "create_repo", refuse)
    assert "No Hugging Face token" in user_error(capsys, ["push", trained_run, "org/tiny"])


def test_push_errors_and_local_out(trained_run, tmp_path, capsys):
    assert "is not a Hub repo id" in user_error(capsys, ["push", trained_run, "not a repo", "--out", tmp_path / "x"])
    assert "is not a Hub repo id" in user_error(capsys, ["push", trained_run, "org/tiny@v1", "--out", tmp_path / "x"])
    assert "No model or run folder" in user_error(capsys, ["push", tmp_path / "none", "org/tiny", "--out", tmp_path / "x"])
    assert not (tmp_path / "x").exists()
    assert main(["push", str(trained_run), "org/tiny", "--out", str(tmp_path / "card"), "--license", "mit"]) == 0
    assert sorted(p.name for p in (tmp_path / "card").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "license: mit" in (tmp_path / "card" / "README.md").read_text()
