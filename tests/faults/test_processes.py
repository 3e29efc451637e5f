"""Faults of processes: a rank killed mid-step, kills inside checkpoint writes, preemption.

Each test injects the fault for real (signals to real ranks launched by `accelerate launch`) and checks
what survived: every process gone in bounded time, `latest` verifying, `resume=auto` continuing.
"""

import os
import random
import signal
import subprocess
import sys
import threading
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
    """2 x FAULT_TRIALS kills (4 by default, 20 in tests/faults/report.py), many inside a checkpoint write
    (faulty_train.py slows each file write down)."""
    run, rng, kills = tmp_path / "run", random.Random(), 2 * int(os.environ.get("FAULT_TRIALS", "2"))
    args = ["--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=100000", "train.checkpoint_every=1",
            "train.keep_last=2", "log.every=1000", "log.sample_every=0"]
    slow_env = env(FAULT_CHECKPOINT_DELAY="0.03")
    resumed_from, exits = [], []
    for trial in range(kills):
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
    assert resumed_from == list(range(1, kills))  # every restart after the first continued the run
    last = checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))["step"]
    proc = run_train(*args[:-4], f"train.steps={last + 2}", "train.checkpoint_every=1")
    assert_ok(proc)
    assert f"at step {last}" in proc.stdout
    fault_row("SIGKILL at a random instant, mostly inside a checkpoint write", kills, kills, 0, max(exits))


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


# --- recovery inside the job: accelerate launch --max_restarts -------------------------------------

RESTARTS = ("--max_restarts", "1", "--monitor_interval", "0.5")
ELASTIC = [*TRAIN, "train.steps=60", "train.checkpoint_every=5", "train.keep_last=2", "model.ema.decay=0.9",
           "train.collective_timeout_s=20"]


class _Lines:
    """A background process's merged output, each line with the time it came."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend((time.monotonic(), ln) for ln in proc.stdout),
                                       daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(ln for _, ln in self.lines)


def _final_weights(run):
    ckpt = checkpoint.latest_checkpoint(run / "checkpoints")
    return {name: (ckpt / f"{name}.safetensors").read_bytes() for name in ("generator", "generator_ema",
                                                                            "discriminator")}


def test_a_rank_killed_under_max_restarts_is_recovered_inside_the_job(tmp_path, fault_row):
    """Rank 1 SIGKILLed at a random instant after the first checkpoint (mid-step, mid-checkpoint -- each file write
    is slowed down --, mid-log): the agent restarts the group, which resumes from `latest` and ends byte-identical
    to a run that was never interrupted. FAULT_TRIALS trials (tests/faults/report.py: 10)."""
    trials, rng = int(os.environ.get("FAULT_TRIALS", "2")), random.Random()
    reference = tmp_path / "reference"
    assert_ok(accelerate_launch(2, "launch/train.py", *ELASTIC, f"run.dir={reference}"))
    expected = _final_weights(reference)
    back_s = []
    for trial in range(trials):
        run = tmp_path / f"trial{trial}"
        wandb = {"WANDB_MODE": "offline"} if trial == 0 else {}  # the first trial: does the W&B run go on?
        proc = launch_background(2, *ELASTIC, f"run.dir={run}", launcher_args=RESTARTS, script=FAULTY_TRAIN,
                                 FAULT_CHECKPOINT_DELAY="0.02", **wandb)
        out = _Lines(proc)
        deadline = time.monotonic() + 120
        while checkpoint.latest_checkpoint(run / "checkpoints") is None:
            assert proc.poll() is None and time.monotonic() < deadline, out.text[-3000:]
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        pids = rank_pids(proc.pid)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"trial {trial}: still running 180 s after the kill: a hang\n{out.text[-3000:]}")
        out.thread.join(10)
        text = out.text
        assert proc.returncode == 0, (trial, text[-4000:])
        assert "Traceback" not in text, (trial, text[-4000:])
        resumed = next(i for i, (_, ln) in enumerate(out.lines) if ln.startswith("resuming from"))
        again = next(t for t, ln in out.lines[resumed:] if ln.startswith("step "))
        back_s.append(again - killed)
        survivors = [ln for _, ln in out.lines if ln.startswith("error")]
        assert all("rank 0 stopped: another rank of the job failed or was killed" in ln for ln in survivors), survivors
        assert _final_weights(run) == expected, f"trial {trial}: final weights differ from the uninterrupted run's"
        if wandb:  # one offline run directory per attempt, both of the one run id
            ids = {d.name.rsplit("-", 1)[1] for d in (run / "wandb").glob("offline-run-*")}
            assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids
    fault_row(f"SIGKILL of one rank at a random instant, accelerate launch --max_restarts 1 (in-job restart; "
              f"seconds to training again: max {max(back_s):.1f} s)", trials, trials, 0)


def test_a_fault_that_repeats_ends_after_the_restarts_with_one_line_each(tmp_path, fault_row):
    """A run directory whose checkpoint is of another model: no restart can help. Each attempt says so in one
    line (the restarted one naming its restart), no rank prints a traceback; the launcher's summary ends the job."""
    run = tmp_path / "run"
    assert_ok(run_train(*TRAIN, f"run.dir={run}", "train.steps=2", "train.checkpoint_every=2"))
    start = time.monotonic()
    proc = launch_background(2, *TRAIN, f"run.dir={run}", "train.steps=4", "model.g_width=16",
                             launcher_args=RESTARTS)
    out, _ = proc.communicate(timeout=180)
    exit_s = time.monotonic() - start
    assert proc.returncode != 0
    errors = [ln for ln in out.splitlines() if ln.startswith("error")]
    assert len(errors) == 2, out[-4000:]
    assert errors[0].startswith("error: cannot resume") and errors[1].startswith("error (restart 1 of 1): cannot")
    assert out.count("Traceback") == 1 and "ChildFailedError" in out  # the launcher's own, once, at the end
    fault_row("a fault that no restart can help (another model's checkpoint), --max_restarts 1", 1, 1, 0, exit_s,
              whole_run=True)


def test_a_restarted_group_that_cannot_form_says_why_within_the_collective_timeout(tmp_path, fault_row):
    """After the kill, the restarted rank 1 hangs before it joins (FAULT_HANG_AT_START): rank 0 says in one line
    that the group could not form, within train.collective_timeout_s, instead of waiting for ever."""
    run = tmp_path / "run"
    proc = launch_background(2, *ELASTIC, f"run.dir={run}", "train.steps=100000", launcher_args=RESTARTS,
                             script=FAULTY_TRAIN, FAULT_HANG_AT_START="1@1")
    out = _Lines(proc)
    deadline = time.monotonic() + 120
    while checkpoint.latest_checkpoint(run / "checkpoints") is None:
        assert proc.poll() is None and time.monotonic() < deadline, out.text[-3000:]
        time.sleep(0.05)
    os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the restarted group hung\n" + out.text[-3000:])
    exit_s = time.monotonic() - killed
    out.thread.join(10)
    line = next(ln for _, ln in out.lines if ln.startswith("error (restart 1 of 1)"))
    assert "the 2 ranks of this job could not form their process group within train.collective_timeout_s=20 s" \
        in line, out.text[-3000:]
    assert exit_s < 20 + 30, exit_s
    fault_row("a restarted worker group that cannot form (one rank hangs at start), --max_restarts 1", 1, 1, 0, exit_s)
