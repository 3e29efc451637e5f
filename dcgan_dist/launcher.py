"""Where a process stands in its job, read once from what the launcher exported: `accelerate launch` and torchrun
set RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; `srun` sets SLURM_PROCID and SLURM_NTASKS. The one place the package
reads them (before any process group exists, so no collective is needed). No torch."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    rank: int  # this process's rank in the job (0 when launched alone)
    world_size: int  # processes in the job
    local_world_size: int  # processes on this node


def place(slurm: bool = True) -> Place:
    """`slurm`: fall back on srun's variables (dcgan-prepare's ranks may be started by srun alone). Training is
    always started by a launcher that sets RANK and WORLD_SIZE, so it passes False: a lone `dcgan-train` inside a
    many-task allocation is one process, not SLURM_NTASKS of them."""
    env = os.environ
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    if slurm:
        rank, world = rank or env.get("SLURM_PROCID"), world or env.get("SLURM_NTASKS")
    return Place(rank=int(rank or 0), world_size=int(world or 1),
                 local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")))


def attempt() -> int:
    """Which attempt of its worker group this process belongs to: 0, or how many times torchelastic's agent (under
    `accelerate launch --max_restarts N`) has restarted the group since the job started."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def job() -> str | None:
    """What names this job, the same on every rank and across its restarts (in place, by the launcher, or requeued
    by SLURM): SLURM's job id, else the rendezvous address the launcher exported; None for a lone process."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return f"slurm job {env['SLURM_JOB_ID']}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"launch {env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    return None


def launch() -> str | None:
    """What names this one start of a job's processes, the same on all its ranks (and only theirs): the launcher's
    rendezvous address and attempt, else srun's job step; None for a lone process."""
    env = os.environ
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"launch {env['MASTER_ADDR']}:{env['MASTER_PORT']} attempt {attempt()}"
    if env.get("SLURM_PROCID") and env.get("SLURM_JOB_ID"):
        return f"slurm step {env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    return None
