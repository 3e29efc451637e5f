"""The adversarial training loop under Accelerate: one process, many GPUs, or many nodes, one code path."""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import os
import shutil
import signal
import time
import warnings
import weakref
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import accelerate
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from dcgan_dist import augment, checkpoint, evaluation, sampling, tracking
from dcgan_dist.config import Config, save_config, validate_world
from dcgan_dist.data import ShardedBatches, load_images, to_model_range
from dcgan_dist.errors import RunError, UserError
from dcgan_dist.losses import AdversarialLoss
from dcgan_dist.models import Discriminator, Generator, init_weights
from dcgan_dist.sync_bn import check_consistency, convert_sync_batchnorm
from dcgan_dist.tracking import Tracker, format_line

# What train_step returns, per step; averaged over the log interval and the ranks.
STATS = ("loss/D", "loss/D_real", "loss/D_fake", "loss/G", "D/real", "D/fake_before", "D/fake_after", "D/accuracy",
         "grad_norm/G", "grad_norm/D")
# Config keys that must not change on resume: the weights or the data would not fit.
FIXED_ON_RESUME = ("model.arch", "model.image_size", "model.channels", "model.latent_dim", "model.g_width",
                   "model.d_width", "model.norm", "data.name", "data.num_images")


def model_kwargs(cfg: Config) -> tuple[dict, dict]:
    """The plain kwargs that rebuild G and D (stored in every checkpoint's meta.json)."""
    m, common = cfg.model, dict(channels=cfg.image_channels, image_size=cfg.model.image_size, arch=cfg.model.arch)
    return (dict(latent_dim=m.latent_dim, width=m.g_width, norm=m.norm, **common),
            dict(width=m.d_width, norm=m.norm, **common))


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients, on the device (no host sync)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


def _flag_signal(trainer_ref: weakref.ref, signum: int, _frame) -> None:
    trainer = trainer_ref()
    if trainer is not None:
        trainer.signal = signum  # acted on at the next step boundary, by all ranks together


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


