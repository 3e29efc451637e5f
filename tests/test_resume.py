"""Exact resume and preemption through the real launcher (slow: many short runs)."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import REPO, accelerate_launch, assert_ok, env, launch_background, run_train, wait_for_step
from dcgan_dist import checkpoint

pytestmark = pytest.mark.slow
WEIGHTS = ("generator.safetensors", "discriminator.safetensors")


def _weights(run, step, names=WEIGHTS):
    return {n: (run / "checkpoints" / checkpoint.step_dir_name(step) / n).read_bytes() for n in names}


CONDITIONAL = ["data.name=mnist5k", "data.num_images=512", "model.num_classes=10"]


# each part of the state that resuming must restore in one run or another: bf16 autocast, channels_last, the EMA
# generator, DiffAugment's draws; labels and both label paths; spectral norm's power-iteration vectors
@pytest.mark.parametrize("extra", [[], ["train.mixed_precision=bf16", "train.channels_last=true", "model.ema.decay=0.8",
                                        "train.augment=translation,cutout,color"],
                                   [*CONDITIONAL, "model.cond=projection", "model.ema.decay=0.8"],
                                   [*CONDITIONAL, "model.cond=concat", "model.spectral_norm=both"]],
                         ids=["fp32", "bf16-channels_last-ema-augment", "labels-projection", "labels-concat-sn"])
def test_n_plus_n_steps_equal_2n_steps_byte_for_byte(tmp_path, extra):
    args = ["--config", "configs/smoke.yaml", "train.checkpoint_every=0", *extra]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert_ok(accelerate_launch(2, "launch/train.py", *args, f"run.dir={whole}", "train.steps=12"))
    assert_ok(accelerate_launch(2, "launch/train.py", *args, f"run.dir={split}", "train.steps=6"))
    proc = accelerate_launch(2, "launch/train.py", *args, f"run.dir={split}", "train.steps=12")
    assert_ok(proc)
    assert "resuming from" in proc.stdout and "at step 6" in proc.stdout
    names = WEIGHTS + (("generator_ema.safetensors",) if "model.ema.decay=0.8" in extra else ())
    assert _weights(whole, 12, names) == _weights(split, 12, names)
    # the step axis continues without duplicates
    steps = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 6, 8, 12]


def test_sigterm_at_a_random_step_then_resume_is_exact(tmp_path):
    args = ["train.steps=40", "train.checkpoint_every=0", "log.every=1", "log.sample_every=0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert_ok(accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={whole}", *args))
    proc = launch_background(2, "--config", "configs/smoke.yaml", f"run.dir={cut}", *args)
    wait_for_step(cut, random.Random().randint(3, 25), proc)
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM does to the job's processes
    out, _ = proc.communicate(timeout=120)
    assert "stopped by signal at step" in out, out
    stopped = json.loads((cut / "checkpoints" / checkpoint.step_dir_name(
        int(out.split("stopped by signal at step ")[1].split(":")[0])) / "meta.json").read_text())
    assert 3 <= stopped["step"] < 40
    resumed = accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={cut}", *args)
    assert_ok(resumed)
    assert f"at step {stopped['step']}" in resumed.stdout
    assert _weights(whole, 40) == _weights(cut, 40)


def test_single_process_sigterm_exits_75_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
                             "train.steps=100000", "log.every=1"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    latest = checkpoint.latest_checkpoint(run / "checkpoints")
    assert checkpoint.read_meta(latest)["step"] >= 5


def test_world_size_change_continues_with_a_warning(tmp_path):
    run = tmp_path / "run"
    args = ["--config", "configs/smoke.yaml", f"run.dir={run}", "train.checkpoint_every=0"]
    assert_ok(accelerate_launch(2, "launch/train.py", *args, "train.steps=6"))
    proc = run_train(*args, "train.steps=9")  # one process now
    assert_ok(proc)
    assert "warning: resuming 2 rank(s) x batch 16 as 1 x 16" in proc.stdout and "at step 6" in proc.stdout
    meta = json.loads((run / "checkpoints" / "step-00000009" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 9


def test_n_plus_n_steps_equal_2n_steps_from_a_store(tmp_path):
    """Training from a prepared store: 2 ranks, fp32, EMA on, exact resume."""
    from dcgan_dist.data.prepare import PrepareOptions, prepare_store

    store = tmp_path / "store"
    prepare_store("synthetic", store, 32, 1, PrepareOptions(shard_size=100, progress=False, log=lambda *_: None))  # 512
    args = ["--config", "configs/smoke.yaml", "train.checkpoint_every=0", "data.name=store", f"data.root={store}",
            "data.num_images=null", "model.ema.decay=0.8"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert_ok(accelerate_launch(2, "launch/train.py", *args, f"run.dir={whole}", "train.steps=12"))
    assert_ok(accelerate_launch(2, "launch/train.py", *args, f"run.dir={split}", "train.steps=6"))
    proc = accelerate_launch(2, "launch/train.py", *args, f"run.dir={split}", "train.steps=12")
    assert_ok(proc)
    assert "(512 images" in proc.stdout and "at step 6" in proc.stdout
    names = WEIGHTS + ("generator_ema.safetensors",)
    assert _weights(whole, 12, names) == _weights(split, 12, names)


def test_max_minutes_ends_a_two_rank_run_as_finished_and_it_resumes(tmp_path):
    """train.max_minutes: all ranks stop at the same step, with the final grid and checkpoint, exit 0."""
    run = tmp_path / "run"
    args = ["--config", "configs/smoke.yaml", f"run.dir={run}", "train.checkpoint_every=0", "log.sample_every=0",
            "log.every=1000"]
    proc = accelerate_launch(2, "launch/train.py", *args, "train.steps=1000000", "train.max_minutes=0.05")
    assert_ok(proc)
    last = proc.stdout.strip().splitlines()[-1]
    assert "train.max_minutes = 0.05 reached" in last, proc.stdout[-2000:]
    step = int(last.split("; step ")[1].split(" of ")[0])
    assert 1 <= step < 1000000
    ckpt = checkpoint.latest_checkpoint(run / "checkpoints")
    assert ckpt.name == checkpoint.step_dir_name(step) and checkpoint.read_meta(ckpt)["step"] == step
    assert (run / "samples" / f"step-{step:08d}.png").is_file()  # the final grid
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [step]
    resumed = accelerate_launch(2, "launch/train.py", *args, f"train.steps={step + 3}")
    assert_ok(resumed)
    assert f"at step {step}" in resumed.stdout and f"step {step + 3} of {step + 3}" in resumed.stdout
