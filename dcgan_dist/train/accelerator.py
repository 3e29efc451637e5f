"""The Accelerator a run trains under: DDP's settings, precision, trackers, the collective timeout; and the
process group of a worker group that the launcher restarted."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from dcgan_dist import launcher
from dcgan_dist.config import Config
from dcgan_dist.errors import RunError
from dcgan_dist.train import tracking


def build(cfg: Config, device: str) -> Accelerator:
    """`device`: the accelerator type (`devices.accelerator_type`). Sets up the process group of a launch."""
    # accelerate always passes broadcast_buffers, which torch 2.14 deprecates; False is still what we mean
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    try:
        join_restarted(device, timeout)
        # broadcast_buffers=False: DDP would otherwise re-broadcast BN buffers at each D forward, which breaks
        # two D forwards before one backward ("modified by an inplace operation"). cpu=True when there is no
        # accelerator, or multi-process CPU launches come up as independent single processes. The collective
        # timeout turns a rank that died or diverged into an error instead of a hang.
        return Accelerator(
            cpu=device == "cpu", mixed_precision=cfg.train.mixed_precision, log_with=tracking.log_with(cfg) or None,
            project_config=ProjectConfiguration(project_dir=str(cfg.run_dir),
                                                logging_dir=str(cfg.run_dir / "tensorboard")),
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                             InitProcessGroupKwargs(timeout=timeout)]
            # a captured step must record every cast of a weight, not reuse one cached before the capture
            + ([AutocastKwargs(cache_enabled=False)] if cfg.train.cuda_graphs else []))
    except (RuntimeError, ValueError) as e:  # torch's DistNetworkError, DistStoreError, gloo's connect errors
        if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
            raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RunError(f"the {os.environ['WORLD_SIZE']} ranks of this job could not form their process group "
                       f"within train.collective_timeout_s={cfg.train.collective_timeout_s:g} s (attempt "
                       f"{launcher.attempt()}): {detail}; check that every node reaches "
                       f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} and that no rank died "
                       "at start-up") from None


def join_restarted(device: str, timeout: timedelta) -> None:
    """A worker group restarted by torchelastic's agent (`accelerate launch --max_restarts N`) forms its process
    group under keys of its own in the agent's store. The agent keeps one store for the whole job, and the keys
    the previous attempt left there (its ranks' addresses, dead now) would be read as this attempt's: the new group
    fails with "Connection refused", or hangs. The first attempt (and a launch without restarts) is left to
    accelerate, which forms the group under the default keys. No-op when the group exists or cannot be formed
    here (a device other than a CPU or a CUDA GPU)."""
    env = os.environ
    world, attempt = int(env.get("WORLD_SIZE", "1")), launcher.attempt()
    if world < 2 or attempt == 0 or dist.is_initialized() or device not in ("cpu", "cuda"):
        return
    rank = int(env["RANK"])
    agent_serves = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts the store
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=not agent_serves and rank == 0,
                          timeout=timeout, multi_tenant=not agent_serves)
    backend, keys = "nccl" if device == "cuda" else "gloo", dist.PrefixStore(f"attempt-{attempt}/", store)
    dist.init_process_group(backend, store=keys, rank=rank, world_size=world, timeout=timeout)
