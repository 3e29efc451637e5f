"""The typed, nested run configuration (`Config`: every field with its type, default and a comment, from which
docs/CONFIG.md is generated) and what it accepts, checked at three moments, each raising `UserError` naming the
key, the value and what is accepted, before any work starts:
- `validate(cfg)` when a config is loaded (`recipe.load_config`): what the config alone says, against the
  registry's names;
- `check_data(cfg, facts)` when a run starts: what needs the data itself (a store's image size, channels and
  classes), from its facts (`data.sources.facts`, read once);
- `validate_world(cfg, world_size, device, bf16)` once the launch is known: the world size and the device.
A new key: its field here (and its check, if it has one) and its reader. No file is read; no torch at import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcgan_dist.errors import UserError
from dcgan_dist.registry import (
    ARCHS,
    AUGMENT_POLICIES,
    CONDITIONAL_ARCHS,
    CONDS,
    DATASETS,
    FID_PROTOCOLS,
    FITS,
    G_LOSSES,
    HIGHER_IS_BETTER,
    IMAGE_CHANNELS,
    IMAGE_SIZES,
    LABELLED,
    LOSSES,
    LOWER_IS_BETTER,
    METRIC_SPACES,
    NORMS,
    SPECTRAL_NORMS,
    parse_augment,
)


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
    arch: str = "dcgan"  # one of registry.ARCHS (mlp: the original fully connected GAN)
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
    name: str = "bce"  # one of registry.LOSSES (bce: the seed's objective)
    g_loss: str = "non_saturating"  # G's objective, as registry.LOSSES allows (bce: non_saturating, minimax)
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


# --- validation: when a config is loaded (`validate`), when a run starts (`check_data`, `validate_world`) --


def _check(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise UserError(f"{key} = {value!r} is not accepted; {accepted}")


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, key, value, "use one of " + ", ".join(map(str, choices)))


def validate(cfg: Config) -> None:
    """Checks that need no knowledge of the machine (world size and devices: `validate_world`) nor of the data's
    files (`check_data`)."""
    _check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", cfg.run.name,
           "use a non-empty name without '/' (or set run.dir)")
    _data(cfg.data)
    _model(cfg.model, cfg.data)
    _loss(cfg.loss)
    _optim(cfg.optim)
    _train(cfg.train, cfg.model)
    _log(cfg.log)


def _data(d) -> None:
    _one_of("data.name", d.name, tuple(DATASETS))
    _check(d.num_images is None or d.num_images > 0, "data.num_images", d.num_images, "use a positive count or null")
    _check(d.wait_minutes > 0 and math.isfinite(d.wait_minutes), "data.wait_minutes", d.wait_minutes,
           "use a positive number of minutes such as 60")
    _one_of("data.fit", d.fit, FITS)
    _check(0 <= d.background <= 255, "data.background", d.background, "use a grey level from 0 (black) to 255 (white)")
    _check(d.fit == "resize" or DATASETS[d.name].built_in, "data.fit", d.fit,
           f"pad is for the built-in datasets ({', '.join(n for n, i in DATASETS.items() if i.built_in)}); "
           "prepare a store at the size you want instead")


def _model(m, d) -> None:
    _one_of("model.arch", m.arch, tuple(ARCHS))
    _one_of("model.image_size", m.image_size, IMAGE_SIZES)
    _one_of("model.norm", m.norm, NORMS)
    _check(m.channels == 0 or m.channels in IMAGE_CHANNELS, "model.channels", m.channels,
           f"use {', '.join(map(str, IMAGE_CHANNELS))}, or 0 for the dataset's own")
    data = DATASETS[d.name]
    fixed = data.channels
    _check(fixed is None or m.channels in (0, fixed), "model.channels", m.channels,
           f"data.name={d.name} has {fixed} channel(s); set model.channels={fixed} or 0")
    _one_of("model.cond", m.cond, CONDS)
    _one_of("model.spectral_norm", m.spectral_norm, tuple(SPECTRAL_NORMS))
    if m.num_classes:
        _check(m.num_classes > 0, "model.num_classes", m.num_classes, "use 0 (unconditional) or the dataset's classes")
        if not data.is_store:  # a store's classes are in its manifest: checked with the data's facts (check_data)
            _classes(m, d.name, data.num_classes)
        _check(ARCHS[m.arch].conditional, "model.num_classes", m.num_classes,
               f"conditional models are model.arch={' or '.join(CONDITIONAL_ARCHS)} only")
    _check(m.latent_dim >= 1, "model.latent_dim", m.latent_dim, "use a positive size such as 100")
    _check(m.g_width >= 1, "model.g_width", m.g_width, "use a positive width such as 64")
    _check(m.d_width >= 1, "model.d_width", m.d_width, "use a positive width such as 64")
    _check(m.ema.warmup_steps >= 0, "model.ema.warmup_steps", m.ema.warmup_steps, "use 0 (no ramp) or a step count")
    _check(0.0 <= m.ema.decay < 1.0, "model.ema.decay", m.ema.decay, "use 0 (off) or a value in (0, 1) such as 0.999")
    _check(not (m.sync_bn and m.norm == "none"), "model.sync_bn", m.sync_bn, "sync_bn needs model.norm=batch")
    _check(not (m.sync_bn and not ARCHS[m.arch].batch_norm), "model.sync_bn", m.sync_bn,
           f"the {m.arch} arch has no BatchNorm")


def _loss(lo) -> None:
    _one_of("loss.name", lo.name, tuple(LOSSES))
    _one_of("loss.g_loss", lo.g_loss, G_LOSSES)
    _check(0.0 < lo.real_target <= 1.0, "loss.real_target", lo.real_target, "use a value in (0, 1], e.g. 0.9")
    _check(0.0 < lo.g_target <= 1.0, "loss.g_target", lo.g_target, "use a value in (0, 1], e.g. 1.0")
    if not LOSSES[lo.name].label_targets:
        takes = " or ".join(name for name, info in LOSSES.items() if info.label_targets)
        _check(lo.real_target == 1.0 and lo.g_target == 1.0, "loss.real_target", lo.real_target,
               f"label targets apply to loss.name={takes} only; leave real_target and g_target at 1.0")


def _optim(o) -> None:
    for key, value in (("optim.lr_g", o.lr_g), ("optim.lr_d", o.lr_d)):
        _check(value > 0 and math.isfinite(value), key, value, "use a positive learning rate such as 2e-4")
    for key, value in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        _check(0.0 <= value < 1.0, key, value, "use a value in [0, 1)")


def _train(t, m) -> None:
    _check(t.steps >= 1, "train.steps", t.steps, "use a positive number of generator steps")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "use a positive per-rank batch size")
    _check(t.global_batch_size is None or t.global_batch_size >= 1, "train.global_batch_size",
           t.global_batch_size, "use a positive global batch size or null")
    _one_of("train.mixed_precision", t.mixed_precision, ("no", "fp16", "bf16", "auto"))
    if t.cuda_graphs:  # what a captured step cannot hold (docs/PERFORMANCE.md, "CUDA graphs")
        _check(t.mixed_precision != "fp16", "train.cuda_graphs", t.cuda_graphs, "fp16's gradient scaler reads its "
               "overflow flag on the host at every step; use train.mixed_precision=bf16 (or no) with graphs")
        _check(not t.compile, "train.cuda_graphs", t.cuda_graphs, "choose one of train.compile and "
               "train.cuda_graphs (the graph replays the eager kernels)")
        _check(not m.sync_bn, "train.cuda_graphs", t.cuda_graphs, "model.sync_bn=true all-reduces in every forward; "
               "graphs run one process, where sync BN does nothing: set model.sync_bn=false")
    try:
        parse_augment(t.augment)
    except ValueError as e:
        raise UserError(f"train.augment={t.augment!r}: {e}; use a comma-separated list of "
                        f"{', '.join(AUGMENT_POLICIES)}, e.g. translation,cutout (or empty for none)") from None
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "use 0 (final only) or a step count")
    _check(t.checkpoint_minutes >= 0, "train.checkpoint_minutes", t.checkpoint_minutes, "use 0 (off) or minutes")
    _check(t.max_minutes >= 0 and math.isfinite(t.max_minutes), "train.max_minutes", t.max_minutes,
           "use 0 (no limit) or minutes, e.g. 9")
    _check(t.keep_last >= 1, "train.keep_last", t.keep_last, "keep at least the newest checkpoint (1 or more)")
    _check(t.keep_every >= 0, "train.keep_every", t.keep_every, "use 0 (none) or a step count")
    _check(t.collective_timeout_s >= 1, "train.collective_timeout_s", t.collective_timeout_s, "use seconds >= 1")
    _check(t.check_consistency_every >= 0, "train.check_consistency_every", t.check_consistency_every,
           "use 0 (off) or a step count")
    _check(not (t.check_consistency_every and m.norm == "batch" and not m.sync_bn), "train.check_consistency_every",
           t.check_consistency_every, "it needs model.sync_bn=true (or model.norm=none): otherwise each rank's "
           "BatchNorm statistics differ by design")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "use 0 (off) or a step count")
    _check(t.eval_num >= 8, "train.eval_num", t.eval_num, "use at least 8 images (1000 or more for stable numbers)")
    _one_of("train.eval_protocol", t.eval_protocol, ("", *FID_PROTOCOLS))
    if t.keep_best:
        space, _, name = t.keep_best.partition("/")
        _check(space in METRIC_SPACES and name in LOWER_IS_BETTER + HIGHER_IS_BETTER, "train.keep_best", t.keep_best,
               "use <space>/<metric>: space " + " or ".join(METRIC_SPACES) + ", metric one of " +
               ", ".join(LOWER_IS_BETTER + HIGHER_IS_BETTER) + ", e.g. classifier/fd")
        _check(t.eval_every > 0, "train.keep_best", t.keep_best, "it needs train.eval_every > 0")
    _one_of("train.on_nonfinite", t.on_nonfinite, ("skip", "stop"))
    _check(t.max_consecutive_skips >= 0, "train.max_consecutive_skips", t.max_consecutive_skips,
           "use 0 or more steps")
    _check(bool(t.resume), "train.resume", t.resume, "use auto, never, or the path of a checkpoint")


def _log(lg) -> None:
    _check(lg.every >= 1, "log.every", lg.every, "use a positive step count")
    _check(lg.sample_every >= 0, "log.sample_every", lg.sample_every, "use 0 (end only) or a step count")
    _one_of("log.wandb.mode", lg.wandb.mode, ("auto", "online", "offline", "disabled"))
    _check(bool(lg.wandb.project), "log.wandb.project", lg.wandb.project, "use a non-empty project name")
    _check(1 <= lg.num_samples <= 1024, "log.num_samples", lg.num_samples, "use 1..1024")




def check_data(cfg: Config, facts) -> None:
    """The checks that need the data itself, from its facts (`data.sources.facts`, read once when a run starts,
    before anything heavy): a store's image size and channels (its manifest's) against the model, and
    model.num_classes against a store's classes."""
    m, root = cfg.model, cfg.data.root
    if not DATASETS[cfg.data.name].is_store:
        return  # the registry's facts: validate checked them
    _check(m.image_size == facts.image_size, "model.image_size", m.image_size, f"the store at data.root={root} "
           f"holds {facts.image_size}x{facts.image_size} images: set model.image_size={facts.image_size}, or "
           f"prepare a store with --size {m.image_size}")
    _check(m.channels in (0, facts.channels), "model.channels", m.channels, f"the store at data.root={root} holds "
           f"{facts.channels}-channel images: set model.channels={facts.channels} (or 0), or prepare one with "
           f"--channels {m.channels}")
    _classes(m, cfg.data.name, facts.num_classes)


