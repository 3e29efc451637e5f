"""What each training step reports, reduced once per log interval; and the count behind train.on_nonfinite.

A step reports one row, made by three small kernels (`step_row`: its losses, gradient norms, non-finite flag and D's
logits); the statistics derived from the logits are computed for the whole interval at once (`per_step`). Rows
stay on the device during the interval (no host sync per step); at a log step they are averaged over the
interval's finite steps and over the ranks in one reduction.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dcgan_dist import checkpoint
from dcgan_dist.errors import RunError

# What a step reports (`per_step` of its row; plus a last "non-finite" flag), averaged per log interval.
STATS = ("loss/D", "loss/D_real", "loss/D_fake", "loss/G", "D/real", "D/fake_before", "D/fake_after", "D/accuracy",
         "grad_norm/G", "grad_norm/D")


_SCALARS = 6  # a row's head: loss_real, loss_fake, loss_g, grad_norm_G, grad_norm_D, non-finite flag


def step_row(loss_real: torch.Tensor, loss_fake: torch.Tensor, loss_g: torch.Tensor, grad_norm_G: torch.Tensor,
             grad_norm_D: torch.Tensor, nonfinite: torch.Tensor, real_logits: torch.Tensor,
             fake_logits: torch.Tensor, g_logits: torch.Tensor) -> torch.Tensor:
    """One step's report as one float32 tensor: the scalars, then D's logits on the real images, on the fakes in
    the D phase and in the G phase (B each). Detached; three small kernels (the flag's cast, the stack, the
    concatenation)."""
    head = torch.stack([loss_real, loss_fake, loss_g, grad_norm_G, grad_norm_D, nonfinite.float()])
    return torch.cat([head, real_logits.flatten(), fake_logits.flatten(), g_logits.flatten()]).float().detach()


def per_step(rows: torch.Tensor) -> torch.Tensor:
    """Rows [n, 6 + 3B] of `step_row` -> [n, len(STATS) + 1]: STATS, then the non-finite flag."""
    loss_real, loss_fake, loss_g, norm_G, norm_D, flag = rows[:, :_SCALARS].unbind(1)
    real, fake, _ = rows[:, _SCALARS:].unflatten(1, (3, -1)).unbind(1)  # [n, B] each
    D_real, D_fake, D_after = torch.sigmoid(rows[:, _SCALARS:]).unflatten(1, (3, -1)).mean(2).unbind(1)
    accuracy = ((real > 0).float().mean(1) + (fake < 0).float().mean(1)) / 2
    return torch.stack([loss_real + loss_fake, loss_real, loss_fake, loss_g, D_real, D_fake, D_after, accuracy,
                        norm_G, norm_D, flag], 1)


class IntervalStats:
    def __init__(self, on_nonfinite: str, max_consecutive_skips: int, ckpt_root: Path, nonfinite_steps: int = 0):
        self.on_nonfinite, self.max_consecutive_skips, self.ckpt_root = on_nonfinite, max_consecutive_skips, ckpt_root
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
        for i, bad in enumerate((torch.stack([r[_SCALARS - 1] for r in new]) > 0).tolist() if new else []):
            self.nonfinite_steps += bad
            self.nonfinite_run = self.nonfinite_run + 1 if bad else 0
            if bad and self.on_nonfinite == "stop":
                return f"non-finite loss or gradients at step {first + i} (train.on_nonfinite=stop)"
            if self.nonfinite_run > self.max_consecutive_skips:
                return (f"{self.nonfinite_run} steps in a row with a non-finite loss or gradients, up to step "
                        f"{first + i} (more than train.max_consecutive_skips={self.max_consecutive_skips})")
        return ""

    def stop_if(self, reason: str) -> None:
        """End the run (RunError) for `reason` (`check`'s), naming the last good checkpoint; '' goes on."""
        if reason:
            last = checkpoint.latest_checkpoint(self.ckpt_root)
            raise RunError(f"{reason}; no update was applied from non-finite gradients. Last good checkpoint: "
                           f"{last or 'none written yet'}. Lower optim.lr_g/optim.lr_d and continue from it "
                           "(train.resume=auto), or set train.on_nonfinite=skip")

    def reduce(self, accelerator, step: int, seconds: float, images_per_step: int) -> tuple[dict[str, float], str]:
        """The interval that ends at `step` after `seconds` ({STATS averaged over its finite steps and the ranks,
        the run's non-finite steps, images/s, step and data seconds}, why the run must stop or ''); starts the
        next interval. A collective, and the one host sync of the interval."""
        steps = accelerator.reduce(per_step(torch.stack(self.rows)), reduction="mean").cpu()
        finite = steps[steps[:, -1] == 0, :-1]
        means = finite.mean(0).tolist() if len(finite) else [math.nan] * len(STATS)
        reason, count = self.check(step), len(self.rows)
        record = {**dict(zip(STATS, means)), "train/nonfinite_steps": self.nonfinite_steps,
                  "perf/img_per_s": count * images_per_step / seconds, "perf/step_time": seconds / count,
                  "perf/data_time": self.data_time / count}
        self.rows, self.counted, self.data_time = [], 0, 0.0
        return record, reason
