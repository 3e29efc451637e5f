"""An exponential moving average of the generator's weights, with BatchNorm statistics of its own."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dcgan_dist.gan.sampling import recalibrate_batchnorm


class EMA:
    """EMA <- decay * EMA + (1 - decay) * G after every G step, in fp32; the decay ramps up linearly from 0
    over `warmup_steps`. Identical on every rank, since G's parameters are.

    G's BatchNorm running statistics belong to G's weights, not to the average's, and measured on MNIST-5k
    they cost as much as a doubled Fréchet distance (docs/QUALITY.md). So `module_at(step)` recomputes them
    for the EMA weights from seeded noise before any use (samples, evaluation, checkpoints), the same on
    every rank.
    """

    def __init__(self, generator: nn.Module, decay: float, warmup_steps: int = 0, calibration_seed: int = 0):
        self.module = copy.deepcopy(generator).requires_grad_(False)
        self.decay, self.warmup_steps, self.calibration_seed = decay, warmup_steps, calibration_seed
        self.calibrated_step = -1

    def weight(self, step: int) -> float:
        """How far the average moves towards G after G step `step` (0-based): 1 - decay."""
        return 1.0 - (self.decay * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.decay)

    @torch.no_grad()
    def update(self, generator: nn.Module, weight: float | torch.Tensor) -> None:
        """EMA += weight * (G - EMA), `weight` from `weight(step)`; `generator` un-wrapped. A 0-d tensor on the
        device is read there, not on the host (a step replayed as a CUDA graph fills it before each replay)."""
        ema, live = list(self.module.parameters()), list(generator.parameters())
        if isinstance(weight, torch.Tensor):  # torch's foreach lerp takes its weight on the host only
            delta = torch._foreach_sub(live, ema)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(ema, delta)
        else:
            torch._foreach_lerp_(ema, live, weight)
        for b_ema, b in zip(self.module.buffers(), generator.buffers()):  # BN running stats follow G's until
            b_ema.copy_(b)  # module_at() recomputes them
        self.calibrated_step = -1

    def module_at(self, step: int) -> nn.Module:
        """The EMA generator with BatchNorm statistics of its own weights (recomputed once per step)."""
        if self.calibrated_step != step:
            recalibrate_batchnorm(self.module, seed=self.calibration_seed)
            self.calibrated_step = step
        return self.module
