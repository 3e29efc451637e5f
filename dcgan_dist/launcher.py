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
