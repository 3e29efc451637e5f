"""The adversarial training loop under Accelerate: one process, many GPUs, or many nodes, one code path.

The trainer sets up Accelerate, the models and their optimizers, and runs the step and the loop. It draws
batches from a batch source (`batches`), never from storage; hands its stateful parts to `train_state`
for checkpoints; reports through `tracking`; evaluates through `evaluation.DuringTraining`.
Lifecycle: `with Trainer(cfg) as trainer: trainer.train()` (or call `close()` yourself).
"""

from __future__ import annotations

import functools
import gc
import math
import signal
import time
import warnings
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from dcgan_dist import checkpoint, launcher
from dcgan_dist.config import Config, validate_world
from dcgan_dist.data.sources import batch_source, to_model_range
from dcgan_dist.errors import RunError
from dcgan_dist.gan import augment, sampling
from dcgan_dist.gan.losses import AdversarialLoss
from dcgan_dist.quality.evaluation import DuringTraining
from dcgan_dist.registry import parse_augment
from dcgan_dist.train import devices, networks, tracking
from dcgan_dist.train import state as train_state
from dcgan_dist.train.stats import IntervalStats
from dcgan_dist.train.sync_bn import check_consistency
from dcgan_dist.train.tracking import Tracker, format_line


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients, on the device (no host sync)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


def _flag_signal(trainer_ref: weakref.ref, signum: int, _frame) -> None:
    trainer = trainer_ref()
    if trainer is not None:
        trainer.signal = signum  # acted on at the next step boundary, by all ranks together


