"""What every rank agrees on at a step boundary: a stop signal arrived (SIGTERM, SIGUSR1: a launcher's preemption
notice), rank 0's checkpoint clock ran out (train.checkpoint_minutes), rank 0's time budget ran out
(train.max_minutes).

A signal only sets a flag. The ranks agree on all three in one small all-reduce on the CPU, over gloo, so no
device sync is added to the step.
"""

from __future__ import annotations

import functools
import signal
import time
import weakref

import torch
import torch.distributed as dist


def _flag_signal(agreement_ref: weakref.ref, signum: int, _frame) -> None:
    agreement = agreement_ref()
    if agreement is not None:
        agreement.signal = signum  # acted on at the next step boundary, by all ranks together


class Agreement:
    """Install with the process group up, at the same point on every rank (a gloo group may be created)."""

    def __init__(self, checkpoint_minutes: float, max_minutes: float, rank: int, world: int, started: float):
        self.checkpoint_minutes, self.max_minutes, self.rank, self.world = checkpoint_minutes, max_minutes, rank, world
        self.started = started  # train.max_minutes counts from here
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # by weak reference: the handler must not keep its owner
            signal.signal(sig, functools.partial(_flag_signal, weakref.ref(self)))  # alive
        self.cpu_group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
        self.last_checkpoint = time.monotonic()

    def checkpointed(self) -> None:
        """A step checkpoint was written: the checkpoint clock starts again."""
        self.last_checkpoint = time.monotonic()

    def __call__(self) -> tuple[bool, bool, bool]:
        """(a signal arrived on any rank, rank 0's checkpoint clock ran out, rank 0's train.max_minutes ran out),
        the same on every rank; a collective."""
        now, every, budget = time.monotonic(), self.checkpoint_minutes, self.max_minutes
        overdue = self.rank == 0 and every > 0 and now - self.last_checkpoint >= 60 * every
        out_of_time = self.rank == 0 and budget > 0 and now - self.started >= 60 * budget
        flags = torch.tensor([self.signal is not None, overdue, out_of_time], dtype=torch.int32)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])
