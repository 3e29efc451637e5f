"""The Accelerator a run trains under: DDP's settings, precision, trackers, the collective timeout."""

from __future__ import annotations

import warnings
from datetime import timedelta

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from dcgan_dist.config import Config
from dcgan_dist.train import tracking


def build(cfg: Config, device: str) -> Accelerator:
    """`device`: the accelerator type (`devices.accelerator_type`). Sets up the process group of a launch."""
    # accelerate always passes broadcast_buffers, which torch 2.14 deprecates; False is still what we mean
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    # broadcast_buffers=False: DDP would otherwise re-broadcast BN buffers at each D forward, which breaks
    # two D forwards before one backward ("modified by an inplace operation"). cpu=True when there is no
    # accelerator, or multi-process CPU launches come up as independent single processes. The collective
    # timeout turns a rank that died or diverged into an error instead of a hang.
    return Accelerator(
        cpu=device == "cpu", mixed_precision=cfg.train.mixed_precision, log_with=tracking.log_with(cfg) or None,
        project_config=ProjectConfiguration(project_dir=str(cfg.run_dir),
                                            logging_dir=str(cfg.run_dir / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))])
