"""What a training checkpoint holds, and how the trainer's state is saved to it and restored from it.

`TrainState` owns the training state: each stateful part is registered with it once, by name, and its `save`
and `restore` handle them all, `checkpoints/step-N` and `checkpoints/best` alike. A part's name is its file stem
and/or meta.json key (the file format itself, atomic writes and verification: `checkpoint`):
    generator, discriminator, generator_ema .safetensors   plain state_dicts, fp32, un-wrapped key names
    optimizer_G, optimizer_D .safetensors                  Adam's tensors (param groups, scalars: meta.json)
    rng.safetensors                                        every rank's random state, [world, ...] per key
    meta.json   step, epoch, data position, model kwargs, world and batch size, the config, counters, W&B id
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dcgan_dist import checkpoint
from dcgan_dist.config import Config, ModelConfig
from dcgan_dist.errors import UserError
from dcgan_dist.train.ema import EMA

# Config keys that must not change on resume, else the weights or the data would not fit: every model key but
# these two (how the weights are trained, not what they are), and the data's
_TRAINING_ONLY = ("sync_bn", "ema")
FIXED_ON_RESUME = (*(f"model.{f.name}" for f in fields(ModelConfig) if f.name not in _TRAINING_ONLY), "data.name",
                   "data.num_images")
# what a checkpoint written before these keys existed was trained with
_OLD_DEFAULTS = {"model.num_classes": 0, "model.cond": "projection", "model.spectral_norm": "none"}


# --- finding what to resume ----------------------------------------------------------------------


def find_resume(cfg: Config, warn, channels: int) -> tuple[Path, dict] | None:
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
        check_compatible(found[1], cfg, warn, channels)
    return found


def check_compatible(meta: dict, cfg: Config, warn, channels: int) -> None:
    """Refuse a checkpoint of another model or dataset; note the other settings that changed. `channels`: the
    images' (the data's facts)."""
    old, new = _OLD_DEFAULTS | _flat(meta["config"]), _flat(asdict(cfg))
    old["model.channels"], new["model.channels"] = meta["generator"]["channels"], channels
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


# --- the training state: each part registered once ---------------------------------------------------


class TrainState:
    """Everything a training checkpoint holds, each stateful part registered once by name; `save` writes them all,
    `restore` loads them all, in the order they were registered.

        register(name, part)       part.state_dict() -> state; part.load_state_dict(state)
        register(name, get, set)   get() -> state; set(state) (no `set`: saved for readers, not restored)

    A state that is a dict holding tensors goes to `<name>.safetensors` (its tensors) and meta.json's `name` (its
    other values, if any); any other state, JSON, to meta.json's `name`. `restore` hands a part back the same
    dict or value, or None when the checkpoint (an older one) has no such part. `state_dict` runs on every rank,
    so a part may gather (the RNG) or recompute (the EMA's BatchNorm statistics); rank 0 writes.
    """

    def __init__(self, accelerator, ckpt_root: Path, keep_last: int, keep_every: int):
        self.acc, self.ckpt_root, self.keep = accelerator, ckpt_root, (keep_last, keep_every)
        self.parts: dict[str, Any] = {}
        self.step = 0  # the step being saved or restored, for the parts that need it

    def register(self, name: str, part, load: Callable[[Any], None] | None = None) -> None:
        assert name not in self.parts and name not in ("step", "files", "format_version"), name
        self.parts[name] = part if hasattr(part, "load_state_dict") else _Value(part, load)

    def save(self, step: int, name: str | None = None) -> Path:
        """Write checkpoint `step` as checkpoints/step-N (then `latest`; old ones pruned), or as `name` (`best`,
        `latest` untouched); a collective. No rank returns before the checkpoint is complete."""
        self.step = step
        states = {key: part.state_dict() for key, part in self.parts.items()}  # every rank
        path = self.ckpt_root / (name or checkpoint.step_dir_name(step))
        if self.acc.is_main_process:
            tensors, meta = {}, {}
            for key, state in states.items():
                if isinstance(state, dict) and any(torch.is_tensor(v) for v in state.values()):
                    tensors[key] = {k: v for k, v in state.items() if torch.is_tensor(v)}
                    state = {k: v for k, v in state.items() if not torch.is_tensor(v)}
                    if not state:
                        continue
                meta[key] = state
            checkpoint.save_checkpoint(self.ckpt_root, step, tensors, meta, path.name)
            if name is None:
                checkpoint.prune(self.ckpt_root, *self.keep)
        self.acc.wait_for_everyone()  # no rank runs ahead of a checkpoint that is being written
        return path

    def restore(self, ckpt_dir: Path, meta: dict) -> int:
        """Load every part from `ckpt_dir` (`meta`: its verified meta.json); returns its step."""
        meta, self.step = _upgrade(meta), meta["step"]
        for name, part in self.parts.items():
            in_file = f"{name}.safetensors" in meta.get("files", {})
            state = checkpoint.load_tensors(ckpt_dir, name) if in_file else None
            if name in meta:
                state = {**state, **meta[name]} if in_file else meta[name]
            try:
                part.load_state_dict(state)
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                detail = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
                raise UserError(f"{ckpt_dir} holds no {name}; use another checkpoint" if state is None else
                                f"{ckpt_dir / name}{'.safetensors' if in_file else ''} does not fit this run's "
                                f"{name}: {detail}") from None
        return self.step


def training_state(accelerator, cfg: Config, kwargs: tuple[dict, dict], G: nn.Module, D: nn.Module,
                   ema: EMA | None, opt_G, opt_D, noise: torch.Generator, data, warn) -> TrainState:
    """The training state with the parts of the networks and the data registered (G and D un-wrapped from DDP,
    `kwargs` the kwargs that build them; `noise`: this rank's noise stream; `data`: the batch source; the
    GradScaler under fp16: accelerate's). `cfg` is saved whole (meta.json's `config`). The trainer registers its
    own counters. A new part: one `register` line, here or there."""
    st = TrainState(accelerator, cfg.run_dir / "checkpoints", cfg.train.keep_last, cfg.train.keep_every)
    scaler = accelerator.scaler
    (g_kwargs, d_kwargs), o, position = kwargs, cfg.optim, DataPosition(data, warn)
    st.register("generator", Weights(G, g_kwargs))
    st.register("discriminator", Weights(D, d_kwargs))
    if ema is not None:  # saved with BatchNorm statistics of its own weights; EMA switched on now: start from G
        st.register("generator_ema", Weights(ema.module, fallback=G, prepare=lambda: ema.module_at(st.step)))
    st.register("optimizer_G", OptimizerState(opt_G, o.lr_g, (o.beta1, o.beta2)))
    st.register("optimizer_D", OptimizerState(opt_D, o.lr_d, (o.beta1, o.beta2)))
    st.register("scaler", lambda: scaler.state_dict() if scaler is not None else None,
                lambda state: scaler.load_state_dict(state) if scaler is not None and state else None)
    st.register("data", position)
    st.register("rng", RandomState(accelerator, noise, position, lambda: (
        rank_seed(cfg.train.seed, accelerator.process_index) + st.step * 7919)))
    st.register("epoch", lambda: data.epoch)  # these four: for readers (restored through `data`, or checked by
    st.register("world_size", lambda: data.state_dict()["world_size"])  # find_resume)
    st.register("batch_size", lambda: data.state_dict()["batch_size"])
    st.register("config", lambda: asdict(cfg))
    return st


def rank_seed(seed: int, rank: int) -> int:
    """The seed of `rank`'s own random streams (its noise; python's and numpy's, which a checkpoint holds too)."""
    return seed * 1_000_003 + rank + 1


def seed_rank(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """This rank's noise generator on `device`, python's and numpy's random state seeded alike: training draws
    from neither, but checkpoints hold their states (the same run, the same checkpoint files)."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    return torch.Generator(device).manual_seed(s)


def _upgrade(meta: dict) -> dict:
    """meta.json of an older checkpoint in today's terms: its data position says its world and batch size."""
    return {**meta, "data": {"world_size": meta["world_size"], "batch_size": meta["batch_size"], **meta["data"]}}


class _Value:
    """A part given as a getter and a setter."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None] | None):
        self.state_dict, self.set = get, set

    def load_state_dict(self, state) -> None:
        if self.set is not None:
            self.set(state)


class Weights:
    """A module's weights, with the kwargs that build it (meta.json's `name`, checked against the tensors by
    `checkpoint.read_meta`). `fallback`: the module whose weights a checkpoint without these starts them from;
    `prepare`: called before the weights are saved."""

    def __init__(self, module: nn.Module, kwargs: dict | None = None, fallback: nn.Module | None = None,
                 prepare: Callable[[], Any] | None = None):
        self.module, self.kwargs, self.fallback, self.prepare = module, kwargs or {}, fallback, prepare

    def state_dict(self) -> dict:
        if self.prepare is not None:
            self.prepare()
        tensors = self.module.state_dict()
        assert not tensors.keys() & self.kwargs.keys(), "a tensor named like a kwarg"
        return {**tensors, **self.kwargs}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None and self.fallback is not None:
            state = self.fallback.state_dict()
        self.module.load_state_dict({k: v for k, v in state.items() if torch.is_tensor(v)})


class OptimizerState:
    """Adam's tensors and the rest (param groups, scalars). Restored with the config's learning rate and betas
    and this run's Adam implementation, its moments in the parameters' memory layout."""

    def __init__(self, opt: torch.optim.Optimizer, lr: float, betas: tuple[float, float]):
        self.opt, self.lr, self.betas = opt, lr, betas

    def state_dict(self) -> dict:
        tensors, rest = flatten_optimizer(self.opt.state_dict())
        return {**tensors, **rest}

    def load_state_dict(self, state: dict) -> None:
        opt = self.opt
        loaded = unflatten_optimizer({k: v for k, v in state.items() if torch.is_tensor(v)}, state)
        now = opt.param_groups[0]
        for group in loaded["param_groups"]:  # the config's learning rate and betas win on resume, and
            group.update(lr=self.lr, betas=self.betas, fused=now.get("fused"), foreach=now.get("foreach"),
                         capturable=now.get("capturable", False))
        opt.load_state_dict(loaded)  # ... this Adam's implementation
        for param, st in opt.state.items():  # the moments in the parameter's layout (channels_last):
            for k, v in st.items():  # fused Adam walks them in memory order with the gradients
                if torch.is_tensor(v) and v.shape == param.shape:
                    st[k] = torch.empty_like(param).copy_(v)


class DataPosition:
    """The batch source's position. `exact` once restored: the same world size and batch size, so the run
    continues exactly (this rank's random state too); else the epoch goes on from the same share of its
    images, in another order, with a warning."""

    def __init__(self, data, warn):
        self.data, self.warn, self.exact = data, warn, False

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.exact = self.data.load_state_dict(state)
        if not self.exact:
            now = self.data.state_dict()
            self.warn(f"warning: resuming {state['world_size']} rank(s) x batch {state['batch_size']} as "
                      f"{now['world_size']} x {now['batch_size']}: weights and optimizer state continue, "
                      "the data order and noise change")


class RandomState:
    """Every rank's random state, gathered to [world, ...] per key (saving is a collective). Restored on an exact
    continuation of the data; otherwise this rank's noise is reseeded (`reseed()`: the seed)."""

    def __init__(self, accelerator, noise: torch.Generator, position: DataPosition, reseed: Callable[[], int]):
        self.acc, self.noise, self.position, self.reseed = accelerator, noise, position, reseed

    def state_dict(self) -> dict[str, torch.Tensor]:
        acc = self.acc
        return {k: acc.gather(v.unsqueeze(0).to(acc.device)).cpu() for k, v in rng_state(self.noise).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.position.exact:  # clone: set_rng_state rejects a row of a larger tensor ("Invalid mt19937
            set_rng_state({k: v[self.acc.process_index].clone() for k, v in state.items()}, self.noise)  # state")
        else:
            self.noise.manual_seed(self.reseed())


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


