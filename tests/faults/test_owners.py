"""One writer per run directory and per store being written: a second dcgan-train (any rank count, --overwrite or
not) or dcgan-prepare on the same directory stops at once with one line, and the first run ends as if alone."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import FAULTY_TRAIN, REPO, accelerate_launch, assert_ok, env, run_train
from dcgan_dist import checkpoint, fileio

pytestmark = pytest.mark.slow
ARGS = ["--config", "configs/smoke.yaml", "log.every=1", "log.sample_every=0", "train.steps=200",
        "train.checkpoint_every=25", "train.keep_last=2", "model.ema.decay=0.9"]


def _one_error_line(proc, code=2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode,
                                                                                          proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def _weights(ckpt):
    return {p.name: p.read_bytes() for p in sorted(ckpt.glob("*.safetensors"))}


def test_a_second_training_on_a_run_dir_stops_and_the_first_ends_as_if_alone(tmp_path, fault_row):
    run, solo = tmp_path / "run", tmp_path / "solo"
    # the first run, its checkpoint writes slowed down so that it is still running while the others try
    first = subprocess.Popen([sys.executable, FAULTY_TRAIN, *ARGS, f"run.dir={run}"], cwd=REPO,
                             env=env(FAULT_CHECKPOINT_DELAY="0.4"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    owner = fileio.read_owner(run / ".lock")
    assert owner["pid"] == first.pid, owner
    started = time.monotonic()
    again = run_train(*ARGS, f"run.dir={run}", "train.seed=1")  # the job submitted twice
    refused_s = time.monotonic() - started
    line = _one_error_line(again)
    assert f"run directory {run} is in use by another process (pid {first.pid} on " in line, line
    assert "wait for that training to end (or stop it), or train into another run.dir" in line
    line = _one_error_line(run_train(*ARGS, f"run.dir={run}", "--overwrite"))
    assert "is in use by another process" in line
    two = accelerate_launch(2, "launch/train.py", *ARGS, f"run.dir={run}")  # another rank count: every rank stops,
    errors = [x for x in two.stderr.splitlines() if x.startswith("error")]  # rank 0 saying why (the launcher
    assert two.returncode != 0 and ": Traceback" not in two.stderr, two.stderr[-3000:]  # adds its summary of exit 2s)
    assert len(errors) == 1 and "is in use by another process" in errors[0], two.stderr[-3000:]
    assert first.poll() is None, "the first run ended before the others tried: slow it down more"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]

    alone = subprocess.run([sys.executable, FAULTY_TRAIN, *ARGS, f"run.dir={solo}"], cwd=REPO,  # the same, alone
                           env=env(FAULT_CHECKPOINT_DELAY="0.4"), capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    names = [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")]
    assert names == [p.name for p in checkpoint.complete_checkpoints(solo / "checkpoints")] == \
        ["step-00000200", "step-00000175"]
    for name in names:
        assert _weights(run / "checkpoints" / name) == _weights(solo / "checkpoints" / name), name
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    solo_records = [json.loads(x) for x in (solo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 201))  # every step once, in order
    assert [r["loss/D"] for r in records] == [r["loss/D"] for r in solo_records]
    assert fileio.read_owner(run / ".lock")["pid"] == first.pid  # the record stays; the lock is free again
    assert_ok(run_train(*ARGS, f"run.dir={run}", "train.steps=201"))  # ... so the run continues
    fault_row("a second dcgan-train on a run directory in use (1 and 2 ranks, --overwrite)", 3, 3, 0, refused_s)


def test_a_second_preparation_of_one_out_stops_and_the_first_finishes(tmp_path, fault_row):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        Image.fromarray(np.full((16, 16), 10 * i, np.uint8)).save(images / f"{i:02d}.png")
    out, alone = tmp_path / "store", tmp_path / "alone"
    cmd = [sys.executable, "tests/faults/slow_prepare.py", str(images), "--size", "32", "--channels", "1",
           "--workers", "1", "--shard-size", "8"]
    first = subprocess.Popen([*cmd, "--out", str(out)], cwd=REPO, env=env(FAULT_DECODE_DELAY="0.2"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while fileio.read_owner(tmp_path / ".store.prepare.lock").get("pid") != first.pid:
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    started = time.monotonic()
    second = subprocess.run([*cmd, "--out", str(out), "--overwrite"], cwd=REPO, env=env(FAULT_DECODE_DELAY="0"),
                            capture_output=True, text=True, timeout=120)
    refused_s = time.monotonic() - started
    assert f"--out {out} is in use by another process (pid {first.pid} on " in _one_error_line(second)
    assert first.poll() is None, "the first preparation ended before the second tried"
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    proc = subprocess.run([*cmd, "--out", str(alone)], cwd=REPO, env=env(FAULT_DECODE_DELAY="0"),
                          capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in alone.iterdir()}
    fault_row("a second dcgan-prepare of one --out while the first runs", 1, 1, 0, refused_s)
