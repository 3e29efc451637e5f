"""Typed, nested run configuration: YAML recipe + `section.key=value` overrides -> validated `Config`.

Every field has a type and a docstring-like comment; unknown keys, wrong types and inconsistent
values raise `UserError` naming the key, the value and what is accepted, before any work starts.
The checks are `validate.py`'s (what the config alone says, here; what needs the data's facts or the launch,
when a run starts). No file is read but the YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcgan_dist.errors import UserError
from dcgan_dist.registry import SPECTRAL_NORMS
from dcgan_dist.validate import validate


@dataclass
class RunConfig:
    name: str = "default"  # run name; also the default directory name under runs/
    dir: str = ""  # run directory; empty -> runs/<run.name>


@dataclass
class DataConfig:
    name: str = "mnist5k"  # one of registry.DATASETS; store: a store prepared by dcgan-prepare, at data.root
    root: str = "data"  # (registry.DATA_ROOT) datasets' files, an image folder, a store (data.name=store)
    download: bool = False  # let torchvision download mnist/fashion_mnist/cifar10 into data.root
    cache_dir: str = ""  # stores prepared on first use, evaluation classifiers (empty: ~/.cache/dcgan_dist)
    wait_minutes: float = 60.0  # the longest wait for another process preparing the same cached store/classifier
    num_images: int | None = None  # use a fixed random subset of this many images (None = all)
    skip_bad_files: bool = False  # imagefolder: skip (and count) files that cannot be decoded instead of stopping
    background: int = 255  # image files: the grey level (0..255) transparent pixels are composited onto
    fit: str = "resize"  # a built-in set's images to model.image_size: resize | pad (centred on black, unresampled)


@dataclass
class EmaConfig:
    decay: float = 0.0  # EMA of G's weights after every G step; 0 = off (e.g. 0.999)
    warmup_steps: int = 0  # the decay ramps linearly from 0 to `decay` over this many steps; 0 = no ramp


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # dcgan | mlp (the original fully connected GAN)
    image_size: int = 64  # one of registry.IMAGE_SIZES
    channels: int = 0  # image channels; 0 = the dataset's own (1 for MNIST, a store's own, else 3)
    latent_dim: int = 100  # size of z
    g_width: int = 64  # G's channel width unit (DCGAN: 64 -> 512,256,128,64 at 64x64)
    d_width: int = 64  # D's channel width unit
    norm: str = "batch"  # batch | none
    sync_bn: bool = False  # synchronized BatchNorm across ranks
    num_classes: int = 0  # class-conditional G and D for this many classes (the dataset's count); 0 = unconditional
    cond: str = "projection"  # label path of a conditional model: projection (Miyato & Koyama) | concat (cDCGAN)
    spectral_norm: str = "none"  # spectral normalization: none | d (D's layers) | both (D's and G's)
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class LossConfig:
    name: str = "bce"  # bce (the seed's objective) | hinge
    g_loss: str = "non_saturating"  # bce only: non_saturating (-log D(G(z))) | minimax (log(1 - D(G(z))))
    real_target: float = 1.0  # bce only: D's target for real images; 0.9 = one-sided label smoothing
    g_target: float = 1.0  # bce non_saturating only: G's target for D(G(z)); the seed uses 0.9


@dataclass
class OptimConfig:
    lr_g: float = 2e-4  # G's Adam learning rate (DCGAN's 2e-4)
    lr_d: float = 2e-4  # D's Adam learning rate; a larger one than G's is the two-timescale rule (TTUR)
    beta1: float = 0.5  # Adam's first-moment decay (DCGAN's 0.5; PyTorch's default 0.9 trains GANs worse)
    beta2: float = 0.999  # Adam's second-moment decay


@dataclass
class TrainConfig:
    steps: int = 1000  # generator steps in total
    batch_size: int = 128  # per rank
    global_batch_size: int | None = None  # if set: per-rank batch = this / world size (must divide)
    seed: int = 0  # initial weights, data order, noise, augmentation: the same seed gives the same run
    mixed_precision: str = "no"  # no | fp16 (CUDA only) | bf16 | auto (bf16 where the hardware has it, else no)
    channels_last: bool = False  # NHWC weights and images: faster convolutions on CUDA (bf16/fp16) and on CPU
    augment: str = ""  # differentiable augmentation of all that D sees, e.g. translation,cutout (augment.py)
    compile: bool = False  # torch.compile G and D (first steps slower while it compiles; needs a C++ compiler)
    cuda_graphs: bool = False  # replay the whole step as one CUDA graph: one CUDA process, fp32 or bf16, no sync BN
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only the final one (and on preemption)
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time passed since the last; 0 = off
    max_minutes: float = 0.0  # end the run as if finished after this much wall time (set-up included); 0 = no limit
    keep_last: int = 3  # checkpoints kept, newest first ...
    keep_every: int = 0  # ... plus every checkpoint on a multiple of this many steps, forever; 0 = none
    collective_timeout_s: int = 600  # a rank waiting longer than this in a collective fails the job (no hang)
    check_consistency_every: int = 0  # steps between cross-rank checks that G and D are identical; 0 = off
    eval_every: int = 0  # steps between sample-quality evaluations (dcgan-eval's metrics, logged as eval/*); 0 = off
    eval_num: int = 1000  # generated images per evaluation, split across the ranks
    eval_protocol: str = ""  # FID/KID by this registry.FID_PROTOCOLS name, reference made once; empty: if fid-stats ran
    keep_best: str = ""  # keep checkpoints/best by this eval metric, e.g. classifier/fd; empty = off
    on_nonfinite: str = "skip"  # a step with inf/NaN gradients is never applied; skip: go on | stop: end the run
    max_consecutive_skips: int = 10  # skip: end the run after more non-finite steps than this in a row
    resume: str = "auto"  # auto: continue from run_dir/checkpoints/latest if any | never | PATH to a checkpoint


@dataclass
class WandbConfig:
    project: str = "dcgan_dist"  # W&B project
    entity: str = ""  # team or user; empty = your default
    name: str = ""  # display name; empty = run.name
    group: str = ""  # W&B group, to compare runs side by side; empty = none
    tags: list[str] = field(default_factory=list)  # W&B tags, e.g. [mnist, baseline]
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    log_checkpoints: bool = False  # upload the final and the best generator (safetensors + meta.json) as artifacts


@dataclass
class LogConfig:
    every: int = 50  # steps between metric lines (reduced over ranks and over the interval)
    sample_every: int = 500  # steps between fixed-noise sample grids; 0 = only at the end
    num_samples: int = 64  # images in the fixed-noise grid
    progress: bool = True  # tqdm bar on rank 0
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False  # also log to TensorBoard (run_dir/tensorboard-style event files; needs tensorboard)
    curves: bool = True  # at the end of a run, every metric of metrics.jsonl drawn into run_dir/curves.png


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    def model_kwargs(self, channels: int) -> tuple[dict, dict]:
        """The plain kwargs that rebuild G and D (stored in every checkpoint's meta.json); `channels`: the
        images' (`data.sources.facts`: model.channels, else the dataset's own)."""
        m, common = self.model, dict(channels=channels, image_size=self.model.image_size, arch=self.model.arch,
                                     num_classes=self.model.num_classes, cond=self.model.cond)
        sn_g, sn_d = SPECTRAL_NORMS[m.spectral_norm]
        return (dict(latent_dim=m.latent_dim, width=m.g_width, norm=m.norm, spectral_norm=sn_g, **common),
                dict(width=m.d_width, norm=m.norm, spectral_norm=sn_d, **common))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Recipe file (or the defaults) + `a.b=value` overrides -> validated Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=200)")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _OverrideText(text)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} not found; pass an existing recipe, e.g. --config configs/mnist5k.yaml")
    try:
        raw = yaml.safe_load(p.read_text())  # safe_load: a config never constructs Python objects
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise UserError(f"config file {path}{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (run, data, model, ...)")
    return raw


class _OverrideText(str):
    """A value from the command line: parsed as YAML, then coerced to the field's type."""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + str(unknown[0])
        raise UserError(f"unknown config key {key}; accepted keys here: {', '.join(sorted(names))}")
    values = {}
    for name in raw:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], hint, prefix + name)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a value against a field type (str, int, float, bool, or X | None)."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if isinstance(value, _OverrideText):
        if hint is str:
            return str(value)
        try:
            value = yaml.safe_load(str(value))
        except yaml.YAMLError:
            raise UserError(f"{key}={value!s}: cannot parse the value; expected {hint.__name__}") from None
    if value is None and optional:
        return None
    if typing.get_origin(hint) is list:  # list[str]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{key} = {value!r} has the wrong type; expected a list of strings, e.g. [a, b]")
        return list(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (hint is str and isinstance(value, str))
    )
    if not ok:
        kind = hint.__name__ + (" or null" if optional else "")
        raise UserError(f"{key} = {value!r} has the wrong type; expected {kind}")
    return float(value) if hint is float else value


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
