"""Files that survive a kill at any moment: atomic writes, training checkpoints, model folders.

A training checkpoint is a folder `checkpoints/step_00001234/` holding
    model.safetensors   network weights          ema.safetensors   EMA weights
    optim.pt            AdamW state (tensors and numbers only; loaded with weights_only=True)
    state.json          step, RNG and data-order states (base64), anything else JSON-able
It is written under a temporary name and renamed into place, so a folder with a final name is
always complete. A model folder (`config.json` + `model.safetensors`) is written the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from md4.errors import UserError
from md4.validate import check, fail, field, finite_tensors, mapping

STEP_DIR = re.compile(r"step_(\d+)")


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
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` to `final`, replacing an older one without a gap in
    which neither exists: the old folder is renamed aside first and removed last."""
    _fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


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
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors_cpu(weights), str(tmp / "model.safetensors"))
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
    tmp = folder / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors_cpu(model), str(tmp / "model.safetensors"))
    save_file(tensors_cpu(ema), str(tmp / "ema.safetensors"))
    torch.save(optim, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}) + "\n")
    replace_dir(tmp, final)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp_step_*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


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
STATE_NUMBERS = {"run_loss": None, "run_gnorm": 0, "elapsed": 0}


def check_state(state, path: Path) -> dict:
    """state.json checked: `step` a whole number >= 0 equal to the folder's step, the RNG states
    base64 text (a CPU generator's state where RNG_STATES says so), the running means run_loss,
    run_gnorm, the count run_n >= 0 and `elapsed` seconds >= 0 where present. Other keys pass
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
