"""The adversarial training loop under Accelerate: one process, many GPUs, or many nodes, one code path."""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import asdict

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from dcgan_dist import checkpoint, sampling
from dcgan_dist.config import Config, save_config, validate_world
from dcgan_dist.data import ShardedBatches, load_images, to_model_range
from dcgan_dist.errors import UserError
from dcgan_dist.losses import AdversarialLoss
from dcgan_dist.models import Discriminator, Generator, init_weights
from dcgan_dist.tracking import MetricsLog, format_line

STATS = ("loss/D", "loss/D_real", "loss/D_fake", "loss/G", "D/real", "D/fake_before", "D/fake_after")


def model_kwargs(cfg: Config) -> tuple[dict, dict]:
    """The plain kwargs that rebuild G and D (stored in every checkpoint's meta.json)."""
    m, common = cfg.model, dict(channels=cfg.image_channels, image_size=cfg.model.image_size, arch=cfg.model.arch)
    return (dict(latent_dim=m.latent_dim, width=m.g_width, norm=m.norm, **common),
            dict(width=m.d_width, norm=m.norm, **common))


class Trainer:
    def __init__(self, cfg: Config, overwrite: bool = False):
        cuda = torch.cuda.is_available()
        cfg = validate_world(cfg, int(os.environ.get("WORLD_SIZE", "1")), cuda)
        self.run_dir = cfg.run_dir
        if (self.run_dir / "checkpoints" / "latest").exists() and not overwrite:
            raise UserError(f"run directory {self.run_dir} already holds a run; pass --overwrite to replace it, "
                            "or choose another run.name / run.dir")
        # broadcast_buffers=False: DDP would otherwise re-broadcast BN buffers at each D forward, which breaks
        # two D forwards before one backward ("modified by an inplace operation"). cpu=True when there is no
        # CUDA, or multi-process CPU launches come up as independent single processes.
        self.accelerator = acc = Accelerator(
            cpu=not cuda, mixed_precision=cfg.train.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self.cfg, self.device, self.world = cfg, acc.device, acc.num_processes

        with acc.main_process_first():  # rank 0 fills the decode cache, the others read it
            d = cfg.data
            self.images = load_images(d.name, d.root, cfg.model.image_size, cfg.image_channels, d.download,
                                      d.cache_dir, d.num_images)  # uint8 [N, C, S, S] on the host
        self.batches = ShardedBatches(len(self.images), cfg.train.batch_size, acc.process_index, self.world,
                                      cfg.train.seed)
        if acc.is_main_process:
            self._prepare_run_dir(overwrite)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.g_kwargs, self.d_kwargs = model_kwargs(cfg)
        G, D = Generator(**self.g_kwargs), Discriminator(**self.d_kwargs)
        G.apply(init_weights), D.apply(init_weights)
        self.G_ema = copy.deepcopy(G).requires_grad_(False).to(self.device) if cfg.model.ema.decay > 0 else None
        o = cfg.optim
        opt_G = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
        opt_D = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
        self.G, self.D, self.opt_G, self.opt_D = acc.prepare(G, D, opt_G, opt_D)
        self.loss = AdversarialLoss(cfg.loss.name, cfg.loss.g_loss, cfg.loss.real_target, cfg.loss.g_target)

        # Each rank draws its own noise; the fixed grid noise is the same everywhere.
        self.noise = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + acc.process_index + 1)
        self.fixed_z = sampling.fixed_noise(cfg.log.num_samples, cfg.model.latent_dim, cfg.train.seed)
        self.step = 0
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if acc.is_main_process else None

    def _prepare_run_dir(self, overwrite: bool) -> None:
        if overwrite:
            for name in ("checkpoints", "samples"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")

    # ------------------------------------------------------------------------------------------------
    def train_step(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One D step then one G step on `real` [B, C, H, W] in [-1, 1] and noise `z` [B, latent].

        Under DDP every rank must make the same forwards in the same order (with synchronized BN each
        forward is a collective): G(z), D(real), D(fake), then D(fake) again in the G phase.
        Returns the STATS as one detached tensor (no host sync here).
        """
        acc, G, D, loss = self.accelerator, self.G, self.D, self.loss
        fake = G(z)  # [B, C, H, W]; one G forward serves both phases, as in the seed

        # D: real. The first backward only accumulates locally; the fake backward all-reduces both at once.
        D.requires_grad_(True)
        with acc.no_sync(D):
            real_logits = D(real)
            loss_real = loss.d_real(real_logits)  # -log D(x)  (BCE against real_target)
            acc.backward(loss_real)
        # D: fake. G is not updated here: the graph is cut at fake.detach().
        fake_logits = D(fake.detach())
        loss_fake = loss.d_fake(fake_logits)  # -log(1 - D(G(z)))
        acc.backward(loss_fake)
        self.opt_D.step()
        self.opt_D.zero_grad(set_to_none=True)

        # G: fool D. D is frozen (no weight gradients) and run outside DDP's reducer (no_sync), so only
        # G's gradients are all-reduced, once, in this backward.
        D.requires_grad_(False)
        with acc.no_sync(D):
            g_logits = D(fake)
        loss_g = loss.g(g_logits)  # -log D(G(z))  (non-saturating)
        acc.backward(loss_g)
        self.opt_G.step()
        self.opt_G.zero_grad(set_to_none=True)
        if self.G_ema is not None:
            self._update_ema()

        probs = [torch.sigmoid(x.detach().float()).mean() for x in (real_logits, fake_logits, g_logits)]
        return torch.stack([loss_real + loss_fake, loss_real, loss_fake, loss_g, *probs]).detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        G = self.accelerator.unwrap_model(self.G)
        ema_params, params = list(self.G_ema.parameters()), list(G.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - self.cfg.model.ema.decay)
        for b_ema, b in zip(self.G_ema.buffers(), G.buffers()):  # BN running stats follow G's
            b_ema.copy_(b)

    # ------------------------------------------------------------------------------------------------
    def train(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        t, steps, bsz = cfg.train, cfg.train.steps, cfg.train.batch_size
        acc.print(f"dcgan_dist: {cfg.model.arch} {cfg.model.image_size}x{cfg.model.image_size} on {cfg.data.name} "
                  f"({len(self.images)} images, {self.batches.batches_per_epoch} batches/epoch)\n"
                  f"  world size {self.world} ({acc.device.type}), batch {bsz}/rank = {bsz * self.world} global, "
                  f"precision {t.mixed_precision}, {steps} steps, run dir {self.run_dir}")
        bar = tqdm(total=steps, initial=self.step, disable=not (acc.is_main_process and cfg.log.progress),
                   dynamic_ncols=True, desc="train")
        sums, count, t_last = torch.zeros(len(STATS), device=self.device), 0, time.perf_counter()
        while self.step < steps:
            idx = next(self.batches)  # this rank's slice of the global batch
            real = to_model_range(self.images[idx].to(self.device, non_blocking=True))
            z = torch.randn(len(idx), cfg.model.latent_dim, device=self.device, generator=self.noise)
            sums += self.train_step(real, z)
            count += 1
            self.step += 1
            bar.update(1)

            if self.step % cfg.log.every == 0 or self.step == steps:
                # the one host sync of the interval: mean over steps here, then over ranks
                means = (acc.reduce(sums, reduction="mean") / count).tolist()
                now = time.perf_counter()
                record = {"step": self.step, "epoch": self.batches.epoch, **dict(zip(STATS, means)),
                          "perf/img_per_s": count * bsz * self.world / (now - t_last),
                          "lr/G": self.opt_G.param_groups[0]["lr"], "lr/D": self.opt_D.param_groups[0]["lr"]}
                if self.metrics is not None:
                    self.metrics.log(record)
                    bar.set_postfix_str(format_line(self.step, steps, record).split("  ", 1)[1])
                    if not cfg.log.progress:
                        print(format_line(self.step, steps, record), flush=True)
                sums.zero_()
                count, t_last = 0, time.perf_counter()
            if cfg.log.sample_every and self.step % cfg.log.sample_every == 0:
                self.save_samples()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_samples()
        last = self.save_checkpoint()
        if acc.is_main_process:
            self.metrics.close()
            acc.print(f"done: samples in {self.run_dir / 'samples'}, checkpoint {last}")
        acc.end_training()

    def sample_generator(self) -> torch.nn.Module:
        return self.G_ema if self.G_ema is not None else self.accelerator.unwrap_model(self.G)

    def save_samples(self) -> None:
        if self.accelerator.is_main_process:  # eval-mode G: no collectives, so rank 0 alone may run it
            images = sampling.generate(self.sample_generator(), self.fixed_z)
            sampling.save_grid(images, self.run_dir / "samples" / f"step-{self.step:08d}.png")

    def save_checkpoint(self):
        path = self.run_dir / "checkpoints" / checkpoint.step_dir_name(self.step)
        if self.accelerator.is_main_process:
            unwrap = self.accelerator.unwrap_model
            state = {"generator": unwrap(self.G).state_dict(), "discriminator": unwrap(self.D).state_dict()}
            if self.G_ema is not None:
                state["generator_ema"] = self.G_ema.state_dict()
            meta = {"epoch": self.batches.epoch, "generator": self.g_kwargs, "discriminator": self.d_kwargs,
                    "world_size": self.world, "config": asdict(self.cfg), "wandb_run_id": None}
            path = checkpoint.save_checkpoint(self.run_dir / "checkpoints", self.step, state, meta)
        self.accelerator.wait_for_everyone()  # no rank runs ahead of a checkpoint that is being written
        return path
