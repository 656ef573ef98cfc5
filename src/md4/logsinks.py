"""Where training metrics go. Every sink receives the same records: a step and a dict of numbers.

    train:
      log: [tensorboard, wandb]     # metrics.jsonl is always written; [] = tensorboard when installed

Sinks, by name (SINKS): `jsonl` (metrics.jsonl in the run folder, one JSON object per line: the
run's own record, read by the training curve and `md4 push`), `tensorboard` (events under
tensorboard/) and `wandb` (Weights & Biases; WANDB_MODE=offline keeps it on disk, WANDB_PROJECT
names the project, default "md4"). A sink is a class built as cls(run_dir, resume_step, config)
with log(step, values) and close(). On resume, each sink drops or overwrites what a killed run
logged after its last checkpoint (jsonl: lines with step > resume_step; TensorBoard: purge_step;
W&B: the same run id, whose steps must increase, so values re-logged for steps it already saw
are ignored by W&B).
"""

from __future__ import annotations

import json
from pathlib import Path

from md4.checkpoint import naming, write_text_atomic
from md4.errors import UserError


class Jsonl:
    """metrics.jsonl: {"step": s, **values} per line, flushed at every record."""

    def __init__(self, run_dir: Path, resume_step: int, config: dict):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():  # drop what a killed run logged after its last checkpoint
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                    kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")

    def log(self, step: int, values: dict) -> None:
        with naming(self.path):  # a full disk: an OSError naming the file
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard:
    """TensorBoard events in run_dir/tensorboard, one scalar per value."""

    requires = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run named after the run folder; its id is kept in run_dir/wandb_id so a
    resumed training run continues the same W&B run. Files go under run_dir/wandb."""

    requires = "wandb"

    def __init__(self, run_dir: Path, resume_step: int, config: dict):
        import os
        import secrets

        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        write_text_atomic(id_file, run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "md4"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)

    def log(self, step: int, values: dict) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


SINKS = {"jsonl": Jsonl, "tensorboard": TensorBoard, "wandb": Wandb}


def installed(name: str) -> bool:
    """Whether the package a sink needs can be imported."""
    import importlib.util

    need = getattr(SINKS[name], "requires", None)
    return need is None or importlib.util.find_spec(need) is not None


def sink_names(log: list[str]) -> list[str]:
    """The sinks for config value train.log: jsonl first, then the named ones (each once); an empty
    list means tensorboard when installed. A UserError for an unknown or uninstalled sink."""
    for name in log:
        if name not in SINKS:
            raise UserError(f"Unknown train.log sink {name!r}; choose from {', '.join(SINKS)}.")
        if not installed(name):
            raise UserError(f"train.log names {name}, but {SINKS[name].requires} is not installed "
                            f"(pip install \"md4[{name}]\").")
    wanted = list(log) or [n for n in ("tensorboard",) if installed(n)]
    return ["jsonl"] + [n for i, n in enumerate(wanted) if n != "jsonl" and n not in wanted[:i]]


class Metrics:
    """All sinks of a run as one: log(step, **values) gives every sink the same record.

    A new run (resume_step 0, no metrics.jsonl yet) opens the sinks at once. A resumed run holds
    its records in memory until `commit` (md4.train calls it after each checkpoint) and only then
    opens the sinks, which drop what a killed run logged after its last checkpoint: a resume that
    fails before its first checkpoint (a NaN loss, a full disk) leaves every sink's files as they were."""

    def __init__(self, run_dir: Path, resume_step: int, log: list[str] = (), config: dict | None = None):
        self.names = sink_names(list(log))  # every name checked before any sink writes
        self.args = (Path(run_dir), resume_step, config or {})
        self.sinks, self.held = None, []
        if resume_step == 0 and not (Path(run_dir) / "metrics.jsonl").exists():
            self.commit()

    def log(self, step: int, **values) -> None:
        if self.sinks is None:
            self.held.append((step, values))
            return
        for sink in self.sinks:
            sink.log(step, values)

    def commit(self) -> None:
        """Open the sinks (once) and give them the records held so far."""
        if self.sinks is None:
            self.sinks = [SINKS[n](*self.args) for n in self.names]
            for step, values in self.held:
                self.log(step, **values)
            self.held = []

    def close(self) -> None:
        for sink in self.sinks or []:
            sink.close()
