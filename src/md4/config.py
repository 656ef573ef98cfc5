"""Typed configs: dataclasses loaded from small YAML presets, overridable with `key=value`.

    cfg = load_config("demo", overrides=["model.layers=4", "train.lr=1e-3"])

Presets live in md4/presets/*.yaml; a path to a YAML file works too. Unknown keys and values
of the wrong type are user errors (one sentence, exit status 2 from the CLI). A run folder's
config.yaml is the run's config: a resume may change only the keys in RESUME_KEYS
(`check_resume`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from md4.errors import UserError

PRESETS = Path(__file__).parent / "presets"


def _check_range(section, prefix: str, name: str, low: float, high: float = float("inf"),
                 low_open: bool = False, high_open: bool = False) -> None:
    """A number must lie in [low, high] (ends excluded where *_open), and be finite."""
    value = getattr(section, name)
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == float("inf") else "]"
        raise UserError(f"Config key {prefix}.{name} must lie in {lo}{low:g}, {high:g}{hi}, got {value!r}.")


def _check_positive(section, prefix: str, names: tuple[str, ...]) -> None:
    """Sizes and intervals must be at least 1 (a zero would divide by zero or build an empty model)."""
    for name in names:
        value = getattr(section, name)
        if isinstance(value, int) and value < 1:
            raise UserError(f"Config key {prefix}.{name} must be at least 1, got {value}.")


@dataclass
class ModelConfig:
    """The network: `arch` names a backbone of md4.nn.BACKBONES, which reads the keys it uses:
    the transformer (md4.nn.Transformer) dim ... pos2d, the U-Net (md4.nn.UNet, images) unet_*;
    time_cond, num_classes and dropout serve both."""

    arch: str = "transformer"
    dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    glu: bool = True
    time_cond: bool = False  # adaLN-zero conditioning on t; off = time-independent network
    cond_dim: int = 128
    dropout: float = 0.0
    num_classes: int = 0  # > 0: class-conditional (label embedding in the adaLN path); data must have labels
    pos2d: bool = False  # images: learned row/column/channel embeddings added to the tokens
    # arch unet: width, width multiplier per resolution (each next one halves the image), residual
    # blocks per resolution, feature-map heights with self-attention after each block, heads
    unet_ch: int = 128
    unet_mults: list[int] = field(default_factory=lambda: [1])
    unet_res_blocks: int = 32
    unet_attn_res: list[int] = field(default_factory=list)
    unet_heads: int = 1

    def __post_init__(self):
        from md4.nn import BACKBONES

        if self.arch not in BACKBONES:
            raise UserError(f"Config key model.arch must be one of {', '.join(BACKBONES)}, got {self.arch!r}.")
        _check_positive(self, "model", ("dim", "layers", "heads", "cond_dim",
                                        "unet_ch", "unet_res_blocks", "unet_heads"))
        if not self.unet_mults or min(self.unet_mults) < 1:
            raise UserError(f"Config key model.unet_mults must list widths of at least 1, got {self.unet_mults}.")
        _check_range(self, "model", "mlp_ratio", 0, low_open=True)
        _check_range(self, "model", "dropout", 0, 1, high_open=True)
        _check_range(self, "model", "num_classes", 0)


@dataclass
class DataConfig:
    corpus: str = "shakespeare"  # a registered corpus name or a path to a text file
    length: int = 256  # sequence length N

    def __post_init__(self):
        _check_positive(self, "data", ("length",))


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 100  # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema: float = 0.9999  # EMA decay of the weights used for evaluation and sampling; 0 = off
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    bf16: str = "auto"  # autocast to bfloat16: auto = on GPU and on CPUs with native bf16; "true" / "false"
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4  # validation batches per periodic evaluation
    ckpt_every: int = 200
    keep: int = 2  # checkpoints kept
    max_minutes: float = 0.0  # stop early after this much training time (0 = no limit)
    # under torchrun (md4.distributed): data-parallel mode, and rows per forward pass
    parallel: str = "ddp"  # ddp (replicas) or fsdp (fully sharded, FSDP2)
    micro_batch: int = 0  # 0 = the whole per-process batch (batch_size / processes); else accumulate
    compile: bool = False  # torch.compile the network
    # the method's own parameters (GenMD4's schedule exponents): lr = schedule_lr_scale * lr
    schedule_lr_scale: float = 1.0
    schedule_weight_decay: float = 0.0  # GenMD4: decays log w, i.e. pulls w towards 1 (linear)
    label_dropout: float = 0.1  # class-conditional models: P(label -> null label), for classifier-free guidance
    log: list[str] = field(default_factory=list)  # sinks besides metrics.jsonl (md4.logsinks); [] = tensorboard if installed

    def __post_init__(self):
        _check_positive(self, "train", ("steps", "batch_size", "log_every", "eval_every", "eval_batches", "ckpt_every"))
        _check_range(self, "train", "lr", 0, 1e30, low_open=True)  # beyond float32 range AdamW overflows
        for name in ("warmup", "weight_decay", "grad_clip", "max_minutes", "threads", "keep"):
            _check_range(self, "train", name, 0)
        for name in ("min_lr_ratio", "ema"):
            _check_range(self, "train", name, 0, 1, high_open=name == "ema")
        for name in ("beta1", "beta2"):
            _check_range(self, "train", name, 0, 1, high_open=True)
        _check_range(self, "train", "label_dropout", 0, 1)


@dataclass
class SampleConfig:
    steps: int = 256
    grid: str = "cosine"
    num: int = 4

    def __post_init__(self):
        from md4.sampling import GRIDS

        _check_positive(self, "sample", ("steps", "num"))
        if self.grid not in GRIDS:
            raise UserError(f"Config key sample.grid must be one of {', '.join(GRIDS)}, got {self.grid!r}.")


@dataclass
class Config:
    method: str = "md4"
    schedule: str = "linear"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, key: str):
    """value (from YAML or a command line string) as the field's type, or a UserError."""
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
        if isinstance(value, str) and typ is float:  # YAML reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
    if typing.get_origin(typ) is list:  # [a, b], "a,b" on the command line, or one item
        item = typing.get_args(typ)[0]
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        items = [v.strip() if isinstance(v, str) else v for v in items]
        if item is not str or all(isinstance(v, str) for v in items):  # no numbers in a list of names
            return [_coerce(v, item, key) for v in items if v != ""]
    if typ is bool and isinstance(value, bool):
        return value
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, (str, int, float, bool)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    raise UserError(f"Config key {key} expects a value of type {typ.__name__}, got {value!r}.")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"Config section {prefix.rstrip('.') or '(top)'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"Unknown config key {prefix}{unknown[0]}; known keys: {', '.join(sorted(names))}.")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, prefix + name)
    return cls(**kwargs)


