"""Training metric sinks (md4.logsinks): train.log, the same records everywhere, jsonl truncation on resume."""

import glob
import importlib.util
import json

import pytest

from md4 import logsinks
from md4.cli import main
from md4.config import load_config
from md4.errors import UserError

OPTIONAL = [n for n in ("tensorboard", "wandb") if importlib.util.find_spec(n)]


class Recorder:
    """A sink that keeps what it receives."""

    records: list = []

    def __init__(self, run_dir, resume_step, config):
        self.config = config

    def log(self, step, values):
        Recorder.records.append({"step": step, **values})

    def close(self):
        Recorder.records.append("closed")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, corpus):
    """A tiny run logged to the recorder and to every optional sink that is installed (W&B offline)."""
    run = tmp_path_factory.mktemp("sinks") / "run"
    Recorder.records = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(logsinks.SINKS, "recorder", Recorder)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(run))
        log = "[" + ",".join(["recorder", *OPTIONAL]) + "]"
        assert main(["train", "--config", "tiny", "--out", str(run), "--quiet", "--set", f"data.corpus={corpus}",
                     "--set", f"train.log={log}", "--set", "train.steps=6", "--set", "train.eval_every=3"]) == 0
    return run


def jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_sink_gets_the_same_records(logged_run):
    recs = jsonl(logged_run)
    assert Recorder.records == recs + ["closed"]
    assert {r["step"] for r in recs} == set(range(1, 7))
    assert [r["step"] for r in recs if "valid_bpc" in r] == [3, 6]


def test_tensorboard_events_match_jsonl(logged_run):
    if "tensorboard" not in OPTIONAL:
        pytest.skip("tensorboard is not installed (pip install 'md4[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run / "tensorboard"))
    acc.Reload()
    recs = jsonl(logged_run)
    for key in ("loss_bpc", "valid_bpc", "lr"):
        events = [(e.step, e.value) for e in acc.Scalars(key)]
        want = [(r["step"], r[key]) for r in recs if key in r]
        assert [s for s, _ in events] == [s for s, _ in want]
        assert [v for _, v in events] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32


def wandb_history(path) -> dict:
    """{step: {key: value}} from an offline W&B run file (run-*.wandb): a 7-byte header, then
    LevelDB-log blocks of 32 KiB whose records (4-byte checksum, 2-byte length, 1-byte type: full,
    first, middle, last) carry W&B's protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, buf, rows = open(path, "rb").read(), 7, b"", {}
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                rows[rec.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def test_wandb_offline_run_matches_jsonl(logged_run):
    if "wandb" not in OPTIONAL:
        pytest.skip("wandb is not installed (pip install 'md4[wandb]')")
    files = glob.glob(str(logged_run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1 and (logged_run / "wandb_id").read_text().strip() in files[0]  # the id a resume continues
    want = {}
    for r in jsonl(logged_run):  # W&B merges the records of one step into one row
        want.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
    assert wandb_history(files[0]) == want


def test_jsonl_keeps_only_steps_up_to_the_resume_step(tmp_path):
    lines = [json.dumps({"step": s, "loss_bpc": s / 10}) for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:7]) + "\n{torn line\n" + "\n".join(lines[7:]) + "\n")
    sink = logsinks.Jsonl(tmp_path, 5, {})
    sink.log(6, {"loss_bpc": 0.25})
    sink.close()
    assert jsonl(tmp_path) == [json.loads(x) for x in lines[:5]] + [{"step": 6, "loss_bpc": 0.25}]


def test_sink_names(monkeypatch):
    monkeypatch.setattr(logsinks, "installed", lambda name: name != "wandb")
    assert logsinks.sink_names([]) == ["jsonl", "tensorboard"]  # the default: tensorboard when installed
    assert logsinks.sink_names(["jsonl"]) == ["jsonl"]
    assert logsinks.sink_names(["tensorboard", "jsonl", "tensorboard"]) == ["jsonl", "tensorboard"]
    with pytest.raises(UserError, match=r"train.log names wandb, but wandb is not installed \(pip install \"md4\[wandb\]\"\)"):
        logsinks.sink_names(["wandb"])
    with pytest.raises(UserError, match="Unknown train.log sink 'mlflow'"):
        logsinks.sink_names(["mlflow"])
    monkeypatch.setattr(logsinks, "installed", lambda name: False)
    assert logsinks.sink_names([]) == ["jsonl"]


def test_config_key():
    assert load_config("tiny").train.log == []
    assert load_config("tiny", ["train.log=[wandb, tensorboard]"]).train.log == ["wandb", "tensorboard"]
    assert load_config("tiny", ["train.log=wandb,jsonl"]).train.log == ["wandb", "jsonl"]
    assert load_config("tiny", ["train.log=[]"]).train.log == []
    with pytest.raises(UserError, match="Config key train.log expects a value of type list"):
        load_config("tiny", ["train.log=3"])


def test_unknown_sink_fails_before_the_run_writes(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(run), "--quiet", "--set", f"data.corpus={corpus}",
                 "--set", "train.log=[mlflow]"]) == 2
    assert capsys.readouterr().err.strip() == ("md4: error: Unknown train.log sink 'mlflow'; choose from jsonl, "
                                               "tensorboard, wandb.")
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
