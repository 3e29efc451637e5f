"""What a training checkpoint holds, and how the trainer's state is saved to it and restored from it.

The trainer hands over its stateful parts (`Parts`); this module alone decides the files and meta keys
(the file format itself, atomic writes and verification: `checkpoint`):
    generator, discriminator, generator_ema .safetensors   plain state_dicts, fp32, un-wrapped key names
    optimizer_G, optimizer_D .safetensors                  Adam's tensors (param groups, scalars: meta.json)
    rng.safetensors                                        every rank's random state, [world, ...] per key
    meta.json   step, epoch, data position, model kwargs, world and batch size, the config, counters, W&B id
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dcgan_dist import checkpoint
from dcgan_dist.config import Config
from dcgan_dist.errors import UserError
from dcgan_dist.train.ema import EMA

# Config keys that must not change on resume: the weights or the data would not fit.
FIXED_ON_RESUME = ("model.arch", "model.image_size", "model.channels", "model.latent_dim", "model.g_width",
                   "model.d_width", "model.norm", "model.num_classes", "model.cond", "model.spectral_norm", "data.name",
                   "data.num_images")
# what a checkpoint written before these keys existed was trained with
_OLD_DEFAULTS = {"model.num_classes": 0, "model.cond": "projection", "model.spectral_norm": "none"}


@dataclass
class Parts:
    """The trainer's stateful parts, by reference (G and D un-wrapped from DDP)."""

    G: nn.Module
    D: nn.Module
    ema: EMA | None
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler under fp16, else None
    noise: torch.Generator  # this rank's noise stream (z, augmentation)
    data: Any  # the batch source (batches.InMemoryBatches or another with state_dict/load_state_dict)


# --- finding what to resume ----------------------------------------------------------------------


def find_resume(cfg: Config, warn) -> tuple[Path, dict] | None:
    """The checkpoint `train.resume` asks for, verified and checked against `cfg`; None to start afresh."""
    t, ckpt_root = cfg.train, cfg.run_dir / "checkpoints"
    if t.resume == "never":
        if checkpoint.complete_checkpoints(ckpt_root):
            raise UserError(f"run directory {cfg.run_dir} already holds a run; pass --overwrite to replace it, "
                            "train.resume=auto to continue it, or choose another run.name / run.dir")
        return None
    if t.resume == "auto":
        skipped: list[str] = []
        found = checkpoint.find_resumable(ckpt_root, lambda m: (skipped.append(m), warn(f"warning: {m}")))
        if found is None and checkpoint.complete_checkpoints(ckpt_root):
            newest = f" (the newest: {skipped[0].split(': ', 1)[1]})" if skipped else ""
            raise UserError(f"no checkpoint in {ckpt_root} verifies{newest}; pass --overwrite to start afresh")
    else:
        ckpt_dir, _ = checkpoint.resolve(t.resume)
        found = ckpt_dir, checkpoint.read_meta(ckpt_dir)
    if found is not None:
        check_compatible(found[1], cfg, warn)
    return found


def check_compatible(meta: dict, cfg: Config, warn) -> None:
    """Refuse a checkpoint of another model or dataset; note the other settings that changed."""
    old, new = _OLD_DEFAULTS | _flat(meta["config"]), _flat(asdict(cfg))
    old["model.channels"], new["model.channels"] = meta["generator"]["channels"], cfg.image_channels
    old["model.num_classes"] = meta["generator"].get("num_classes", 0)  # what the weights were built with
    fixed = [f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in FIXED_ON_RESUME if old.get(k) != new[k]]
    if fixed:
        raise UserError(f"cannot resume {meta['step']} steps of another model or dataset: changed "
                        f"{', '.join(fixed)}; keep them, or start a new run (another run.dir, or --overwrite)")
    changed = [k for k in new if not k.startswith(("run.", "log.")) and k not in ("train.resume", "train.steps") and
               k not in FIXED_ON_RESUME and old.get(k) != new[k]]
    if changed:
        warn(f"note: resuming with changed {', '.join(changed)}")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


# --- saving and restoring --------------------------------------------------------------------------


