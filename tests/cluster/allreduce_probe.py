"""A stand-in for launch/train.py that checks a launch path in seconds: every rank all-reduces its rank.

Launched exactly like the trainer (`accelerate launch ... tests/cluster/allreduce_probe.py --config X ...`,
or `DCGAN_TRAIN_SCRIPT=tests/cluster/allreduce_probe.py sbatch slurm/...`); its arguments are ignored.
Prints `probe rank=R world_size=W host=H sum=S` and exits 1 if the sum is wrong.

DCGAN_PROBE_HOLD=SECONDS then keeps every rank alive that long, exiting 75 ("preempted, requeue me", the
trainer's contract) on SIGTERM, so the batch scripts' preemption path can be tested without training.
A requeued job (SLURM_RESTART_COUNT > 0) does not hold.
"""

import os
import signal
import socket
import sys
import time

import torch
from accelerate import Accelerator

EXIT_PREEMPTED = 75


def main() -> int:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # the trainer's rule: gloo on CPU hosts
    rank, world = accelerator.process_index, accelerator.num_processes
    total = accelerator.reduce(torch.tensor([float(rank)], device=accelerator.device), reduction="sum").item()
    print(f"probe rank={rank} world_size={world} host={socket.gethostname()} sum={total:g}", flush=True)
    status = 0 if total == world * (world - 1) / 2 else 1

    hold = float(os.environ.get("DCGAN_PROBE_HOLD", "0"))
    if hold > 0 and int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0:
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        deadline = time.monotonic() + hold
        while not stop and time.monotonic() < deadline:
            time.sleep(0.2)
        if stop:
            print(f"probe rank={rank} got SIGTERM on {socket.gethostname()}", flush=True)
            status = EXIT_PREEMPTED
    accelerator.end_training()  # without it the process group aborts at exit and fails the job
    return status


if __name__ == "__main__":
    sys.exit(main())
