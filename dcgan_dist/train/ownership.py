"""Who owns a run directory: rank 0, from before anything in it is read until the trainer closes (`own_run_dir`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dcgan_dist import fileio, launcher
from dcgan_dist.errors import UserError


def own_run_dir(accelerator, run_dir: Path, collective_timeout_s: float, started: float,
        log) -> tuple[fileio.Claim | None, float]:
    """Rank 0 claims `run_dir` (`fileio.claim` on run_dir/.lock): a second training on it stops on every rank
    before touching anything. An earlier attempt of this job still ending (a restarted worker group, a requeued
    job) is waited for. Returns (rank 0's claim, None elsewhere; the monotonic time train.max_minutes counts from:
    `started`, or in a worker group the launcher restarted the job's first start, which the lock file keeps)."""
    owner, error = None, ""
    if accelerator.is_main_process:
        try:
            owner = fileio.claim(run_dir / ".lock", f"run directory {run_dir}", "wait for that training to end (or "
                                 "stop it), or train into another run.dir", job=launcher.job(),
                                 wait_s=collective_timeout_s / 2, log=log)
        except UserError as e:
            error = str(e)
    refused = torch.tensor([float(bool(error))], device=accelerator.device)
    if (accelerator.reduce(refused, "sum") if accelerator.num_processes > 1 else refused).item():
        raise UserError(error)  # rank 0 says why; the other ranks leave quietly
    if owner is not None:
        before, now = owner.previous, time.time()
        restarted = launcher.attempt() > 0 and before.get("job") == owner.record["job"]
        job_started = before["job_started"] if restarted and "job_started" in before else \
            now - (time.monotonic() - started)
        owner.write(job_started=job_started)
        started = time.monotonic() - (now - job_started)
    return owner, started
