"""Evaluation while training (train.eval_every): the metrics of `quality.evaluation` on samples that all ranks
generate in shares, under train.eval_protocol, and whether they beat the best so far (train.keep_best)."""

from __future__ import annotations

import math

from torch import nn

from dcgan_dist.errors import UserError
from dcgan_dist.quality.evaluation import evaluate, feature_spaces, protocol_note
from dcgan_dist.registry import is_better


class DuringTraining:
    """train.eval_every: the metrics of train.eval_num samples, the same seeded noise every time, generated in
    shares by all ranks; and whether they beat the best so far by train.keep_best."""

    def __init__(self, d, t, image_size: int, channels: int, accelerator, log):
        """`d`, `t`: the config's data and train sections; `image_size`, `channels`: the generator's images'."""
        self.accelerator, self.num, self.seed, self.keep_best = accelerator, t.eval_num, t.seed, t.keep_best
        # No collective: one rank trains a missing classifier, or computes train.eval_protocol's missing FID
        # reference (once: later runs read it from the cache), while the others wait on its file lock; each rank
        # runs Inception on its own device. No protocol: FID only from statistics computed ahead.
        protocol = t.eval_protocol or "run"
        self.spaces, notes = feature_spaces(d.name, d.root, d.cache_dir, image_size=image_size,
                                            channels=channels, device=accelerator.device,
                                            num_images=d.num_images if protocol == "run" else None,
                                            fid=True if t.eval_protocol else None,
                                            compute_missing=bool(t.eval_protocol), wait_minutes=d.wait_minutes,
                                            log=log, fit=d.fit, protocol=protocol)
        names = [s.name for s in self.spaces]
        # {"inception/fd": "run: 1000 samples vs ..."}: printed once here, in the W&B config (eval_protocols)
        self.protocols = {f"{s.name}/{k}": protocol_note(s, self.num) for s in self.spaces if "protocol" in s.info
                          for k in ("fd", "kid")}
        for key, note in self.protocols.items():
            log(f"eval/{key}: {'FID' if key.endswith('fd') else 'KID'} [{note}]")
        if not self.spaces:
            raise UserError(f"train.eval_every = {t.eval_every} has nothing to measure: " + "; ".join(notes))
        if t.keep_best and t.keep_best.split("/")[0] not in names:
            raise UserError(f"train.keep_best = {t.keep_best!r}: no {t.keep_best.split('/')[0]} metrics for "
                            f"{d.name} (available: {', '.join(names)}); " + "; ".join(notes))

    def __call__(self, generator: nn.Module) -> dict[str, float]:
        """{"<space>/<metric>": value}, the same on every rank. Collective: every rank calls it."""
        return evaluate(generator, self.num, self.spaces, seed=self.seed, accelerator=self.accelerator)

    def improves(self, metrics: dict[str, float], best: dict | None) -> bool:
        """Whether `metrics` beat `best` ({"metric", "value", "step"} or None) by train.keep_best."""
        value = metrics.get(self.keep_best, math.nan)
        return bool(self.keep_best) and math.isfinite(value) and (
            best is None or is_better(self.keep_best, value, best["value"]))
