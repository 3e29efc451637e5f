"""Weak scaling of the Trainer on CPU: 1 process x 1 thread against N processes x 1 thread over gloo.

    python benchmarks/scaling.py [--nproc 2] [--size 32] [--batch 32] [--steps 4] [--warmup 2]
                                 [--repeats 2] [--no-control]

Per-rank batch fixed (`--batch`), so N ranks do N times the work of one. Each configuration is a
fresh `accelerate launch` of this script (`--num_processes 1`, and `--multi_gpu --num_processes N`,
which on a CPU-only host starts N ranks over gloo), OMP_NUM_THREADS=1 and torch.set_num_threads(1)
per rank. The launches alternate (1, N, N, 1, ...) for `--repeats` pairs and efficiency is taken per
pair: eff = (img/s with N ranks) / (N x img/s with 1 rank). A control ("ctl", skip with
--no-control) runs N independent 1-rank processes at once, without DDP, their timed steps started
together: its efficiency is what the host itself gives N processes (cores, caches, other jobs), so
the gap between it and the N-rank row is what DDP and communication cost. Startup is not timed: each rank builds
the Trainer, runs `--warmup` steps, then times `--steps` steps between two barriers. A step is
what `Trainer.train` does per step: fetch this rank's batch, `train_step`, and `agree` (the
preemption all-reduce of 8 bytes).

Communication: a DDP comm hook on the trainer's G and D (as tests/dist/train_worker.py) counts the
bytes every gradient all-reduce carries, per step, and `torch.distributed.all_reduce` is wrapped to
count anything else the step reduces. The minimum is one reduction of G's and one of D's gradients,
4 bytes x (numel(G) + numel(D)). The same two all-reduces are also timed alone (not overlapped with
compute), to size the communication part of any efficiency loss. Each rank's CPU time per step
(time.process_time, gloo's threads included) is reported too: efficiency by CPU time leaves out the
time other jobs on a shared host held the cores, which wall-clock efficiency cannot.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
    import torch
    import torch.distributed as dist

    from dcgan_dist.data.batches import to_model_range
    from dcgan_dist.recipe import load_config
    from dcgan_dist.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ov = [f"model.image_size={args.size}", f"train.batch_size={args.batch}", "data.name=synthetic",
          f"data.num_images={max(256, 4 * args.batch * world)}", "model.channels=1", "loss.real_target=0.9",
          "loss.g_target=0.9", "log.wandb.mode=disabled", "log.progress=false", f"run.dir={args.run_dir}"]
    trainer = Trainer(load_config(None, ov), overwrite=True)
    torch.set_num_threads(1)
    acc, rank = trainer.accelerator, trainer.accelerator.process_index
    counted = {"grad_bytes": 0, "grad_reductions": 0, "other_bytes": 0, "other_calls": 0, "on": False}
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **k):  # any all-reduce outside DDP's gradient hooks
        if counted["on"]:
            counted["other_bytes"] += tensor.numel() * tensor.element_size()
            counted["other_calls"] += 1
        return all_reduce(tensor, *a, **k)

    def hook(state, bucket):
        buf = bucket.buffer()
        if counted["on"]:
            counted["grad_bytes"] += buf.numel() * buf.element_size()
            counted["grad_reductions"] += 1
        work = all_reduce(buf.div_(world), async_op=True)  # what DDP's default hook does
        return work.get_future().then(lambda fut: fut.value()[0])

    if world > 1:
        trainer.G.register_comm_hook(None, hook)
        trainer.D.register_comm_hook(None, hook)
        dist.all_reduce = counting_all_reduce
    latent, dev = trainer.cfg.model.latent_dim, trainer.device

    def step():
        images, _ = next(trainer.data)
        real = to_model_range(images.to(dev))
        z = torch.randn(len(images), latent, device=dev, generator=trainer.noise)
        trainer.train_step(real, z)
        trainer.agree()

    for _ in range(args.warmup):
        step()
    if args.sync_dir:  # control run: independent processes start their timed steps together
        open(os.path.join(args.sync_dir, f"ready-{os.getpid()}"), "w").close()
        while len(os.listdir(args.sync_dir)) < args.sync_n:
            time.sleep(0.005)
    counted["on"] = True
    acc.wait_for_everyone()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    cpu = (time.process_time() - cpu) / args.steps  # this rank's CPU time, gloo's threads included
    acc.wait_for_everyone()  # the slowest rank sets the pace, as in training
    seconds = (time.perf_counter() - start) / args.steps
    counted["on"] = False

    numel = {n: sum(p.numel() for p in acc.unwrap_model(m).parameters())  # all trainable
             for n, m in (("G", trainer.G), ("D", trainer.D))}
    comm = []
    if world > 1:  # the minimum gradient traffic alone: one all-reduce of G's size, one of D's
        bufs = [torch.zeros(numel["G"]), torch.zeros(numel["D"])]
        for r in range(args.steps + 1):
            acc.wait_for_everyone()
            t0 = time.perf_counter()
            for b in bufs:
                all_reduce(b)
            if r:
                comm.append(time.perf_counter() - t0)
    if rank == 0:
        print("RESULT " + json.dumps({
            "world": world, "step_s": seconds, "cpu_s": cpu, "img_per_s": args.batch * world / seconds, "numel": numel,
            "grad_bytes_per_step": counted["grad_bytes"] / args.steps,
            "grad_reductions_per_step": counted["grad_reductions"] / args.steps,
            "other_bytes_per_step": counted["other_bytes"] / args.steps,
            "other_calls_per_step": counted["other_calls"] / args.steps,
            "comm_alone_s": statistics.median(comm) if comm else 0.0, "threads": torch.get_num_threads(),
            "overrides": ov[:-1]}), flush=True)
    trainer.close()


def launch(nproc: int, args, sync: tuple[str, int] = ("", 0)) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accel = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--num_processes", str(nproc), "--main_process_port", str(port)]
    if nproc > 1:
        accel.append("--multi_gpu")
    run_dir = tempfile.mkdtemp()
    cmd = [*accel, os.path.abspath(__file__), "--worker", "--run-dir", run_dir, "--size", str(args.size),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--sync-dir", sync[0], "--sync-n", str(sync[1])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.run_dir = run_dir
    return proc


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    shutil.rmtree(proc.run_dir, ignore_errors=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"launch failed ({' '.join(proc.args)}):\n{out[-3000:]}\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def control(args) -> dict:
    """N independent 1-rank processes at once, timed together: what the host gives N ranks without DDP."""
    with tempfile.TemporaryDirectory() as sync_dir:
        res = [result(p) for p in [launch(1, args, (sync_dir, args.nproc)) for _ in range(args.nproc)]]
    return {"img_per_s": sum(r["img_per_s"] for r in res), "step_s": statistics.median(r["step_s"] for r in res),
            "cpu_s": statistics.median(r["cpu_s"] for r in res)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per launch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of launches")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-control", action="store_true", help="skip the N-independent-processes control")
    parser.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sync-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sync-n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    one, many, ctrl = [], [], []
    for r in range(args.repeats):
        runs = [lambda: one.append(result(launch(1, args))), lambda: many.append(result(launch(args.nproc, args)))]
        if not args.no_control:
            runs.append(lambda: ctrl.append(control(args)))
        for run in runs if r % 2 == 0 else runs[::-1]:
            run()
    eff = [m["img_per_s"] / (args.nproc * o["img_per_s"]) for o, m in zip(one, many)]
    ctrl_eff = [c["img_per_s"] / (args.nproc * o["img_per_s"]) for o, c in zip(one, ctrl)]
    cpu_eff = [o["cpu_s"] / m["cpu_s"] for o, m in zip(one, many)]  # same work per rank: CPU time 1 / N

    def cell(xs, fmt):
        return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"

    last = many[-1]
    minimum = 4 * (last["numel"]["G"] + last["numel"]["D"])
    print(f"\nCPU, fp32, gloo, 1 thread per rank ({os.cpu_count()} cores), "
          f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{args.size}x{args.size}, batch {args.batch} per rank; {args.steps} timed steps per launch after "
          f"{args.warmup} warm-up; median (min-max) over {args.repeats} alternating pairs of launches")
    print(f"{'ranks':>5} {'step ms':>22} {'img/s (all ranks)':>22} {'efficiency':>22}")
    print(f"{1:>5} {cell([o['step_s'] * 1e3 for o in one], '{:.0f}'):>22} "
          f"{cell([o['img_per_s'] for o in one], '{:.1f}'):>22} {'1 (baseline)':>22}")
    print(f"{args.nproc:>5} {cell([m['step_s'] * 1e3 for m in many], '{:.0f}'):>22} "
          f"{cell([m['img_per_s'] for m in many], '{:.1f}'):>22} {cell(eff, '{:.3f}'):>22}")
    if ctrl:
        print(f"{'ctl':>5} {cell([c['step_s'] * 1e3 for c in ctrl], '{:.0f}'):>22} "
              f"{cell([c['img_per_s'] for c in ctrl], '{:.1f}'):>22} {cell(ctrl_eff, '{:.3f}'):>22}")
        print(f"ctl = control: {args.nproc} independent 1-rank processes at once (no DDP, no communication), "
              "timed together; its efficiency is what this host gives N processes")
    print(f"rank 0 CPU time per step: 1 rank {cell([o['cpu_s'] * 1e3 for o in one], '{:.0f}')} ms, "
          f"{args.nproc} ranks {cell([m['cpu_s'] * 1e3 for m in many], '{:.0f}')} ms; efficiency by CPU time "
          f"{cell(cpu_eff, '{:.3f}')} (leaves out time other jobs held the cores)")
    comm = [m["comm_alone_s"] * 1e3 for m in many]
    print(f"gradient all-reduce bytes per step: {last['grad_bytes_per_step']:,.0f} in "
          f"{last['grad_reductions_per_step']:.0f} bucket reductions; minimum 4 x (numel G {last['numel']['G']:,} "
          f"+ numel D {last['numel']['D']:,}) = {minimum:,}; ratio {last['grad_bytes_per_step'] / minimum:.3f}")
    print(f"other all-reduces per step: {last['other_calls_per_step']:.0f} call(s), "
          f"{last['other_bytes_per_step']:,.0f} bytes (Trainer.agree: signal, checkpoint clock, budget)")
    print(f"those two gradient all-reduces alone: {cell(comm, '{:.1f}')} ms per step "
          f"({statistics.median(comm) / (statistics.median([m['step_s'] for m in many]) * 1e3):.1%} of the "
          f"{args.nproc}-rank step)")
    print("targets: efficiency >= 0.90; gradient bytes = minimum")
    print("trainer config: load_config(None, [" + ", ".join(repr(o) for o in last["overrides"]) + ", 'run.dir=<tmp>'])")


if __name__ == "__main__":
    main()
