"""What each training step reports, reduced once per log interval; and the count behind train.on_nonfinite.

Rows stay on the device during the interval (no host sync per step); at a log step they are averaged
over the interval's finite steps and over the ranks in one reduction.
"""

from __future__ import annotations

import math

import torch

# What Trainer.train_step returns, per step (plus a last "non-finite" flag).
STATS = ("loss/D", "loss/D_real", "loss/D_fake", "loss/G", "D/real", "D/fake_before", "D/fake_after", "D/accuracy",
         "grad_norm/G", "grad_norm/D")


class IntervalStats:
    def __init__(self, on_nonfinite: str, max_consecutive_skips: int, nonfinite_steps: int = 0):
        self.on_nonfinite, self.max_consecutive_skips = on_nonfinite, max_consecutive_skips
        self.nonfinite_steps, self.nonfinite_run = nonfinite_steps, 0  # in the whole run; in a row now
        self.rows: list[torch.Tensor] = []
        self.counted, self.data_time = 0, 0.0

    def add(self, row: torch.Tensor, data_time: float) -> None:
        self.rows.append(row)
        self.data_time += data_time

    def check(self, step: int) -> str:
        """Counts the non-finite steps among the rows not counted yet (the last is `step`); returns why the
        run must stop, or ''. The flags come from all-reduced gradients, so every rank agrees."""
        new = self.rows[self.counted:]
        first, self.counted = step - len(new) + 1, len(self.rows)
        for i, bad in enumerate((torch.stack([r[-1] for r in new]) > 0).tolist() if new else []):
            self.nonfinite_steps += bad
            self.nonfinite_run = self.nonfinite_run + 1 if bad else 0
            if bad and self.on_nonfinite == "stop":
                return f"non-finite loss or gradients at step {first + i} (train.on_nonfinite=stop)"
            if self.nonfinite_run > self.max_consecutive_skips:
                return (f"{self.nonfinite_run} steps in a row with a non-finite loss or gradients, up to step "
                        f"{first + i} (more than train.max_consecutive_skips={self.max_consecutive_skips})")
        return ""

    def reduce(self, accelerator, step: int) -> tuple[dict[str, float], int, float, str]:
        """(STATS averaged over the interval's finite steps and the ranks, steps, data seconds, stop reason);
        starts the next interval. A collective, and the one host sync of the interval."""
        per_step = accelerator.reduce(torch.stack(self.rows), reduction="mean").cpu()
        finite = per_step[per_step[:, -1] == 0, :-1]
        means = finite.mean(0).tolist() if len(finite) else [math.nan] * len(STATS)
        reason = self.check(step)
        out = dict(zip(STATS, means)), len(self.rows), self.data_time, reason
        self.rows, self.counted, self.data_time = [], 0, 0.0
        return out