class Trainer:
    def __init__(self, cfg: Config, overwrite: bool = False):
        self.started = time.monotonic()  # train.max_minutes counts from here: set-up included
        device = devices.accelerator_type()
        cfg = validate_world(cfg, launcher.place(slurm=False).world_size, device, devices.native_bf16(device))
        # accelerate always passes broadcast_buffers, which torch 2.14 deprecates; False is still what we mean
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        # broadcast_buffers=False: DDP would otherwise re-broadcast BN buffers at each D forward, which breaks
        # two D forwards before one backward ("modified by an inplace operation"). cpu=True when there is no
        # accelerator, or multi-process CPU launches come up as independent single processes. The collective
        # timeout turns a rank that died or diverged into an error instead of a hang.
        self.accelerator = acc = Accelerator(
            cpu=device == "cpu", mixed_precision=cfg.train.mixed_precision, log_with=tracking.log_with(cfg) or None,
            project_config=ProjectConfiguration(project_dir=str(cfg.run_dir),
                                                logging_dir=str(cfg.run_dir / "tensorboard")),
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                             InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))])
        self.cfg, self.device, self.world, self.rank = cfg, acc.device, acc.num_processes, acc.process_index
        self.run_dir, self.ckpt_root, self.closed = cfg.run_dir, cfg.run_dir / "checkpoints", False
        resume = None if overwrite else train_state.find_resume(cfg, self._print)  # every rank reads; no writes yet

        # no collective: one process prepares a missing cached store while the others wait on its file lock
        self.data = batch_source(cfg, self.rank, self.world, pin_memory=device == "cuda", warn=self._print)
        self.evaluator = DuringTraining(cfg, acc, self._print) if cfg.train.eval_every else None

        nets = networks.build(cfg, self.device)
        self.ema, self.opt_G, self.opt_D, self.channels_last = nets.ema, nets.opt_G, nets.opt_D, nets.channels_last
        # The optimizers stay plain torch ones: accelerate's wrapper adds ~0.15 ms of Python per step and call,
        # which a small model on a GPU notices (benchmarks/gpu.sh); fp16 scaling is done here (`_update`).
        self.G, self.D = acc.prepare(nets.G, nets.D)
        self.loss = AdversarialLoss(cfg.loss.name, cfg.loss.g_loss, cfg.loss.real_target, cfg.loss.g_target)
        self.augment_policy = parse_augment(cfg.train.augment)
        # Each rank draws its own noise; the fixed grid noise is the same everywhere.
        self.noise = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + self.rank + 1)
        # the fixed grid: the same z everywhere; a conditional model's has one row per class
        self.fixed_z, self.fixed_y, self.grid_nrow = sampling.class_grid(cfg.log.num_samples, cfg.model.latent_dim,
                                                                         cfg.model.num_classes, cfg.train.seed)
        self.parts = train_state.Parts(acc.unwrap_model(self.G), acc.unwrap_model(self.D), self.ema, self.opt_G,
                                       self.opt_D, acc.scaler, self.noise, self.data)
        restored = train_state.restore(*resume, self.parts, cfg, self.rank, self._print) if resume else {}
        self.step = restored.get("step", 0)
        self.stats = IntervalStats(cfg.train.on_nonfinite, cfg.train.max_consecutive_skips,
                                   restored.get("nonfinite_steps", 0))
        self.best = restored.get("best")  # train.keep_best: {metric, value, step} of checkpoints/best

        # Preemption: a signal only sets a flag; ranks agree on it at the next step boundary (one small
        # all-reduce on the CPU, over gloo, so no device sync is added to the step).
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # by weak reference: the handler must not keep the trainer
            signal.signal(sig, functools.partial(_flag_signal, weakref.ref(self)))  # alive
        self.cpu_group = dist.new_group(backend="gloo") if self.world > 1 and dist.get_backend() != "gloo" else None
        self.last_ckpt_time = time.monotonic()
        acc.wait_for_everyone()  # every rank has read what it resumes from before rank 0 writes
        if acc.is_main_process:
            tracking.prepare_run_dir(cfg, self.step, overwrite)
        self.tracker = Tracker(acc, cfg, self.run_dir, tracking.run_config(cfg, self.world),
                               restored.get("wandb_run_id"))

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:  # global rank 0 (accelerator.print prints once per node)
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------
    def train_step(self, real: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """One D step then one G step on `real` [B, C, H, W] in [-1, 1] and noise `z` [B, latent]; a conditional
        model also takes the real images' labels `y` [B], which the fakes are asked for too.

        Under DDP every rank must make the same forwards in the same order (with synchronized BN each
        forward is a collective): G(z), D(real), D(fake), then D(fake) again in the G phase.
        Returns the STATS and a last "non-finite" flag as one detached tensor (no host sync here).
        """
        acc, G, D, loss, aug = self.accelerator, self.G, self.D, self.loss, self._augment
        fake = G(z, y)  # [B, C, H, W]; one G forward serves both phases, as in the reference recipe

        # D: real. The first backward only accumulates locally; the fake backward all-reduces both at once.
        D.requires_grad_(True)
        with acc.no_sync(D):
            real_logits = D(aug(real), y)
            loss_real = loss.d_real(real_logits)  # -log D(x)  (BCE against real_target)
            self._backward(loss_real)
        # D: fake. G is not updated here: the graph is cut at fake.detach().
        fake_logits = D(aug(fake.detach()), y)
        loss_fake = loss.d_fake(fake_logits)  # -log(1 - D(G(z)))
        self._backward(loss_fake)
        grad_norm_D, bad_D = self._update(self.opt_D, D)

        # G: fool D. D is frozen (no weight gradients) and run outside DDP's reducer (no_sync), so only
        # G's gradients are all-reduced, once, in this backward.
        D.requires_grad_(False)
        with acc.no_sync(D):
            g_logits = D(aug(fake), y)
        loss_g = loss.g(g_logits)  # -log D(G(z))  (non-saturating)
        self._backward(loss_g)
        grad_norm_G, bad_G = self._update(self.opt_G, G)
        if self.ema is not None:
            self.ema.update(self.parts.G, self.step)

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

    # ------------------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Train to `train.steps`, or until train.max_minutes: either ends the run (final grid and checkpoint).
        Returns False when stopped by a signal (after writing a checkpoint)."""
        acc, cfg = self.accelerator, self.cfg
        t, steps, bsz = cfg.train, cfg.train.steps, cfg.train.batch_size
        m = cfg.model
        conditional = f", conditional on {m.num_classes} classes ({m.cond})" if m.num_classes else ""
        self._print(f"dcgan_dist: {m.arch} {m.image_size}x{m.image_size}{conditional} on {cfg.data.name} "
                    f"({self.data.num_items} images, {self.data.batches_per_epoch} batches/epoch)\n"
                    f"  world size {self.world} ({acc.device.type}), batch {bsz}/rank = {bsz * self.world} global, "
                    f"precision {t.mixed_precision}, {steps} steps, run dir {self.run_dir}")
        if self.step >= steps:
            self._print(f"run already complete: step {self.step} of {steps} (raise train.steps to continue)")
            return True
        bar = tqdm(total=steps, initial=self.step, disable=not (acc.is_main_process and cfg.log.progress),
                   dynamic_ncols=True, desc="train")
        if acc.is_main_process and self.step == 0:  # what the data looks like, once
            real = to_model_range(self.data.first(cfg.log.num_samples))
            self.tracker.log_image("samples/real", sampling.grid_array(real), step=0)
        t_last = time.perf_counter()
        while self.step < steps:
            t0 = time.perf_counter()
            images, labels = next(self.data)  # this rank's slice of the global batch, uint8 on the host
            real = to_model_range(images.to(self.device, non_blocking=True))  # async from pinned memory on CUDA
            if self.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            z = torch.randn(len(images), cfg.model.latent_dim, device=self.device, generator=self.noise)
            y = labels.to(self.device, non_blocking=True) if cfg.model.num_classes else None
            data_time = time.perf_counter() - t0
            self.stats.add(self.train_step(real, z, y), data_time)
            self.step += 1
            bar.update(1)

            stop, overdue, out_of_time = self.agree()
            save = stop or overdue or (t.checkpoint_every and self.step % t.checkpoint_every == 0)
            logged = self.step % cfg.log.every == 0 or self.step == steps or out_of_time
            if save and not logged:  # train.on_nonfinite is applied before anything is written
                self._stop_if(self.stats.check(self.step))
            if logged:
                record = self._log(time.perf_counter() - t_last)
                if acc.is_main_process:
                    bar.set_postfix_str(format_line(self.step, steps, record).split("  ", 1)[1])
                    if not cfg.log.progress:
                        print(format_line(self.step, steps, record), flush=True)
            # once a stop signal has arrived nothing new starts: the launcher's grace period is for the checkpoint
            if cfg.log.sample_every and self.step % cfg.log.sample_every == 0 and not stop:
                self.save_samples()
            if t.eval_every and self.step % t.eval_every == 0 and not stop:
                self._evaluate()
            if t.check_consistency_every and self.step % t.check_consistency_every == 0:
                check_consistency(self.G, "G"), check_consistency(self.D, "D")  # collectives: every rank
            if save:
                self.save_checkpoint()
            if logged:  # the next interval's clock starts after this one's samples and checkpoint
                t_last = time.perf_counter()
            if stop:
                self.tracker.mark_preempting()
                bar.close()
                self._print(f"stopped by signal at step {self.step}: checkpoint {self.ckpt_root / 'latest'} written; "
                            "continue with train.resume=auto")
                return False
            if out_of_time:
                break
        bar.close()
        if not (cfg.log.sample_every and self.step % cfg.log.sample_every == 0):  # else this grid is saved already
            self.save_samples()
        last = self.save_checkpoint()
        self.tracker.log_generator(last, "final")
        budget = f" (train.max_minutes = {t.max_minutes:g} reached; run again to train on)" if self.step < steps else ""
        self._print(f"done: samples in {self.run_dir / 'samples'}, checkpoint {last}; step {self.step} of {steps}"
                    + budget)
        return True

    def agree(self) -> tuple[bool, bool, bool]:
        """All ranks agree on (a signal arrived anywhere, rank 0's checkpoint clock ran out, rank 0's
        train.max_minutes budget ran out)."""
        t, now = self.cfg.train, time.monotonic()
        overdue = self.rank == 0 and t.checkpoint_minutes > 0 and now - self.last_ckpt_time >= 60 * t.checkpoint_minutes
        out_of_time = self.rank == 0 and t.max_minutes > 0 and now - self.started >= 60 * t.max_minutes
        flags = torch.tensor([self.signal is not None, overdue, out_of_time], dtype=torch.int32)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _log(self, seconds: float) -> dict:
        """The interval's statistics -> metrics.jsonl / trackers; then train.on_nonfinite is applied."""
        acc, cfg = self.accelerator, self.cfg
        means, count, data_time, stop_reason = self.stats.reduce(acc, self.step)
        record = {"step": self.step, "epoch": self.data.epoch, **means,
                  "train/nonfinite_steps": self.stats.nonfinite_steps,
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

    def _stop_if(self, reason: str) -> None:
        if reason:
            last = checkpoint.latest_checkpoint(self.ckpt_root)
            raise RunError(f"{reason}; no update was applied from non-finite gradients. Last good checkpoint: "
                           f"{last or 'none written yet'}. Lower optim.lr_g/optim.lr_d and continue from it "
                           "(train.resume=auto), or set train.on_nonfinite=skip")

    def sampling_generator(self) -> torch.nn.Module:
        """What samples, evaluation and exports use: the EMA generator if on (BatchNorm statistics of its own
        weights, recomputed on every rank), else G. Called on every rank at the same steps."""
        return self.ema.module_at(self.step) if self.ema is not None else self.parts.G

    def _evaluate(self) -> None:
        start = time.perf_counter()
        metrics = self.evaluator(self.sampling_generator())  # the same on every rank
        self.tracker.log({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()},
                          "eval/seconds": time.perf_counter() - start})
        shown = [k for k in metrics if k.split("/")[1] in ("fd", "fd_floor", "coverage", "confidence",
                                                           "class_accuracy")]
        self._print(f"eval at step {self.step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown))
        if self.evaluator.improves(metrics, self.best):
            self.best = {"metric": self.cfg.train.keep_best, "value": metrics[self.cfg.train.keep_best],
                         "step": self.step}
            self.tracker.log_generator(self.save_checkpoint(best=True), "best")
            self._print(f"best {self.best['metric']} so far: checkpoint {self.ckpt_root / 'best'} (step {self.step})")

    def save_samples(self) -> None:
        generator = self.sampling_generator()  # every rank: the EMA's statistics are recomputed everywhere
        if self.accelerator.is_main_process:  # eval-mode G: no collectives, so rank 0 alone may run it
            images = sampling.generate(generator, self.fixed_z, self.fixed_y)
            sampling.save_grid(images, self.run_dir / "samples" / f"step-{self.step:08d}.png", self.grid_nrow)
            self.tracker.log_image("samples/fixed_noise", sampling.grid_array(images, self.grid_nrow), step=self.step)

    def save_checkpoint(self, best: bool = False) -> Path:
        """Everything needed to continue exactly (train_state.save); a collective. `best`: as checkpoints/best."""
        counters = {"nonfinite_steps": self.stats.nonfinite_steps, "best": self.best,
                    "wandb_run_id": self.tracker.run_id}
        path = train_state.save(self.accelerator, self.parts, self.cfg, self.step, counters, best=best)
        if not best:
            self.last_ckpt_time = time.monotonic()
        return path

    # ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the trackers and accelerate, then free the DDP-wrapped G and D while the interpreter is alive
        (left to its teardown, gloo can abort a finished rank: "terminate called without an active exception").
        Idempotent; the EMA generator, un-wrapped G and D and the optimizers stay usable."""
        if self.closed:
            return
        self.closed = True
        self.tracker.close()
        self.accelerator.end_training()
        self.accelerator.free_memory()
        self.G = self.D = None
        gc.collect()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
