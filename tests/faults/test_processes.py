"""Faults of processes: a rank killed mid-step, kills inside checkpoint writes, preemption.

Each test injects the fault for real (signals to real ranks launched by `accelerate launch`) and checks
what survived: every process gone in bounded time, `latest` verifying, `resume=auto` continuing.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import (
    FAULTY_TRAIN,
    REPO,
    accelerate_launch,
    assert_ok,
    env,
    launch_background,
    rank_pids,
    run_train,
    session_alive,
    wait_for_step,
)
from dcgan_dist import checkpoint

pytestmark = pytest.mark.slow
TRAIN = ["--config", "configs/smoke.yaml", "log.every=1", "log.sample_every=0"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_sigkill_of_one_rank_ends_the_job_then_resume_continues(tmp_path, ranks, fault_row):
    run = tmp_path / "run"
    args = [*TRAIN, f"run.dir={run}", "train.checkpoint_every=4", "train.collective_timeout_s=30"]
    proc = launch_background(ranks, *args, "train.steps=100000")
    wait_for_step(run, 10, proc)
    pids = rank_pids(proc.pid)
    assert sorted(pids) == list(range(ranks)), pids
    os.kill(pids[ranks - 1], signal.SIGKILL)  # the last rank dies mid-step, as on a failed node
    killed = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job still ran 90 s after one rank was killed: a hang")
    exit_s = time.monotonic() - killed
    deadline = time.monotonic() + 10
    while session_alive(proc.pid) and time.monotonic() < deadline:  # the ranks, not just the launcher
        time.sleep(0.1)
    assert not session_alive(proc.pid), "a rank outlived the job"
    assert proc.returncode != 0 and exit_s < 60, (proc.returncode, exit_s, out[-3000:])

    latest = checkpoint.latest_checkpoint(run / "checkpoints")
    step = checkpoint.read_meta(latest)["step"]  # verifies every file
    assert step >= 8 and step % 4 == 0
    resumed = accelerate_launch(ranks, "launch/train.py", *args, f"train.steps={step + 4}")
    assert_ok(resumed)
    assert f"resuming from {latest} at step {step}" in resumed.stdout
    fault_row(f"SIGKILL of one rank mid-step, {ranks} ranks (gloo)", 1, 1, 0, exit_s)


def test_sigkill_at_random_instants_never_loses_latest(tmp_path, fault_row):
    """20 kills, many inside a checkpoint write (faulty_train.py slows each file write down)."""
    run, rng = tmp_path / "run", random.Random()
    args = ["--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=100000", "train.checkpoint_every=1",
            "train.keep_last=2", "log.every=1000", "log.sample_every=0"]
    slow_env = env(FAULT_CHECKPOINT_DELAY="0.03")
    resumed_from, exits = [], []
    for trial in range(20):
        proc = subprocess.Popen([sys.executable, FAULTY_TRAIN, *args], cwd=REPO, env=slow_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        before = checkpoint.latest_checkpoint(run / "checkpoints")
        deadline = time.time() + 90
        while checkpoint.latest_checkpoint(run / "checkpoints") == before:  # this process is training now
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))  # each step writes a checkpoint: most kills land in one
        proc.kill()
        killed = time.monotonic()
        out, _ = proc.communicate()
        exits.append(time.monotonic() - killed)
        if "resuming from" in out:
            resumed_from.append(trial)
        latest = checkpoint.latest_checkpoint(run / "checkpoints")
        assert latest is not None, out
        checkpoint.read_meta(latest)  # every file's sha256 verifies
    assert resumed_from == list(range(1, 20))  # every restart after the first continued the run
    last = checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))["step"]
    proc = run_train(*args[:-4], f"train.steps={last + 2}", "train.checkpoint_every=1")
    assert_ok(proc)
    assert f"at step {last}" in proc.stdout
    fault_row("SIGKILL at a random instant, mostly inside a checkpoint write", 20, 20, 0, max(exits))


def test_sigterm_of_the_job_checkpoints_then_resumes(tmp_path, fault_row):
    """What SLURM does at preemption or the time limit: SIGTERM to every process of the job."""
    run = tmp_path / "run"
    args = [*TRAIN, f"run.dir={run}", "train.checkpoint_every=0"]
    proc = launch_background(2, *args, "train.steps=100000")
    wait_for_step(run, random.Random().randint(3, 15), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    exit_s = time.monotonic() - signalled
    assert "stopped by signal at step" in out, out[-3000:]
    step = int(out.split("stopped by signal at step ")[1].split(":")[0])
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))["step"] == step
    resumed = accelerate_launch(2, "launch/train.py", *args, f"train.steps={step + 2}")
    assert_ok(resumed)
    assert f"at step {step}" in resumed.stdout
    fault_row("SIGTERM to the whole job (preemption), 2 ranks", 1, 1, 0, exit_s)
