"""G, D, the EMA generator and the optimizers, built from a config for one device.

The one place where the rank- and device-blind models of `models` meet the hardware: synchronized
BatchNorm, memory layout, the device, fused Adam, compilation. DDP wrapping is the trainer's
(`accelerator.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dcgan_dist.gan.models import Discriminator, Generator, init_weights
from dcgan_dist.train import devices
from dcgan_dist.train.ema import EMA
from dcgan_dist.train.sync_bn import convert_sync_batchnorm


@dataclass
class Networks:
    G: nn.Module
    D: nn.Module
    ema: EMA | None
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    channels_last: bool  # whether G and D (and so the batches) are in NHWC


def build(g_kwargs: dict, d_kwargs: dict, m, t, o, device: torch.device) -> Networks:
    """G and D from their kwargs (`Config.model_kwargs`), with the same initial weights on every rank (seeded by
    train.seed); `m`, `t`, `o`: the config's model, train and optim sections."""
    torch.manual_seed(t.seed)
    G, D = Generator(**g_kwargs), Discriminator(**d_kwargs)
    G.apply(init_weights), D.apply(init_weights)
    ema = EMA(G, m.ema.decay, m.ema.warmup_steps, t.seed + 1) if m.ema.decay > 0 else None
    if ema is not None:
        ema.module.to(device)
    if m.sync_bn:  # statistics over the global batch; each training forward becomes a collective
        G, D = convert_sync_batchnorm(G, device.type), convert_sync_batchnorm(D, device.type)
    # NHWC: what tensor cores' convolution kernels read without transposes. Under train.compile the compiler
    # chooses the layouts itself (torch 2.11's inductor also fails on channels_last weights' gradients).
    channels_last = t.channels_last and not t.compile
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes never change: time the conv algorithms once, keep the best
    G, D = G.to(device), D.to(device)  # before the optimizers take their parameters
    # Fused Adam: one kernel per step (4x faster than the default on a CPU too), and it skips a step with
    # inf/NaN gradients on the device, without a host sync. Under fp16 the GradScaler does that instead.
    # Under train.cuda_graphs the step counters stay on the device and are read there (`capturable`).
    fused = t.mixed_precision != "fp16" or None
    assert not fused or devices.fused_adam(device.type), f"torch has no fused Adam for {device.type}"
    kw = dict(betas=(o.beta1, o.beta2), fused=fused, capturable=t.cuda_graphs)
    opt_G = torch.optim.Adam(G.parameters(), lr=o.lr_g, **kw)
    opt_D = torch.optim.Adam(D.parameters(), lr=o.lr_d, **kw)
    if t.compile:  # in place: the modules, their state_dict keys and DDP's view of them are unchanged
        G.compile(), D.compile()
    return Networks(G, D, ema, opt_G, opt_D, channels_last)