class Trainer:
    def __init__(self, cfg: Config, overwrite: bool = False):
        cuda = torch.cuda.is_available()
        cfg = validate_world(cfg, int(os.environ.get("WORLD_SIZE", "1")), cuda)
        self.run_dir, self.ckpt_root = cfg.run_dir, cfg.run_dir / "checkpoints"
        # accelerate always passes broadcast_buffers, which torch 2.14 deprecates; False is still what we mean
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        # broadcast_buffers=False: DDP would otherwise re-broadcast BN buffers at each D forward, which breaks
        # two D forwards before one backward ("modified by an inplace operation"). cpu=True when there is no
        # CUDA, or multi-process CPU launches come up as independent single processes. The collective
        # timeout turns a rank that died or diverged into an error instead of a hang.
        self.accelerator = acc = Accelerator(
            cpu=not cuda, mixed_precision=cfg.train.mixed_precision,
            log_with=tracking.log_with(cfg) or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                logging_dir=str(self.run_dir / "tensorboard")),
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                             InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))])
        self.cfg, self.device, self.world, self.rank = cfg, acc.device, acc.num_processes, acc.process_index
        resume = None if overwrite else self._find_resume()  # every rank reads; nothing is written yet

        with acc.main_process_first():  # rank 0 fills the decode cache, the others read it
            d = cfg.data
            self.images = load_images(d.name, d.root, cfg.model.image_size, cfg.image_channels, d.download,
                                      d.cache_dir, d.num_images, d.skip_bad_files, self._print)  # uint8 [N, C, S, S]
        self.batches = ShardedBatches(len(self.images), cfg.train.batch_size, self.rank, self.world, cfg.train.seed)
        self.eval_spaces, self.best = [], None
        if cfg.train.eval_every:
            self.eval_spaces = self._eval_spaces()

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.g_kwargs, self.d_kwargs = model_kwargs(cfg)
        G, D = Generator(**self.g_kwargs), Discriminator(**self.d_kwargs)
        G.apply(init_weights), D.apply(init_weights)
        self.G_ema = copy.deepcopy(G).requires_grad_(False).to(self.device) if cfg.model.ema.decay > 0 else None
        if cfg.model.sync_bn:  # statistics over the global batch; each training forward becomes a collective
            G, D = convert_sync_batchnorm(G, self.device.type), convert_sync_batchnorm(D, self.device.type)
        # NHWC: what tensor cores' convolution kernels read without transposes. Under train.compile the compiler
        # chooses the layouts itself (torch 2.11's inductor also fails on channels_last weights' gradients).
        self.channels_last = cfg.train.channels_last and not cfg.train.compile
        if self.channels_last:
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        if cuda:
            torch.backends.cudnn.benchmark = True  # shapes never change: time the conv algorithms once, keep the best
        G, D = G.to(self.device), D.to(self.device)  # before the optimizers take their parameters
        o = cfg.optim
        # Fused Adam: one kernel per step (4x faster than the default on a CPU too), and it skips a step with
        # inf/NaN gradients on the device, without a host sync. Under fp16 the GradScaler does that instead.
        self.fused = cfg.train.mixed_precision != "fp16" or None
        opt_G = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2), fused=self.fused)
        opt_D = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2), fused=self.fused)
        if cfg.train.compile:  # in place: the modules, their state_dict keys and DDP's view of them are unchanged
            G.compile(), D.compile()
        # The optimizers stay plain torch ones: accelerate's wrapper adds ~0.15 ms of Python per step and call,
        # which a small model on a GPU notices (benchmarks/gpu.sh); fp16 scaling is done here (`_update`).
        self.G, self.D = acc.prepare(G, D)
        self.opt_G, self.opt_D = opt_G, opt_D
        self.loss = AdversarialLoss(cfg.loss.name, cfg.loss.g_loss, cfg.loss.real_target, cfg.loss.g_target)
        self.augment_policy = augment.parse(cfg.train.augment)

        # Each rank draws its own noise; the fixed grid noise is the same everywhere.
        self.noise = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + self.rank + 1)
        self.fixed_z = sampling.fixed_noise(cfg.log.num_samples, cfg.model.latent_dim, cfg.train.seed)
        self.step, self.nonfinite_steps, self.nonfinite_run, self.counted_rows = 0, 0, 0, 0
        self.ema_calibrated_step = -1
        inject = os.environ.get("DCGAN_TEST_NONFINITE", "")  # test hook: "STEP,STEP@RANK" -> NaN losses there
        steps_at, _, rank = inject.partition("@")
        self.inject_nan = {int(x) for x in steps_at.split(",") if x} if int(rank or 0) == self.rank else set()
        if resume is not None:
            self._restore(*resume)

        # Preemption: a signal only sets a flag; ranks agree on it at the next step boundary (one small
        # all-reduce on the CPU, over gloo, so no device sync is added to the step).
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # by weak reference: the handler must not keep the trainer
            signal.signal(sig, functools.partial(_flag_signal, weakref.ref(self)))  # alive (cli.train_main frees it)
        self.cpu_group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self.cpu_group = dist.new_group(backend="gloo")
        self.last_ckpt_time = time.monotonic()

        acc.wait_for_everyone()  # every rank has read what it resumes from before rank 0 writes
        if acc.is_main_process:
            self._prepare_run_dir(overwrite)
        run_config = {**asdict(cfg), "world_size": self.world, "global_batch": cfg.train.batch_size * self.world,
                      "precision": cfg.train.mixed_precision, "torch": torch.__version__,
                      "accelerate": accelerate.__version__, "git_commit": tracking.git_commit()}
        self.tracker = Tracker(acc, cfg, self.run_dir, run_config, resume[1].get("wandb_run_id") if resume else None)

    def _eval_spaces(self) -> list:
        d, t = self.cfg.data, self.cfg.train
        with self.accelerator.main_process_first():  # rank 0 may train the classifier (once); the others read it
            spaces, notes = evaluation.feature_spaces(
                d.name, d.root, d.cache_dir, image_size=self.cfg.model.image_size, channels=self.cfg.image_channels,
                num_images=d.num_images, log=self._print)
        names = [s.name for s in spaces]
        if not spaces:
            raise UserError(f"train.eval_every = {t.eval_every} has nothing to measure: " + "; ".join(notes))
        if t.keep_best and t.keep_best.split("/")[0] not in names:
            raise UserError(f"train.keep_best = {t.keep_best!r}: no {t.keep_best.split('/')[0]} metrics for "
                            f"{d.name} (available: {', '.join(names)}); " + "; ".join(notes))
        return spaces

    def _prepare_run_dir(self, overwrite: bool) -> None:
        if overwrite:
            for name in ("checkpoints", "samples", "wandb", "tensorboard"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():  # lines logged after the checkpoint we resume from will be logged again
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))

    # --- resume -------------------------------------------------------------------------------------
    def _find_resume(self) -> tuple[Path, dict] | None:
        t = self.cfg.train
        if t.resume == "never":
            if checkpoint.complete_checkpoints(self.ckpt_root):
                raise UserError(f"run directory {self.run_dir} already holds a run; pass --overwrite to replace it, "
                                "train.resume=auto to continue it, or choose another run.name / run.dir")
            return None
        if t.resume == "auto":
            found = checkpoint.find_resumable(self.ckpt_root, lambda m: self._print(f"warning: {m}"))
            if found is None and checkpoint.complete_checkpoints(self.ckpt_root):
                raise UserError(f"no checkpoint in {self.ckpt_root} verifies; pass --overwrite to start afresh")
        else:
            ckpt_dir, _ = checkpoint.resolve(t.resume)
            found = ckpt_dir, checkpoint.read_meta(ckpt_dir)
        if found is not None:
            self._check_compatible(found[1])
        return found

    def _check_compatible(self, meta: dict) -> None:
        old, new = _flat(meta["config"]), _flat(asdict(self.cfg))
        old["model.channels"], new["model.channels"] = meta["generator"]["channels"], self.cfg.image_channels
        fixed = [f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in FIXED_ON_RESUME if old.get(k) != new[k]]
        if fixed:
            raise UserError(f"cannot resume {meta['step']} steps of another model or dataset: changed "
                            f"{', '.join(fixed)}; keep them, or start a new run (another run.dir, or --overwrite)")
        changed = [k for k in new if not k.startswith(("run.", "log.")) and k not in ("train.resume", "train.steps") and
                   k not in FIXED_ON_RESUME and old.get(k) != new[k]]
        if changed:
            self._print(f"note: resuming with changed {', '.join(changed)}")

    def _restore(self, ckpt_dir: Path, meta: dict) -> None:
        acc, unwrap = self.accelerator, self.accelerator.unwrap_model

        def load(module: torch.nn.Module, stem: str) -> None:
            try:
                module.load_state_dict(checkpoint.load_tensors(ckpt_dir, stem))
            except RuntimeError as e:
                detail = str(e).strip().splitlines()[-1].strip()
                raise UserError(f"{ckpt_dir / stem}.safetensors does not fit the model: {detail}") from None

        load(unwrap(self.G), "generator")
        load(unwrap(self.D), "discriminator")
        if self.G_ema is not None:
            if (ckpt_dir / "generator_ema.safetensors").is_file():
                load(self.G_ema, "generator_ema")
            else:
                self.G_ema.load_state_dict(unwrap(self.G).state_dict())  # EMA switched on now: start from G
        o = self.cfg.optim
        for opt, stem, lr in ((self.opt_G, "optimizer_G", o.lr_g), (self.opt_D, "optimizer_D", o.lr_d)):
            try:
                state = checkpoint.unflatten_optimizer(checkpoint.load_tensors(ckpt_dir, stem), meta[stem])
                for group in state["param_groups"]:  # the config's learning rate and betas win on resume, and
                    group.update(lr=lr, betas=(o.beta1, o.beta2), fused=self.fused, foreach=None)  # this Adam
                opt.load_state_dict(state)
                for param, st in opt.state.items():  # the moments in the parameter's layout (channels_last):
                    for k, v in st.items():  # fused Adam walks them in memory order with the gradients
                        if torch.is_tensor(v) and v.shape == param.shape:
                            st[k] = torch.empty_like(param).copy_(v)
            except (KeyError, ValueError, RuntimeError) as e:
                raise UserError(f"{ckpt_dir / stem}.safetensors does not fit the optimizer: {e}") from None
        if acc.scaler is not None and meta.get("scaler"):
            acc.scaler.load_state_dict(meta["scaler"])
        self.step, self.nonfinite_steps, self.best = meta["step"], meta.get("nonfinite_steps", 0), meta.get("best")
        same_layout = meta["world_size"] == self.world and meta["batch_size"] == self.cfg.train.batch_size
        if same_layout:  # exact continuation: this rank's random state and data position
            rng = checkpoint.load_tensors(ckpt_dir, "rng")
            checkpoint.set_rng_state({k: v[self.rank].clone() for k, v in rng.items()}, self.noise)  # clone:
            # set_rng_state rejects a row of a larger tensor ("Invalid mt19937 state") but takes a copy
            self.batches.load_state_dict(meta["data"])
        else:
            self._print(f"warning: resuming {meta['world_size']} rank(s) x batch {meta['batch_size']} as "
                        f"{self.world} x {self.cfg.train.batch_size}: weights and optimizer state continue, "
                        "the data order and noise change")
            seen = meta["data"]["position"] * meta["world_size"] * meta["batch_size"]  # images into the epoch
            position = min(seen // (self.world * self.cfg.train.batch_size), self.batches.batches_per_epoch)
            self.batches.load_state_dict({"epoch": meta["data"]["epoch"], "position": position})
            self.noise.manual_seed(self.cfg.train.seed * 1_000_003 + self.rank + 1 + self.step * 7919)
        self._print(f"resuming from {ckpt_dir} at step {self.step} (epoch {self.batches.epoch})")

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:  # global rank 0 (accelerator.print prints once per node)
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------
    def train_step(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One D step then one G step on `real` [B, C, H, W] in [-1, 1] and noise `z` [B, latent].

        Under DDP every rank must make the same forwards in the same order (with synchronized BN each
        forward is a collective): G(z), D(real), D(fake), then D(fake) again in the G phase.
        Returns the STATS and a last "non-finite" flag as one detached tensor (no host sync here).
        """
        acc, G, D, loss, aug = self.accelerator, self.G, self.D, self.loss, self._augment
        fake = G(z)  # [B, C, H, W]; one G forward serves both phases, as in the seed

        # D: real. The first backward only accumulates locally; the fake backward all-reduces both at once.
        D.requires_grad_(True)
        with acc.no_sync(D):
            real_logits = D(aug(real))
            loss_real = loss.d_real(real_logits)  # -log D(x)  (BCE against real_target)
            self._backward(loss_real)
        # D: fake. G is not updated here: the graph is cut at fake.detach().
        fake_logits = D(aug(fake.detach()))
        loss_fake = loss.d_fake(fake_logits)  # -log(1 - D(G(z)))
        if self.step + 1 in self.inject_nan:  # test hook (DCGAN_TEST_NONFINITE): a NaN loss on this rank
            loss_fake = loss_fake * float("nan")
        self._backward(loss_fake)
        grad_norm_D, bad_D = self._update(self.opt_D, D)

        # G: fool D. D is frozen (no weight gradients) and run outside DDP's reducer (no_sync), so only
        # G's gradients are all-reduced, once, in this backward.
        D.requires_grad_(False)
        with acc.no_sync(D):
            g_logits = D(aug(fake))
        loss_g = loss.g(g_logits)  # -log D(G(z))  (non-saturating)
        self._backward(loss_g)
        grad_norm_G, bad_G = self._update(self.opt_G, G)
        if self.G_ema is not None:
            self._update_ema()

        real_logits, fake_logits = real_logits.detach().float(), fake_logits.detach().float()
        probs = [torch.sigmoid(x).mean() for x in (real_logits, fake_logits, g_logits.detach().float())]
        accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
        return torch.stack([loss_real + loss_fake, loss_real, loss_fake, loss_g, *probs, accuracy,
                            grad_norm_G, grad_norm_D, (bad_D | bad_G).float()]).detach()

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """train.augment: the same random transforms for real and fake, drawn from the checkpointed noise generator."""
        return augment.augment(x, self.augment_policy, self.noise) if self.augment_policy else x

    def _backward(self, loss: torch.Tensor) -> None:
        scaler = self.accelerator.scaler  # fp16 only
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _update(self, opt: torch.optim.Optimizer, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """opt.step(), skipped when a gradient is inf or NaN; returns (gradient norm, skipped). No host sync.

        The gradients are already all-reduced, so every rank sees the same norm and skips the same steps.
        """
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.unscale_(opt)
        norm = _grad_norm(module)
        bad = ~torch.isfinite(norm)
        if scaler is not None:  # fp16: the scaler skips the step itself (and lowers its scale)
            scaler.step(opt)
            scaler.update()
        else:  # fused Adam takes the flag and skips the update on the device
            opt.found_inf = bad.float()
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm, bad

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA <- decay * EMA + (1 - decay) * G, in fp32; the decay ramps up from 0 over model.ema.warmup_steps.

        Identical on every rank: G's parameters are. (BN buffers differ per rank without sync BN; the EMA's
        are recomputed from its own weights before any use, the same on every rank.)"""
        e = self.cfg.model.ema
        decay = e.decay * min(1.0, (self.step + 1) / e.warmup_steps) if e.warmup_steps else e.decay
        G = self.accelerator.unwrap_model(self.G)
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(G.parameters()), 1.0 - decay)
        for b_ema, b in zip(self.G_ema.buffers(), G.buffers()):  # BN running stats follow G's until they are
            b_ema.copy_(b)  # recomputed for the EMA weights (sample_generator)

    # ------------------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Train to `train.steps`. Returns False when stopped by a signal (after writing a checkpoint)."""
        acc, cfg = self.accelerator, self.cfg
        t, steps, bsz = cfg.train, cfg.train.steps, cfg.train.batch_size
        self._print(f"dcgan_dist: {cfg.model.arch} {cfg.model.image_size}x{cfg.model.image_size} on {cfg.data.name} "
                    f"({len(self.images)} images, {self.batches.batches_per_epoch} batches/epoch)\n"
                    f"  world size {self.world} ({acc.device.type}), batch {bsz}/rank = {bsz * self.world} global, "
                    f"precision {t.mixed_precision}, {steps} steps, run dir {self.run_dir}")
        if self.step >= steps:
            self._print(f"run already complete: step {self.step} of {steps} (raise train.steps to continue)")
            self._finish()
            return True
        bar = tqdm(total=steps, initial=self.step, disable=not (acc.is_main_process and cfg.log.progress),
                   dynamic_ncols=True, desc="train")
        if acc.is_main_process and self.step == 0:  # what the data looks like, once
            real = to_model_range(self.images[:cfg.log.num_samples])
            self.tracker.log_image("samples/real", sampling.grid_array(real), step=0)
        rows, data_time = [], 0.0  # the interval's per-step STATS, still on the device
        t_last = time.perf_counter()
        while self.step < steps:
            t0 = time.perf_counter()
            idx = next(self.batches)  # this rank's slice of the global batch
            # index_select: the same rows as images[idx], several times faster (benchmarks/input_pipeline.py).
            # On CUDA the batch goes through pinned memory, so the copy runs asynchronously with the step.
            batch = self.images.index_select(0, idx)
            batch = batch.pin_memory() if self.device.type == "cuda" else batch
            real = to_model_range(batch.to(self.device, non_blocking=True))
            if self.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            z = torch.randn(len(idx), cfg.model.latent_dim, device=self.device, generator=self.noise)
            data_time += time.perf_counter() - t0
            rows.append(self.train_step(real, z))
            self.step += 1
            bar.update(1)

            stop, overdue = self._agree()
            save = stop or overdue or (t.checkpoint_every and self.step % t.checkpoint_every == 0)
            logged = self.step % cfg.log.every == 0 or self.step == steps
            if save and not logged:  # train.on_nonfinite is applied before anything is written
                self._stop_if(self._count_nonfinite(rows))
            if logged:
                record = self._log(rows, time.perf_counter() - t_last, data_time)
                if acc.is_main_process:
                    bar.set_postfix_str(format_line(self.step, steps, record).split("  ", 1)[1])
                    if not cfg.log.progress:
                        print(format_line(self.step, steps, record), flush=True)
                rows, data_time, self.counted_rows = [], 0.0, 0
            if cfg.log.sample_every and self.step % cfg.log.sample_every == 0:
                self.save_samples()
            if t.eval_every and self.step % t.eval_every == 0:
                self._evaluate()
            if t.check_consistency_every and self.step % t.check_consistency_every == 0:
                check_consistency(self.G, "G"), check_consistency(self.D, "D")  # collectives: every rank
            if save:
                self.save_checkpoint()
            if logged:  # the next interval's clock starts after this one's samples and checkpoint
                t_last = time.perf_counter()
            if stop:
                bar.close()
                self._print(f"stopped by signal at step {self.step}: checkpoint {self.ckpt_root / 'latest'} written; "
                            "continue with train.resume=auto")
                self._finish()
                return False
        bar.close()
        self.save_samples()
        last = self.save_checkpoint()
        self._print(f"done: samples in {self.run_dir / 'samples'}, checkpoint {last}")
        self._finish()
        return True

    def _agree(self) -> tuple[bool, bool]:
        """All ranks agree on (a signal arrived anywhere, rank 0's checkpoint clock ran out)."""
        minutes = self.cfg.train.checkpoint_minutes
        overdue = self.rank == 0 and minutes > 0 and time.monotonic() - self.last_ckpt_time >= 60 * minutes
        flags = torch.tensor([self.signal is not None, overdue], dtype=torch.int32)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(flags[0]), bool(flags[1])

    def _log(self, rows: list[torch.Tensor], seconds: float, data_time: float) -> dict:
        """The interval's STATS, averaged over its finite steps and the ranks -> metrics.jsonl / trackers.

        Then applies train.on_nonfinite to the interval's non-finite steps (whose updates were skipped).
        """
        acc, cfg, count = self.accelerator, self.cfg, len(rows)
        per_step = acc.reduce(torch.stack(rows), reduction="mean").cpu()  # the one host sync of the interval
        finite = per_step[per_step[:, -1] == 0, :-1]
        means = finite.mean(0).tolist() if len(finite) else [math.nan] * len(STATS)
        stop_reason = self._count_nonfinite(rows)
        record = {"step": self.step, "epoch": self.batches.epoch, **dict(zip(STATS, means)),
                  "train/nonfinite_steps": self.nonfinite_steps,
                  "perf/img_per_s": count * cfg.train.batch_size * self.world / seconds,
                  "perf/step_time": seconds / count, "perf/data_time": data_time / count,
                  "lr/G": self.opt_G.param_groups[0]["lr"], "lr/D": self.opt_D.param_groups[0]["lr"]}
        if cfg.loss.name == "bce" and cfg.loss.real_target == 1.0:
            # near an optimal D, L_D = log 4 - 2 JSD(p_data || p_g)  (unsmoothed labels only)
            record["theory/jsd_estimate"] = (math.log(4) - record["loss/D"]) / 2
        if self.device.type == "cuda":
            record["perf/max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if acc.scaler is not None:
            record["train/grad_scale"] = acc.scaler.get_scale()
        self.tracker.log(record)
        self._stop_if(stop_reason)
        return record

    def _count_nonfinite(self, rows: list[torch.Tensor]) -> str:
        """Counts the non-finite steps among the rows not counted yet; returns why the run must stop, or ''.

        The flags are the same on every rank (they are read from all-reduced gradients): all ranks agree.
        """
        t, new = self.cfg.train, rows[self.counted_rows:]
        first, self.counted_rows = self.step - len(new) + 1, len(rows)
        for i, bad in enumerate((torch.stack([r[-1] for r in new]) > 0).tolist() if new else []):
            self.nonfinite_steps += bad
            self.nonfinite_run = self.nonfinite_run + 1 if bad else 0
            if bad and t.on_nonfinite == "stop":
                return f"non-finite loss or gradients at step {first + i} (train.on_nonfinite=stop)"
            if self.nonfinite_run > t.max_consecutive_skips:
                return (f"{self.nonfinite_run} steps in a row with a non-finite loss or gradients, up to step "
                        f"{first + i} (more than train.max_consecutive_skips={t.max_consecutive_skips})")
        return ""

    def _stop_if(self, reason: str) -> None:
        if reason:
            last = checkpoint.latest_checkpoint(self.ckpt_root)
            self._finish()
            raise RunError(f"{reason}; no update was applied from non-finite gradients. Last good checkpoint: "
                           f"{last or 'none written yet'}. Lower optim.lr_g/optim.lr_d and continue from it "
                           "(train.resume=auto), or set train.on_nonfinite=skip")

    def _finish(self) -> None:
        self.tracker.close()
        self.accelerator.end_training()

    def release(self) -> None:
        """Drop the DDP-wrapped G and D (and accelerate's references to them) and collect, once done with them.

        DDP keeps its last all-reduce state; left to interpreter teardown, gloo can abort a rank that has
        finished ("terminate called without an active exception", SIGABRT). Freed here, it goes while the
        interpreter is alive. The EMA generator and the optimizers stay usable."""
        self.accelerator.free_memory()
        self.G = self.D = None
        gc.collect()

    def sample_generator(self) -> torch.nn.Module:
        """The EMA generator if on (its BatchNorm statistics recomputed for its own weights), else G.

        Called on every rank at the same steps (samples, evaluation, checkpoints), so the EMA generator's
        buffers stay identical across ranks.
        """
        if self.G_ema is None:
            return self.accelerator.unwrap_model(self.G)
        if self.ema_calibrated_step != self.step:
            sampling.recalibrate_batchnorm(self.G_ema, seed=self.cfg.train.seed + 1)
            self.ema_calibrated_step = self.step
        return self.G_ema

    def _evaluate(self) -> None:
        """train.eval_every: metrics of train.eval_num samples of the sampling generator (EMA if on), the same
        seeded noise every time, generated in shares by all ranks; then train.keep_best."""
        t, start = self.cfg.train, time.perf_counter()
        metrics = evaluation.evaluate(self.sample_generator(), t.eval_num, self.eval_spaces, seed=t.seed,
                                      accelerator=self.accelerator)  # the same dict on every rank
        self.tracker.log({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()},
                          "eval/seconds": time.perf_counter() - start})
        shown = [k for k in metrics if k.split("/")[1] in ("fd", "fd_floor", "coverage", "confidence")]
        self._print(f"eval at step {self.step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown))
        if t.keep_best:
            value = metrics[t.keep_best]
            if math.isfinite(value) and (self.best is None or
                                         evaluation.is_better(t.keep_best, value, self.best["value"])):
                self.best = {"metric": t.keep_best, "value": value, "step": self.step}
                self.save_checkpoint(best=True)
                self._print(f"best {t.keep_best} so far: checkpoint {self.ckpt_root / 'best'} (step {self.step})")

    def save_samples(self) -> None:
        generator = self.sample_generator()  # every rank: the EMA's statistics are recomputed everywhere
        if self.accelerator.is_main_process:  # eval-mode G: no collectives, so rank 0 alone may run it
            images = sampling.generate(generator, self.fixed_z)
            sampling.save_grid(images, self.run_dir / "samples" / f"step-{self.step:08d}.png")
            self.tracker.log_image("samples/fixed_noise", sampling.grid_array(images), step=self.step)

    def save_checkpoint(self, best: bool = False) -> Path:
        """Everything needed to continue exactly; a collective (every rank's random state is gathered).

        `best`: write it as checkpoints/best (train.keep_best) instead of a step directory.
        """
        acc, unwrap = self.accelerator, self.accelerator.unwrap_model
        self.sample_generator()  # the EMA generator is saved with its own BatchNorm statistics
        rng = {k: acc.gather(v.unsqueeze(0).to(self.device)).cpu()  # [world, ...]
               for k, v in checkpoint.rng_state(self.noise).items()}
        path = self.ckpt_root / ("best" if best else checkpoint.step_dir_name(self.step))
        if acc.is_main_process:
            opt_G, opt_G_rest = checkpoint.flatten_optimizer(self.opt_G.state_dict())
            opt_D, opt_D_rest = checkpoint.flatten_optimizer(self.opt_D.state_dict())
            state = {"generator": unwrap(self.G).state_dict(), "discriminator": unwrap(self.D).state_dict(),
                     "optimizer_G": opt_G, "optimizer_D": opt_D, "rng": rng}
            if self.G_ema is not None:
                state["generator_ema"] = self.G_ema.state_dict()
            meta = {"epoch": self.batches.epoch, "data": self.batches.state_dict(), "generator": self.g_kwargs,
                    "discriminator": self.d_kwargs, "world_size": self.world, "batch_size": self.cfg.train.batch_size,
                    "optimizer_G": opt_G_rest, "optimizer_D": opt_D_rest,
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "config": asdict(self.cfg), "wandb_run_id": self.tracker.run_id,
                    "nonfinite_steps": self.nonfinite_steps, "best": self.best}
            if best:
                checkpoint.save_best(self.ckpt_root, self.step, state, meta)
            else:
                path = checkpoint.save_checkpoint(self.ckpt_root, self.step, state, meta)
                checkpoint.prune(self.ckpt_root, self.cfg.train.keep_last, self.cfg.train.keep_every)
        if not best:
            self.last_ckpt_time = time.monotonic()
        acc.wait_for_everyone()  # no rank runs ahead of a checkpoint that is being written
        return path
