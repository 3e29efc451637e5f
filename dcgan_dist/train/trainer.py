"""The adversarial training loop under Accelerate: one process, many GPUs, or many nodes, one code path.

The trainer sets up Accelerate, the models and their optimizers, and runs the step and the loop. It draws
batches from a batch source (`batches`), never from storage; registers its stateful parts once with the
training state (`train_state`), which saves and restores them; agrees with the other ranks on signals and
clocks through `agreement`; reports through `tracking`; evaluates through `evaluator.DuringTraining`.
Lifecycle: `with Trainer(cfg) as trainer: trainer.train()` (or call `close()` yourself).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcgan_dist import launcher
from dcgan_dist.config import Config, check_data, validate_world
from dcgan_dist.data.batches import to_model_range
from dcgan_dist.data.sources import batch_source, facts
from dcgan_dist.gan import augment, sampling
from dcgan_dist.gan.losses import adversarial_loss
from dcgan_dist.registry import parse_augment
from dcgan_dist.train import accelerator, devices, networks, ownership, tracking, updates
from dcgan_dist.train import state as train_state
from dcgan_dist.train.agreement import Agreement
from dcgan_dist.train.evaluator import DuringTraining
from dcgan_dist.train.graphs import GraphedStep
from dcgan_dist.train.stats import IntervalStats, step_row
from dcgan_dist.train.sync_bn import check_consistency
from dcgan_dist.train.tracking import Tracker, format_line


class Trainer:
    def __init__(self, cfg: Config, overwrite: bool = False):
        self.started = time.monotonic()  # train.max_minutes counts from here (set-up included), or from the
        # job's first start in a worker group the launcher restarted (`ownership.own_run_dir`)
        device = devices.accelerator_type()
        cfg = validate_world(cfg, launcher.place(slurm=False).world_size, device, devices.native_bf16(device))
        self.facts = facts(cfg.data, cfg.model)  # once, before anything heavy (a store's manifest)
        check_data(cfg, self.facts)  # ... against the model
        self.accelerator = acc = accelerator.build(cfg, device)  # DDP, precision, trackers, the process group
        self.cfg, self.device, self.world, self.rank = cfg, acc.device, acc.num_processes, acc.process_index
        self.run_dir, self.ckpt_root, self.closed = cfg.run_dir, cfg.run_dir / "checkpoints", False
        # rank 0 owns the run directory from here until close()
        self.owner, self.started = ownership.own_run_dir(acc, cfg.run_dir, cfg.train.collective_timeout_s, self.started,
                                               self._print)
        try:
            self._set_up(cfg, overwrite, device)
        except BaseException:
            if self.owner is not None:  # a bad checkpoint, store or W&B set-up: the run directory is free again
                self.owner.release()
            raise

    def _set_up(self, cfg: Config, overwrite: bool, device: str) -> None:
        acc, m, t = self.accelerator, cfg.model, cfg.train
        channels = self.facts.channels  # every rank reads what it resumes from; no writes yet
        resume = None if overwrite else train_state.find_resume(cfg, self._print, channels)

        # no collective: one process prepares a missing cached store while the others wait on its file lock
        self.data = batch_source(cfg.data, self.facts, t.batch_size, t.seed, self.rank, self.world,
                                 pin_memory=device == "cuda", progress=cfg.log.progress, warn=self._print)
        self.evaluator = DuringTraining(cfg.data, t, m.image_size, channels, acc, self._print) if t.eval_every else None

        kwargs = cfg.model_kwargs(channels)  # what builds G and D, and what their checkpoints say builds them
        nets = networks.build(*kwargs, m, t, cfg.optim, self.device)
        self.ema, self.opt_G, self.opt_D, self.channels_last = nets.ema, nets.opt_G, nets.opt_D, nets.channels_last
        # The optimizers stay plain torch ones: accelerate's wrapper adds ~0.15 ms of Python per step and call,
        # which a small model on a GPU notices (benchmarks/gpu.sh); fp16 scaling is done here (`updates`).
        self.G, self.D = acc.prepare(nets.G, nets.D)
        self.loss = adversarial_loss(cfg.loss.name, cfg.loss.g_loss, cfg.loss.real_target, cfg.loss.g_target)
        self.augment_policy = parse_augment(t.augment)
        self.noise = train_state.seed_rank(t.seed, self.rank, self.device)  # each rank draws its own noise
        # train.cuda_graphs: the step from the batch on is replayed as one CUDA graph, which reads the EMA's
        # weight from the device (filled before each call, warm-up steps included, so every step does the same)
        self.graphed = GraphedStep(self._step_on, [self.noise]) if t.cuda_graphs else None
        self.ema_weight = torch.zeros((), device=self.device) if self.graphed and self.ema is not None else None
        # the fixed grid: the same z everywhere; a conditional model's has one row per class
        self.fixed_z, self.fixed_y, self.grid_nrow = sampling.class_grid(cfg.log.num_samples, m.latent_dim,
                                                                         m.num_classes, t.seed)
        self.G_raw, D_raw = acc.unwrap_model(self.G), acc.unwrap_model(self.D)  # un-wrapped from DDP
        self.stats = IntervalStats(t.on_nonfinite, t.max_consecutive_skips, self.ckpt_root)
        self.step, self.best, self.wandb_run_id = 0, None, None  # best: {metric, value, step} of checkpoints/best
        # Everything a checkpoint holds, each part registered once; the networks' and the data's in train_state
        self.state = st = train_state.training_state(acc, cfg, kwargs, self.G_raw, D_raw, self.ema, self.opt_G,
                                                     self.opt_D, self.noise, self.data, self._print)
        st.register("nonfinite_steps", lambda: self.stats.nonfinite_steps,
                    lambda n: setattr(self.stats, "nonfinite_steps", n or 0))
        st.register("best", lambda: self.best, lambda best: setattr(self, "best", best))
        st.register("wandb_run_id", lambda: self.tracker.run_id, lambda run_id: setattr(self, "wandb_run_id", run_id))
        if resume:
            self.step = st.restore(*resume)
            self._print(f"resuming from {resume[0]} at step {self.step} (epoch {self.data.epoch})")
        # preemption signals and the clocks, agreed at each step boundary: `self.agree()`
        self.agree = Agreement(t.checkpoint_minutes, t.max_minutes, self.rank, self.world, self.started)
        acc.wait_for_everyone()  # every rank has read what it resumes from before rank 0 writes
        if acc.is_main_process:
            tracking.prepare_run_dir(cfg, self.step, overwrite)
        protocols = {"eval_protocols": self.evaluator.protocols} if self.evaluator else {}  # what eval/*/fd compares
        self.tracker = Tracker(acc, cfg, self.run_dir, tracking.run_config(cfg, self.world) | protocols,
                               self.wandb_run_id)
        if self.owner is not None:
            self.owner.commit()  # the run has started: the lock file names its owner from now on

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:  # global rank 0 (accelerator.print prints once per node)
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------
    def run_step(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Step `self.step` from this rank's batch on the device (uint8 images, labels or None), as the loop runs
        it: replayed as a CUDA graph under train.cuda_graphs, else eagerly. Returns `stats.step_row`."""
        if self.ema_weight is not None:  # read by the graph on the device
            self.ema_weight.fill_(self.ema.weight(self.step))
        return (self.graphed or self._step_on)(images, labels)

    def _step_on(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The step from this rank's batch on the device (uint8 images, labels or None): the model's range and
        layout, the noise, `train_step`. What train.cuda_graphs captures."""
        real = to_model_range(images)
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(len(images), self.cfg.model.latent_dim, device=self.device, generator=self.noise)
        return self.train_step(real, z, labels)

    def train_step(self, real: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """One D step then one G step on `real` [B, C, H, W] in [-1, 1] and noise `z` [B, latent]; a conditional
        model also takes the real images' labels `y` [B], which the fakes are asked for too.

        Under DDP every rank must make the same forwards in the same order (with synchronized BN each
        forward is a collective): G(z), D(real), D(fake), then D(fake) again in the G phase.
        Returns the step's report, `stats.step_row`: one detached tensor (no host sync here).
        """
        acc, G, D, loss, aug = self.accelerator, self.G, self.D, self.loss, self._augment
        fake = G(z, y)  # [B, C, H, W]; one G forward serves both phases, as in the reference recipe

        # D: real. The first backward only accumulates locally; the fake backward all-reduces both at once.
        D.requires_grad_(True)
        with acc.no_sync(D):
            real_logits = D(aug(real), y)
            loss_real = loss.d_real(real_logits)  # D's loss on the real images (the objective's: gan/losses.py)
            updates.backward(loss_real, acc.scaler)
        # D: fake. G is not updated here: the graph is cut at fake.detach().
        fake_logits = D(aug(fake.detach()), y)
        loss_fake = loss.d_fake(fake_logits)  # ... and on the fakes
        updates.backward(loss_fake, acc.scaler)
        grad_norm_D, bad_D = updates.update(self.opt_D, D, acc.scaler)

        # G: fool D. D is frozen (no weight gradients) and run outside DDP's reducer (no_sync), so only
        # G's gradients are all-reduced, once, in this backward.
        D.requires_grad_(False)
        with acc.no_sync(D):
            g_logits = D(aug(fake), y)
        loss_g = loss.g(g_logits)  # G's: D should take the fakes for real
        updates.backward(loss_g, acc.scaler)
        grad_norm_G, bad_G = updates.update(self.opt_G, G, acc.scaler)
        if self.ema is not None:
            self.ema.update(self.G_raw, self.ema.weight(self.step) if self.ema_weight is None else self.ema_weight)
        return step_row(loss_real, loss_fake, loss_g, grad_norm_G, grad_norm_D, bad_D | bad_G,
                        real_logits, fake_logits, g_logits)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """train.augment: the same random transforms for real and fake, drawn from the checkpointed noise generator."""
        return augment.augment(x, self.augment_policy, self.noise) if self.augment_policy else x

    # ------------------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Train to `train.steps`, or until train.max_minutes: either ends the run (final grid and checkpoint).
        Returns False when stopped by a signal (after writing a checkpoint)."""
        acc, cfg = self.accelerator, self.cfg
        t, steps = cfg.train, cfg.train.steps
        self._print(tracking.describe_run(cfg, self.data, self.world, acc.device.type))
        if self.step >= steps:
            self._print(f"run already complete: step {self.step} of {steps} (raise train.steps to continue)")
            return True
        self.bar = tqdm(total=steps, initial=self.step, disable=not (acc.is_main_process and cfg.log.progress),
                        dynamic_ncols=True, desc="train")
        if self.step == 0:  # what the data looks like, once
            self.tracker.log_data(self.data, cfg.log.num_samples)
        self.interval_start = time.perf_counter()
        while self.step < steps:
            t0 = time.perf_counter()
            images, labels = next(self.data)  # this rank's slice of the global batch, uint8 on the host
            images = images.to(self.device, non_blocking=True)  # async from pinned memory on CUDA
            labels = labels.to(self.device, non_blocking=True) if cfg.model.num_classes else None
            data_time = time.perf_counter() - t0
            self.stats.add(self.run_step(images, labels), data_time)
            self.step += 1
            self.bar.update(1)
            stop, out_of_time = self._after_step()
            if stop:
                self._print(f"stopped by signal at step {self.step}: checkpoint {self.ckpt_root / 'latest'} written; "
                            "continue with train.resume=auto")
                return False
            if out_of_time:
                break
        self.bar.close()
        if not (cfg.log.sample_every and self.step % cfg.log.sample_every == 0):  # else this grid is saved already
            self.save_samples()
        last = self.save_checkpoint()
        self.tracker.log_generator(last, "final")
        self.tracker.draw_curves()
        budget = f" (train.max_minutes = {t.max_minutes:g} reached; run again to train on)" if self.step < steps else ""
        self._print(f"done: samples in {self.run_dir / 'samples'}, checkpoint {last}; step {self.step} of {steps}"
                    + budget)
        return True

    def _after_step(self) -> tuple[bool, bool]:
        """The periodic jobs after a step, in their order: the agreement (signals, clocks), train.on_nonfinite,
        the interval's metrics, the sample grid, evaluation, the consistency check, the checkpoint. Returns
        (stopped by a signal: checkpoint written, train.max_minutes reached)."""
        t, lg, step = self.cfg.train, self.cfg.log, self.step
        stop, overdue, out_of_time = self.agree()
        save = stop or overdue or (t.checkpoint_every and step % t.checkpoint_every == 0)
        logged = step % lg.every == 0 or step == t.steps or out_of_time
        if save and not logged:  # train.on_nonfinite is applied before anything is written
            self.stats.stop_if(self.stats.check(step))
        if logged:
            record = self._log(time.perf_counter() - self.interval_start)
            tracking.show(self.bar, format_line(step, t.steps, record), self.accelerator.is_main_process, lg.progress)
        # once a stop signal has arrived nothing new starts: the launcher's grace period is for the checkpoint
        if lg.sample_every and step % lg.sample_every == 0 and not stop:
            self.save_samples()
        if t.eval_every and step % t.eval_every == 0 and not stop:
            self._evaluate()
        if t.check_consistency_every and step % t.check_consistency_every == 0:
            check_consistency(self.G, "G"), check_consistency(self.D, "D")  # collectives: every rank
        if save:
            self.save_checkpoint()
        if logged:  # the next interval's clock starts after this one's samples and checkpoint
            self.interval_start = time.perf_counter()
        if stop:
            self.tracker.mark_preempting()
            self.bar.close()
        return stop, out_of_time

    def _log(self, seconds: float) -> dict:
        """The interval's statistics -> metrics.jsonl / trackers; then train.on_nonfinite is applied."""
        acc, cfg = self.accelerator, self.cfg
        stats, stop_reason = self.stats.reduce(acc, self.step, seconds, cfg.train.batch_size * self.world)
        record = {"step": self.step, "epoch": self.data.epoch, **stats,
                  "lr/G": self.opt_G.param_groups[0]["lr"], "lr/D": self.opt_D.param_groups[0]["lr"]}
        record |= self.loss.theory(record["loss/D"])  # what D's loss estimates, where the objective says
        if self.device.type == "cuda":
            record["perf/max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if acc.scaler is not None:
            record["train/grad_scale"] = acc.scaler.get_scale()
        self.tracker.log(record)
        self.stats.stop_if(stop_reason)
        return record

    def sampling_generator(self) -> torch.nn.Module:
        """What samples, evaluation and exports use: the EMA generator if on (BatchNorm statistics of its own
        weights, recomputed on every rank), else G. Called on every rank at the same steps."""
        return self.ema.module_at(self.step) if self.ema is not None else self.G_raw

    def _evaluate(self) -> None:
        start = time.perf_counter()
        metrics = self.evaluator(self.sampling_generator())  # the same on every rank
        self.tracker.log_eval(self.step, metrics, time.perf_counter() - start)
        if self.evaluator.improves(metrics, self.best):
            key = self.cfg.train.keep_best
            self.best = {"metric": key, "value": metrics[key], "step": self.step}
            self.tracker.log_generator(self.save_checkpoint("best"), "best")
            self._print(f"best {key} so far: checkpoint {self.ckpt_root / 'best'} (step {self.step})")

    def save_samples(self) -> None:  # sampling_generator on every rank (the EMA's statistics); rank 0 draws
        self.tracker.log_samples(self.sampling_generator(), self.fixed_z, self.fixed_y, self.grid_nrow, self.step)

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Every registered part, as checkpoints/step-N (the checkpoint clock restarts) or `name` (`best`)."""
        path = self.state.save(self.step, name)  # a collective
        if name is None:
            self.agree.checkpointed()
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
        if self.owner is not None:  # the last file is written: the run directory is free
            self.owner.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
