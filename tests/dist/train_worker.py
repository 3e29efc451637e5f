"""Runs the real Trainer under `accelerate launch` and records what the tests need to check.

usage: train_worker.py MODE OUT_DIR [section.key=value ...]
  MODE=train: train.train() while recording each rank's sample indices per epoch, which phase every DDP
              gradient reduction of G and D happened in, and each rank's final parameters.
  MODE=step:  two train_step calls on a fixed global batch (this rank's slice of it); saves parameters.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dcgan_dist.recipe import load_config
from dcgan_dist.train import stats
from dcgan_dist.train.trainer import Trainer

mode, out = sys.argv[1], Path(sys.argv[2])
trainer = Trainer(load_config("configs/smoke.yaml", sys.argv[3:]), overwrite=True)
acc, rank, world = trainer.accelerator, trainer.accelerator.process_index, trainer.accelerator.num_processes


def save_params(tag: str) -> None:
    state = {f"G.{k}": v for k, v in acc.unwrap_model(trainer.G).state_dict().items()}
    state |= {f"D.{k}": v for k, v in acc.unwrap_model(trainer.D).state_dict().items()}
    if trainer.ema is not None:
        state |= {f"EMA.{k}": v for k, v in trainer.ema.module.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, out / f"{tag}-rank{rank}.safetensors")


if mode == "train":
    # Which loss was computed last tells which backward a reduction belongs to.
    phase = {"now": None}
    for name in ("d_real", "d_fake", "g"):
        fn = getattr(trainer.loss, name)
        setattr(trainer.loss, name, lambda logits, fn=fn, name=name: (phase.update(now=name), fn(logits))[1])
    reductions = {"G": [], "D": []}

    def counting_hook(net):
        def hook(state, bucket):
            reductions[net].append([trainer.step, phase["now"], bucket.index()])
            work = torch.distributed.all_reduce(bucket.buffer().div_(world), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        return hook

    if world > 1:
        trainer.G.register_comm_hook(None, counting_hook("G"))
        trainer.D.register_comm_hook(None, counting_hook("D"))
    indices = []

    class Recording:  # the batch source's index order, noting each rank's indices and their epoch
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __next__(self):
            idx = next(self.inner)
            indices.append([self.inner.epoch, idx.tolist()])
            return idx

    trainer.data.order = Recording(trainer.data.order)
    per_step = []  # this rank's STATS of every step, as train_step returned them
    step_fn = trainer.train_step

    def recording_step(real, z, y=None):
        out = step_fn(real, z, y)
        per_step.append(stats.per_step(out[None])[0].tolist())
        return out

    trainer.train_step = recording_step
    trainer.train()
    (out / f"record-rank{rank}.json").write_text(json.dumps({
        "world": world, "indices": indices, "reductions": reductions, "per_step": per_step,
        "batches_per_epoch": trainer.data.batches_per_epoch, "num_items": trainer.data.num_items,
    }))
    save_params("final")
elif mode == "step":
    B, latent = trainer.cfg.train.batch_size, trainer.cfg.model.latent_dim
    save_params("init")
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        real = torch.rand(B * world, 1, 32, 32, generator=g) * 2 - 1  # the same global batch on every rank
        z = torch.randn(B * world, latent, generator=g)
        mine = slice(rank * B, (rank + 1) * B)
        trainer.train_step(real[mine], z[mine])
    save_params("step")
    if trainer.cfg.model.sync_bn:  # parameters and BN buffers must now agree on every rank
        from dcgan_dist.train.sync_bn import check_consistency

        check_consistency(trainer.G, "G"), check_consistency(trainer.D, "D")
trainer.close()  # as dcgan-train does: DDP's state must not be left to interpreter teardown
