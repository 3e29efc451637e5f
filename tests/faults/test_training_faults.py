"""Faults inside a run: non-finite losses, a full disk, a damaged or vanishing dataset, W&B unreachable."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    FAULTY_TRAIN,
    REPO,
    accelerate_launch,
    assert_ok,
    env,
    launch_background,
    run_train,
    snapshot,
    wait_for_step,
)
from dcgan_dist import checkpoint
from dcgan_dist.recipe import load_config

SMOKE = ["--config", "configs/smoke.yaml", "log.sample_every=0"]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --- non-finite losses ---------------------------------------------------------------------------


def test_a_skipped_step_leaves_the_weights_and_the_optimizer_alone(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tests" / "faults"))
    from faulty_train import FaultyTrainer

    from dcgan_dist.train.stats import per_step

    monkeypatch.setenv("FAULT_NONFINITE", "3")  # D's loss is NaN at step 3
    cfg = load_config("configs/smoke.yaml", [f"run.dir={tmp_path / 'run'}", "log.wandb.mode=disabled"])
    trainer = FaultyTrainer(cfg, overwrite=True)
    real, z = torch.rand(16, 1, 32, 32) * 2 - 1, torch.randn(16, 16)
    for _ in range(2):
        assert per_step(trainer.train_step(real, z)[None])[0, -1] == 0
        trainer.step += 1
    D = [p.detach().clone() for p in trainer.D.parameters()]
    G = [p.detach().clone() for p in trainer.G.parameters()]
    adam_steps = [float(s["step"]) for s in trainer.opt_D.state.values()]
    row = per_step(trainer.train_step(real, z)[None])[0]
    assert row[-1] == 1 and not torch.isfinite(row[9])  # flagged; D's gradient norm is NaN
    assert all(torch.equal(a, b) for a, b in zip(D, trainer.D.parameters()))  # D: not updated
    assert [float(s["step"]) for s in trainer.opt_D.state.values()] == adam_steps  # nor its Adam state
    assert not all(torch.equal(a, b) for a, b in zip(G, trainer.G.parameters()))  # G's step went through
    assert all(torch.isfinite(p).all() for p in trainer.G.parameters())
    trainer.close()


@pytest.mark.slow
def test_nonfinite_with_stop_ends_every_rank_naming_the_step_and_last_checkpoint(tmp_path, fault_row):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = accelerate_launch(2, FAULTY_TRAIN, *SMOKE, f"run.dir={run}", "train.steps=12",
                             "train.checkpoint_every=4", "train.on_nonfinite=stop",
                             extra_env={"FAULT_NONFINITE": "6@1"})  # rank 1 only
    exit_s = time.monotonic() - start
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "non-finite loss or gradients at step 6 (train.on_nonfinite=stop)" in errors[0]
    good = run / "checkpoints" / "step-00000004"
    assert f"Last good checkpoint: {good}" in errors[0]
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == [good.name]
    assert checkpoint.latest_checkpoint(run / "checkpoints") == good
    checkpoint.read_meta(good)
    assert _records(run)[-1]["train/nonfinite_steps"] == 1
    fault_row("non-finite loss on one rank, train.on_nonfinite=stop, 2 ranks", 1, 1, 0, exit_s, whole_run=True)


@pytest.mark.slow
def test_nonfinite_with_skip_skips_on_every_rank_and_counts(tmp_path, fault_row):
    run = tmp_path / "run"
    proc = accelerate_launch(2, FAULTY_TRAIN, *SMOKE, f"run.dir={run}", "train.steps=12",
                             "train.on_nonfinite=skip", "train.max_consecutive_skips=2",
                             extra_env={"FAULT_NONFINITE": "5,6@1"})
    assert_ok(proc)
    records = _records(run)
    assert [r["train/nonfinite_steps"] for r in records] == [0, 2, 2]  # logged at steps 4, 8, 12
    assert all(np.isfinite(r["loss/D"]) for r in records)  # interval means over the finite steps
    final = checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))
    assert final["step"] == 12 and final["nonfinite_steps"] == 2
    fault_row("non-finite loss on one rank for 2 steps, train.on_nonfinite=skip, 2 ranks", 1, 1, 0)


@pytest.mark.slow
def test_too_many_consecutive_skips_stop_the_run(tmp_path, fault_row):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = run_train(*SMOKE, f"run.dir={run}", "train.steps=12", "train.max_consecutive_skips=2",
                     "train.checkpoint_every=4", extra_env={"FAULT_NONFINITE": "5,6,7"}, script=FAULTY_TRAIN)
    exit_s = time.monotonic() - start
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert ("3 steps in a row with a non-finite loss or gradients, up to step 7 (more than "
            "train.max_consecutive_skips=2)") in proc.stderr
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == "step-00000004"
    fault_row("non-finite loss for 3 steps in a row, train.max_consecutive_skips=2", 1, 1, 0, exit_s, whole_run=True)


# --- a full disk ---------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (needs root)")
def test_disk_full_during_a_preparation_leaves_no_half_store_and_resumes(tmp_path, fault_row):
    """dcgan-prepare into a 1 MB tmpfs, 3 MB of images: one line (exit 1), no store at --out; with space again
    the same command keeps the finished units and ends byte-identical to a preparation that never failed."""
    src = _image_folder(tmp_path / "images", n=240)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    prepare = [sys.executable, "-c", "from dcgan_dist.cli import prepare_main; prepare_main()", str(src), "--size",
               "64", "--channels", "3", "--shard-size", "16", "--workers", "1"]
    try:
        start = time.monotonic()
        proc = subprocess.run([*prepare, "--out", str(mnt / "store")], cwd=REPO, env=env(), capture_output=True,
                              text=True, timeout=300)
        exit_s = time.monotonic() - start
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "error: no space left on device" in proc.stderr and "run the same command again" in proc.stderr
        assert not (mnt / "store").exists()  # nothing half-written where a reader would look
        kept = len(list((mnt / ".store.tmp-prepare").glob("unit-*.u8.json")))
        assert kept >= 1
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        proc = subprocess.run([*prepare, "--out", str(mnt / "store")], cwd=REPO, env=env(), capture_output=True,
                              text=True, timeout=300)
        assert_ok(proc)
        assert f"resuming an interrupted preparation: {kept} finished unit(s) kept" in proc.stdout
        whole = subprocess.run([*prepare, "--out", str(tmp_path / "whole")], cwd=REPO, env=env(), capture_output=True,
                               text=True, timeout=300)
        assert_ok(whole)
        assert snapshot(mnt / "store") == snapshot(tmp_path / "whole")
        fault_row("disk full during dcgan-prepare (tmpfs; resumed with space: byte-identical store)", 1, 1, 0, exit_s,
                  whole_run=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)



@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (needs root)")
def test_disk_full_during_a_checkpoint_loses_nothing(tmp_path, fault_row):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / "run"
        args = [*SMOKE, f"run.dir={run}", "train.checkpoint_every=0"]
        assert_ok(run_train(*args, "train.steps=4"))
        before = snapshot(run / "checkpoints")
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(mnt).free - 48 * 1024))  # leave 48 KiB
        start = time.monotonic()
        proc = run_train(*args, "train.steps=8")
        exit_s = time.monotonic() - start
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "error: cannot write checkpoint" in proc.stderr and "No space left on device" in proc.stderr
        assert f"the last checkpoint is {run / 'checkpoints' / 'step-00000004'}" in proc.stderr
        assert snapshot(run / "checkpoints") == before  # latest, step 4, no half-written directory
        checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))
        # 2 ranks: rank 0 writes and fails; rank 1, waiting for it, says so in one line, not a traceback
        proc = accelerate_launch(2, "launch/train.py", *args, "train.steps=8")
        assert proc.returncode != 0 and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 2 and "error: cannot write checkpoint" in errors[0], proc.stderr[-3000:]
        assert errors[1] == ("error: rank 1 stopped: another rank of the job failed or was killed (its error, if any, "
                             "is above)")
        assert snapshot(run / "checkpoints") == before
        filler.unlink()  # space again: the run continues from step 4
        proc = run_train(*args, "train.steps=8")
        assert_ok(proc)
        assert "at step 4" in proc.stdout
        fault_row("disk full during a checkpoint write (tmpfs)", 1, 1, 0, exit_s, whole_run=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- the dataset ---------------------------------------------------------------------------------


def _image_folder(root, n=40):
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"{i // 10}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 40), dtype=np.uint8)).save(root / f"{i // 10}" / f"img-{i:03d}.png")
    return root


def _folder_args(root, run):
    return [*SMOKE, f"run.dir={run}", "data.name=imagefolder", f"data.root={root}", "data.num_images=null",
            "model.channels=1", "train.batch_size=8", "train.steps=3", "train.checkpoint_every=0"]


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, fault_row):
    root = _image_folder(tmp_path / "images")
    bad = root / "1" / "img-017.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    proc = run_train(*_folder_args(root, tmp_path / "run"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot decode image {bad}" in proc.stderr and "data.skip_bad_files=true" in proc.stderr
    assert not (tmp_path / "run").exists() and not (root / "cache").exists()
    proc = run_train(*_folder_args(root, tmp_path / "run"), "data.skip_bad_files=true")
    assert_ok(proc)
    assert f"warning: skipped 1 of 40 image(s) that cannot be decoded (data.skip_bad_files): {bad}" in proc.stdout
    assert "on imagefolder (39 images" in proc.stdout
    fault_row("a corrupt image mid-dataset (error naming it; skipped and counted with data.skip_bad_files)", 2, 2)


def test_a_damaged_cached_store_is_prepared_again(tmp_path):
    root, xdg = _image_folder(tmp_path / "images", n=16), {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert_ok(run_train(*_folder_args(root, tmp_path / "a"), extra_env=xdg))
    (cached,) = (tmp_path / "xdg" / "dcgan_dist" / "stores").glob("imagefolder-*")  # the user's cache, not the folder
    shard = cached / "shard-00000.u8"
    shard.write_bytes(shard.read_bytes()[:100])
    proc = run_train(*_folder_args(root, tmp_path / "b"), extra_env=xdg)
    assert_ok(proc)
    assert "warning: preparing the damaged cached store again" in proc.stdout and "shard-00000.u8" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_read_only_image_folder_trains_with_two_ranks(tmp_path):
    """Shared datasets on clusters are read-only: nothing is written into the folder (as root, chmod would not
    stop writes, so the folder is bind-mounted read-only)."""
    src, ro = _image_folder(tmp_path / "images", n=32), tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        before = snapshot(src)
        proc = accelerate_launch(2, "launch/train.py", *_folder_args(ro, tmp_path / "run"),
                                 extra_env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
        assert_ok(proc)
        assert snapshot(src) == before
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.slow
def test_the_dataset_vanishing_mid_run(tmp_path, fault_row):
    """Images are decoded into memory once: a run survives its folder vanishing; a new one says what is missing."""
    root = _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    proc = launch_background(2, *_folder_args(root, run), "train.steps=60", "log.every=1")
    wait_for_step(run, 5, proc)
    shutil.rmtree(root)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))["step"] == 60
    proc = run_train(*_folder_args(root, tmp_path / "other"))
    assert proc.returncode == 2 and f"data.root = '{root}' is not a directory" in proc.stderr
    assert not (tmp_path / "other").exists()
    fault_row("the dataset folder deleted mid-run, 2 ranks (the run completes: it reads the prepared store)", 1, 1)


# --- W&B -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_unreachable_training_completes(tmp_path, fault_row):
    """Online mode with a key, but the server is a closed local port: warn once, train, keep metrics.jsonl."""
    home = tmp_path / "home"
    home.mkdir()
    e = {k: v for k, v in env().items() if not k.startswith("WANDB_")}
    e.update(HOME=str(home), WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="20")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", *SMOKE, f"run.dir={run}", "train.steps=4",
                           "log.wandb.mode=online"], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert len([x for x in proc.stderr.splitlines() if x.startswith("warning: W&B")]) == 1, proc.stderr[-3000:]
    assert len(_records(run)) == 1 and checkpoint.latest_checkpoint(run / "checkpoints") is not None
    fault_row("W&B server unreachable (online mode)", 1, 1)