def set_key(d: dict, assignment: str) -> None:
    """Apply "a.b=value" to the nested dict d (the value is parsed as YAML later, by type)."""
    if "=" not in assignment:
        raise UserError(f"An override must look like key=value, got {assignment!r}.")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise UserError(f"Config key {key} does not name a section.")
    d[leaf] = value


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"Cannot read config file {path}: {e.strerror}.")
    except yaml.YAMLError as e:
        raise UserError(f"Config file {path} is not valid YAML ({str(e).splitlines()[0]}).")
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must hold a mapping of keys to values.")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_config(name_or_path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A preset name (see preset_names()) or a YAML path, then `key=value` overrides."""
    data: dict = {}
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix and (PRESETS / f"{name_or_path}.yaml").exists():
            path = PRESETS / f"{name_or_path}.yaml"
        elif not path.exists():
            raise UserError(f"No config preset or file named {name_or_path!r}; presets: {', '.join(preset_names())}.")
        data = read_yaml(path)
    _method_alias(data)
    for assignment in overrides:
        set_key(data, assignment)
        _method_alias(data, override=True)
    return from_dict(Config, data)


def _method_alias(data: dict, override: bool = False) -> None:
    """The top-level key `diffusion` is another name for `method` (`--set diffusion=genmd4`); an
    override replaces the file's method, a file must not give both with different values."""
    if "diffusion" not in data:
        return
    alias = data.pop("diffusion")
    if not override and "method" in data and str(data["method"]) != str(alias):
        raise UserError(f"Config keys method ({data['method']}) and diffusion ({alias}) disagree; set one of them.")
    data["method"] = alias


# Keys that may differ between a run's config.yaml and the config it is resumed with, and why:
RESUME_KEYS = (
    # how long the run lasts (raise them to extend a run; the cosine decay is stretched from the
    # resumed step on, so the extended run is not one that was planned that long from the start)
    "train.steps", "train.max_minutes",
    # what is logged, evaluated and kept: the training step reads none of them (evaluation uses its
    # own seeded generator and the EMA weights), so the weights stay bit-identical on CPU
    "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every", "train.keep", "train.log",
    # how the same arithmetic runs: the data order, random draws and update rule are the same,
    # float rounding may differ (moving to another kind of device reseeds the diffusion noise)
    "train.threads", "train.device", "train.bf16", "train.compile",
    # sampling defaults stored with the model; training never reads them
    "sample.steps", "sample.grid", "sample.num",
)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resume(saved: Config, asked: Config, source: str) -> None:
    """UserError naming the keys outside RESUME_KEYS where `asked` differs from the run's `saved`
    config (read from `source`, the run's config.yaml)."""
    old, new = flatten(saved.to_dict()), flatten(asked.to_dict())
    differ = [k for k in new if new[k] != old.get(k) and k not in RESUME_KEYS]
    if differ:
        values = ", ".join(f"{k} ({new[k]!r}, saved {old.get(k)!r})" for k in differ)
        sections: dict[str, list[str]] = {}
        for key in RESUME_KEYS:
            section, name = key.split(".")
            sections.setdefault(section, []).append(name)
        allowed = " and ".join(f"{s}.{{{', '.join(names)}}}" for s, names in sections.items())
        raise UserError(f"These options differ from the run's {source}: {values}; a resume may change only "
                        f"{allowed}, so drop them (the saved config is used) or train in another folder.")
