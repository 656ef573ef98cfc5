"""Files that survive a kill at any moment: atomic writes, training checkpoints, model folders.

A training checkpoint is a folder `checkpoints/step_00001234/` holding
    model.safetensors   network weights          ema.safetensors   EMA weights
    optim.pt            AdamW state (tensors and numbers only; loaded with weights_only=True)
    state.json          step, RNG and data-order states (base64), anything else JSON-able
It is written under a temporary name unique to the process (`.tmp_step_00001234.PID`) and renamed
into place, so a folder with a final name is always complete. A model folder (`config.json` +
`model.safetensors`) is written the same way.

One process writes a run folder: `lock_run` holds an OS lock on `RUN/.lock` (fcntl.flock) that
the OS releases when the process ends, even by kill -9; the holder removes what killed writers
left (`remove_debris`). An OS error while writing (a full disk, a read-only folder) leaves the
temporary name removed and is raised as OSError naming the file, whichever library wrote it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from md4.errors import UserError
from md4.validate import check, fail, field, finite_tensors, mapping

STEP_DIR = re.compile(r"step_(\d+)")
DEBRIS = re.compile(r"\.tmp_step_.*|\..+\.(tmp|old)\d+")  # temporary names of this module's writers
LOCK = ".lock"


@contextlib.contextmanager
def naming(path: Path):
    """Give an OSError raised inside (os.fsync, a file object's write) the path it concerns."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


@contextlib.contextmanager
def removed_on_error(path: Path):
    """Remove the temporary file or folder `path` if the block raises (a full disk, Ctrl-C)."""
    try:
        yield
    except BaseException:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with naming(f), open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with removed_on_error(tmp):
        with naming(tmp), open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` to `final`, replacing an older one without a gap in
    which neither exists: the old folder is renamed aside first and removed last (and put back
    if the move fails)."""
    _fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    aside = final.exists()
    if aside:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside:
            os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_tensors(tensors: dict, path: Path) -> None:
    """safetensors file of `tensors` (moved to CPU); its I/O errors are raised as OSError."""
    try:
        save_file(tensors_cpu(tensors), str(path))
    except SafetensorError as e:  # e.g. "I/O error: No space left on device (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


class _Sink:
    """A file object that remembers the OSError of a failed write: torch.save reports it as a
    RuntimeError without the cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj, path: Path) -> None:
    """torch.save(obj) to `path` (tensors and plain containers); its I/O errors are raised as OSError."""
    with naming(path), open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None
        f.flush()


def tensors_cpu(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def encode_state(t: torch.Tensor) -> str:
    """An RNG state (uint8 tensor) as base64 text for JSON."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def decode_state(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# ----------------------------------------------------------------------------- model folders
def save_model(folder: Path, config: dict, weights: dict) -> None:
    """Write `config.json` + `model.safetensors` to `folder` atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_error(tmp):
        tmp.mkdir()
        with naming(tmp / "config.json"):
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tensors(weights, tmp / "model.safetensors")
        replace_dir(tmp, folder)


def read_weights(path: Path) -> dict:
    """The tensors of a safetensors file, every floating-point one finite."""
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"Weights file {path} is missing.")
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise UserError(f"Weights file {path} is corrupt or truncated ({type(e).__name__}).")
    finite_tensors(weights, path)
    return weights


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"File {path} is missing.")
    except (OSError, ValueError) as e:
        raise UserError(f"File {path} is unreadable or not valid JSON ({type(e).__name__}).")


def load_into(module: torch.nn.Module, weights: dict, source: Path) -> None:
    """Load `weights` into `module`, with one clear sentence if names or shapes differ."""
    check_weights(module, weights, source)
    module.load_state_dict(weights)


def check_weights(module: torch.nn.Module, weights: dict, source: Path) -> None:
    """UserError unless `weights` has exactly the module's names and (global) shapes."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"Weights in {source} do not match the model configuration ({what}).")
    for k, v in weights.items():
        if v.shape != own[k].shape:
            raise UserError(f"Weights in {source} do not match the model configuration: {k} has shape "
                            f"{tuple(v.shape)}, the model expects {tuple(own[k].shape)} (different vocabulary or size?).")


# ----------------------------------------------------------------------------- training checkpoints
def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def save_checkpoint(run_dir: Path, step: int, model: dict, ema: dict, optim: dict, state: dict,
                    keep: int = 2) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp_step_{step:08d}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_error(tmp):
        tmp.mkdir()
        save_tensors(model, tmp / "model.safetensors")
        save_tensors(ema, tmp / "ema.safetensors")
        save_torch(optim, tmp / "optim.pt")
        with naming(tmp / "state.json"):
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}) + "\n")
        replace_dir(tmp, final)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_debris(run_dir: Path) -> None:
    """Remove the temporary files and folders that killed writers left in a run folder. Call it
    only while holding the run's lock (`lock_run`): then every such name is a dead process's."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        for p in folder.iterdir() if folder.is_dir() else ():
            if DEBRIS.fullmatch(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def first_missing(path: Path) -> Path | None:
    """The top folder that creating `path` (with its parents) would make; None if it exists."""
    path = Path(path)
    return next((p for p in (*reversed(path.parents), path) if not p.exists()), None)


def lock_run(run_dir: Path) -> int:
    """Take the run folder's exclusive lock (creating the folder); returns the descriptor that
    holds it (os.close releases it, and so does the end of the process, however it ends).
    UserError when another process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is an existing file, not a run folder; choose another --out.")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):  # fail now, not at the first checkpoint
        raise UserError(f"Run folder {run_dir} is not writable (read-only file system or permissions).")
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"Run folder {run_dir} is being written by another md4 process; wait for it to end "
                        f"or choose another --out.") from None
    return fd


def load_checkpoint(folder: Path) -> dict:
    """{"model", "ema", "optim", "state"} from a checkpoint folder, each checked (finite weights,
    check_optimizer_state, check_state); UserError if damaged."""
    folder = Path(folder)
    try:
        optim = torch.load(folder / "optim.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"Checkpoint {folder} is incomplete: optim.pt is missing.")
    except Exception as e:
        raise UserError(f"Checkpoint {folder} is corrupt or truncated: optim.pt cannot be read ({type(e).__name__}).")
    return {
        "model": read_weights(folder / "model.safetensors"),
        "ema": read_weights(folder / "ema.safetensors"),
        "optim": check_optimizer_state(optim, folder / "optim.pt"),
        "state": check_state(read_json(folder / "state.json"), folder / "state.json"),
    }


# state.json: the RNG states (base64) and which of them hold a CPU generator's state
RNG_STATES = {"data_rng": True, "noise_rng": False, "torch_rng": True, "cuda_rng": False}
OPTIONAL_RNG = ("cuda_rng",)  # saved by runs on a GPU only
# state.json: optional numbers -> lower bound (None: any finite number)
STATE_NUMBERS = {"run_loss": None, "run_gnorm": 0, "elapsed": 0, "warmup_elapsed": 0}


def check_state(state, path: Path) -> dict:
    """state.json checked: `step` a whole number >= 0 equal to the folder's step, the RNG states
    base64 text (a CPU generator's state where RNG_STATES says so), the running means run_loss,
    run_gnorm, the count run_n >= 0, `elapsed` and `warmup_elapsed` seconds >= 0 and the text
    noise_device where present. Other keys pass
    unchanged. Returns a copy with numbers as int / float."""
    path = Path(path)
    state = dict(mapping(state, "the top level", path))
    state["step"] = field(state, "step", int, path, lo=0)
    named = STEP_DIR.fullmatch(path.parent.name)
    if named and state["step"] != int(named.group(1)):
        raise fail("step", path, f"is {state['step']}, but the checkpoint folder is {path.parent.name}")
    cpu_size = torch.get_rng_state().numel()
    for key, cpu in RNG_STATES.items():
        if key in OPTIONAL_RNG and key not in state:
            continue
        text = field(state, key, str, path)
        try:
            size = len(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise fail(key, path, "is not base64 text") from None
        if size == 0 or (cpu and size != cpu_size):
            raise fail(key, path, f"holds {size} bytes, not a random generator's state of {cpu_size}")
    for key, lo in STATE_NUMBERS.items():
        if key in state:
            state[key] = field(state, key, float, path, lo=lo)
    if "run_n" in state:
        state["run_n"] = field(state, "run_n", int, path, lo=0)
    if "noise_device" in state:  # the kind of device noise_rng was saved on
        field(state, "noise_device", str, path)
    return state


# AdamW hyperparameters in optim.pt's param_groups: finite numbers >= 0 where present
OPTIM_NUMBERS = ("lr", "eps", "weight_decay", "lr_scale")


def check_optimizer_state(optim, path: Path) -> dict:
    """optim.pt checked for what torch.optim.Optimizer.load_state_dict needs:
    {"state": {parameter (index, or name under FSDP): {name: finite tensor or number}},
     "param_groups": [{"params": [indices or names], "lr", "betas", "eps", "weight_decay", ...}]}."""
    mapping(optim, "the top level", path)
    state, groups = field(optim, "state", dict, path), field(optim, "param_groups", list, path)
    for key, per_param in state.items():
        name = f"state[{key!r}]" if isinstance(key, str) else f"state[{key}]"
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise fail("state", path, f"must be keyed by parameter numbers or names, got {key!r}")
        for k, v in mapping(per_param, name, path).items():
            if not isinstance(v, torch.Tensor):
                check(v, float, f"{name}.{k}", path)
        finite_tensors(per_param, path, prefix=f"{name}.")
    for i, group in enumerate(groups):
        name = f"param_groups[{i}]"
        mapping(group, name, path)
        for p in field(group, "params", list, path, prefix=f"{name}."):
            if not isinstance(p, (int, str)) or isinstance(p, bool):
                raise fail(f"{name}.params", path, f"must list parameter numbers or names, got {p!r}")
        for key in OPTIM_NUMBERS:
            field(group, key, float, path, lo=0, default=0.0, prefix=f"{name}.")
        betas = group.get("betas", (0.0, 0.0))
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise fail(f"{name}.betas", path, f"must be two numbers in [0, 1), got {betas!r}")
        for b in betas:
            if check(b, float, f"{name}.betas", path, lo=0) >= 1:
                raise fail(f"{name}.betas", path, f"must be two numbers in [0, 1), got {betas!r}")
    return optim