def save(accelerator, parts: Parts, cfg: Config, step: int, counters: dict, best: bool = False) -> Path:
    """Write checkpoint `step` (or checkpoints/best); a collective: every rank's random state is gathered.

    `counters`: JSON-able values the trainer gets back from `restore` (non-finite steps, the best metric,
    the W&B run id). Rank 0 writes; no rank returns before the checkpoint is complete.
    """
    acc, ckpt_root = accelerator, cfg.run_dir / "checkpoints"
    if parts.ema is not None:
        parts.ema.module_at(step)  # every rank: the EMA is saved with its own BatchNorm statistics
    rng = {k: acc.gather(v.unsqueeze(0).to(acc.device)).cpu()  # [world, ...]
           for k, v in rng_state(parts.noise).items()}
    path = ckpt_root / ("best" if best else checkpoint.step_dir_name(step))
    if acc.is_main_process:
        opt_G, opt_G_rest = flatten_optimizer(parts.opt_G.state_dict())
        opt_D, opt_D_rest = flatten_optimizer(parts.opt_D.state_dict())
        state = {"generator": parts.G.state_dict(), "discriminator": parts.D.state_dict(),
                 "optimizer_G": opt_G, "optimizer_D": opt_D, "rng": rng}
        if parts.ema is not None:
            state["generator_ema"] = parts.ema.module.state_dict()
        g_kwargs, d_kwargs = cfg.model_kwargs()
        data = parts.data.state_dict()
        meta = {"epoch": parts.data.epoch, "data": data, "generator": g_kwargs, "discriminator": d_kwargs,
                "world_size": data["world_size"], "batch_size": data["batch_size"],
                "optimizer_G": opt_G_rest, "optimizer_D": opt_D_rest,
                "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
                "config": asdict(cfg), **counters}
        if best:
            checkpoint.save_best(ckpt_root, step, state, meta)
        else:
            path = checkpoint.save_checkpoint(ckpt_root, step, state, meta)
            checkpoint.prune(ckpt_root, cfg.train.keep_last, cfg.train.keep_every)
    acc.wait_for_everyone()  # no rank runs ahead of a checkpoint that is being written
    return path


def restore(ckpt_dir: Path, meta: dict, parts: Parts, cfg: Config, rank: int, warn) -> dict:
    """Load everything `save` wrote into `parts`; returns {step, nonfinite_steps, best, wandb_run_id}.

    Same world size and batch size: an exact continuation (this rank's random state and data position).
    Otherwise weights and optimizer state continue, and the data order and noise change (with a warning).
    """

    def load(module: nn.Module, stem: str) -> None:
        try:
            module.load_state_dict(checkpoint.load_tensors(ckpt_dir, stem))
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1].strip()
            raise UserError(f"{ckpt_dir / stem}.safetensors does not fit the model: {detail}") from None

    load(parts.G, "generator")
    load(parts.D, "discriminator")
    if parts.ema is not None:
        if (ckpt_dir / "generator_ema.safetensors").is_file():
            load(parts.ema.module, "generator_ema")
        else:
            parts.ema.module.load_state_dict(parts.G.state_dict())  # EMA switched on now: start from G
    o = cfg.optim
    for opt, stem, lr in ((parts.opt_G, "optimizer_G", o.lr_g), (parts.opt_D, "optimizer_D", o.lr_d)):
        try:
            state = unflatten_optimizer(checkpoint.load_tensors(ckpt_dir, stem), meta[stem])
            now = opt.param_groups[0]
            for group in state["param_groups"]:  # the config's learning rate and betas win on resume, and
                group.update(lr=lr, betas=(o.beta1, o.beta2), fused=now.get("fused"), foreach=now.get("foreach"))
            opt.load_state_dict(state)  # ... this Adam's implementation
            for param, st in opt.state.items():  # the moments in the parameter's layout (channels_last):
                for k, v in st.items():  # fused Adam walks them in memory order with the gradients
                    if torch.is_tensor(v) and v.shape == param.shape:
                        st[k] = torch.empty_like(param).copy_(v)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"{ckpt_dir / stem}.safetensors does not fit the optimizer: {e}") from None
    if parts.scaler is not None and meta.get("scaler"):
        parts.scaler.load_state_dict(meta["scaler"])
    step = meta["step"]
    data = {"world_size": meta["world_size"], "batch_size": meta["batch_size"], **meta["data"]}
    if parts.data.load_state_dict(data):  # exact continuation: this rank's random state too
        rng = checkpoint.load_tensors(ckpt_dir, "rng")
        set_rng_state({k: v[rank].clone() for k, v in rng.items()}, parts.noise)  # clone: set_rng_state
        # rejects a row of a larger tensor ("Invalid mt19937 state") but takes a copy
    else:
        now = parts.data.state_dict()
        warn(f"warning: resuming {meta['world_size']} rank(s) x batch {meta['batch_size']} as "
             f"{now['world_size']} x {now['batch_size']}: weights and optimizer state continue, "
             "the data order and noise change")
        parts.noise.manual_seed(cfg.train.seed * 1_000_003 + rank + 1 + step * 7919)
    warn(f"resuming from {ckpt_dir} at step {step} (epoch {parts.data.epoch})")
    return {"step": step, "nonfinite_steps": meta.get("nonfinite_steps", 0), "best": meta.get("best"),
            "wandb_run_id": meta.get("wandb_run_id")}

def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (tensors for safetensors, JSON-able rest: param groups, scalars)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state(noise: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's random state as tensors: torch CPU, CUDA, numpy, python, and the noise stream."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "noise": noise.get_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_rest": torch.tensor([version, gauss is not None, gauss or 0.0], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor], noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    pos, has_gauss, cached = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    version, has, gauss = state["python_rest"].tolist()
    random.setstate((int(version), tuple(state["python"].tolist()), gauss if has else None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