def _classes(m, name: str, classes: int) -> None:
    """model.num_classes (> 0) against the dataset's class count `classes` (0: unlabelled)."""
    if not m.num_classes:
        return
    _check(classes > 0, "model.num_classes", m.num_classes, f"data.name={name} has no labels: train a "
           f"conditional model on a labelled dataset ({', '.join(LABELLED)}, or a store of labelled images), or "
           "set model.num_classes=0")
    _check(m.num_classes == classes, "model.num_classes", m.num_classes,
           f"data.name={name} has {classes} classes: set model.num_classes={classes} (or 0 for unconditional)")


def validate_world(cfg: Config, world_size: int, device: str = "cpu", bf16: bool = False) -> Config:
    """Checks that depend on the launch; returns the config with the per-rank batch resolved.

    `device`: "cuda", "xpu", "mps" or "cpu" (devices.accelerator_type); `bf16`: whether bf16 runs natively there
    (devices.native_bf16), which decides train.mixed_precision=auto."""
    t = cfg.train
    if world_size > 1 and device == "mps":
        raise UserError(f"{world_size} processes on Apple MPS, which has no distributed backend: launch one "
                        "process (accelerate launch --num_processes 1, or dcgan-train)")
    if t.global_batch_size is not None:
        _check(t.global_batch_size % world_size == 0, "train.global_batch_size", t.global_batch_size,
               f"it must be divisible by the world size {world_size}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=t.global_batch_size // world_size))
    _check(device == "cuda" or t.mixed_precision != "fp16", "train.mixed_precision", t.mixed_precision,
           f"fp16 needs CUDA (with its gradient scaler); use bf16 (or no) on {device}")
    _check(device == "cuda" or not t.cuda_graphs, "train.cuda_graphs", t.cuda_graphs,
           f"CUDA graphs need a CUDA GPU and this process trains on {device}: set train.cuda_graphs=false")
    _check(world_size == 1 or not t.cuda_graphs, "train.cuda_graphs", t.cuda_graphs,
           f"graphs replay a one-process step and this job has {world_size} processes (DDP's reductions are not "
           "captured): launch one process, or set train.cuda_graphs=false")
    if t.mixed_precision == "auto":
        precision = "bf16" if bf16 else "no"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=precision))
    return cfg
