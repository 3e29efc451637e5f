"""Monitoring: metrics.jsonl reductions and W&B through the real wandb package (offline, no network)."""

import json
import os
import signal
import struct
import subprocess
import sys

import pytest
from wandb.proto import wandb_internal_pb2

from conftest import REPO, accelerate_launch, assert_ok, env, run_train
from dcgan_dist.train.stats import STATS

WORKER = str(REPO / "tests" / "dist" / "train_worker.py")
SCALARS = ["loss/D", "loss/D_real", "loss/D_fake", "loss/G", "D/real", "D/fake_before", "D/fake_after", "D/accuracy",
           "theory/jsd_estimate", "grad_norm/G", "grad_norm/D", "lr/G", "lr/D", "perf/img_per_s", "perf/step_time",
           "perf/data_time", "epoch"]


def read_wandb(path):
    """Records of a `.wandb` file: a 7-byte header, then 32 KiB blocks of [crc32c:4][length:2][type:1][data]
    chunks (type 1 full, 2 first, 3 middle, 4 last) holding wandb's own protobuf `Record`s."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(path):
    """The history rows of one `.wandb` file, in order, as {key: value}."""
    return [{("/".join(i.nested_key) if i.nested_key else i.key): json.loads(i.value_json) for i in rec.history.item}
            for rec in read_wandb(path) if rec.WhichOneof("record_type") == "history"]


def history(run_dir, allow_repeats=False):
    """{training step: {key: value}} from every offline W&B run under run_dir (in order), and the run ids.

    The training step is the `step` metric (W&B's own `_step` just counts log calls)."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    rows, ids = {}, []
    for f in files:
        ids += [rec.run.run_id for rec in read_wandb(f) if rec.WhichOneof("record_type") == "run"]
        for row in history_rows(f):
            step = row.get("step")
            assert allow_repeats or step not in rows or \
                set(rows[step]) & set(row) <= {"_step", "_runtime", "_timestamp", "step"}, f"step {step} logged twice"
            rows.setdefault(step, {}).update(row)
    return rows, ids


@pytest.mark.slow
def test_two_ranks_offline_wandb_one_run_every_scalar_and_reduced_losses(tmp_path):
    run = tmp_path / "run"
    proc = accelerate_launch(2, WORKER, "train", str(tmp_path), f"run.dir={run}", "log.wandb.mode=offline",
                             "train.steps=8", "log.every=4", "log.sample_every=4",
                             extra_env={"WANDB_MODE": None})
    assert_ok(proc)
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one run per job, not per rank
    rows, ids = history(run)
    assert len(set(ids)) == 1
    for step in (4, 8):
        missing = [k for k in SCALARS if k not in rows[step]]
        assert not missing, missing
        assert rows[step]["step"] == step
    # the image grids: in the history (as wandb.Image entries) and as PNG media files
    assert [s for s, r in sorted(rows.items()) if "samples/fixed_noise/_type" in r] == [4, 8]
    assert [s for s, r in rows.items() if "samples/real/_type" in r] == [0]
    media = sorted(p.name.split("_")[0] for p in runs[0].glob("files/media/images/samples/*.png"))
    assert media == ["fixed", "fixed", "real"], media  # named by W&B's own step counter

    # loss/D in metrics.jsonl (and W&B) is the mean over both ranks and the interval's steps
    per_rank = [json.loads((tmp_path / f"record-rank{r}.json").read_text())["per_step"] for r in range(2)]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line, (a, b) in zip(lines, [(0, 4), (4, 8)]):
        for key in ("loss/D", "loss/G", "D/real", "grad_norm/D"):
            i = STATS.index(key)
            values = [per_rank[r][s][i] for r in range(2) for s in range(a, b)]
            assert line[key] == pytest.approx(sum(values) / len(values), rel=1e-5), key
            assert rows[line["step"]][key] == pytest.approx(line[key], rel=1e-6)
    assert per_rank[0][0][0] != per_rank[1][0][0]  # the ranks' losses differ: the mean is not rank 0's


def test_sigterm_and_resume_continue_the_same_wandb_run(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
            "train.steps=400", "log.every=1", "log.sample_every=0", "log.wandb.mode=offline"]
    e = env(WANDB_MODE=None)
    proc = subprocess.Popen(args, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 5):
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    stopped = int(out.split("stopped by signal at step ")[1].split(":")[0])
    meta = json.loads((run / "checkpoints" / f"step-{stopped:08d}" / "meta.json").read_text())
    assert meta["wandb_run_id"]
    proc = subprocess.run([*args[:-4], "train.steps=" + str(stopped + 5), "log.every=1", "log.sample_every=0",
                           "log.wandb.mode=offline"], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    rows, ids = history(run)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    first = min((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "preempting" in {r.WhichOneof("record_type") for r in read_wandb(first)}  # run.mark_preempting()
    assert set(ids) == {meta["wandb_run_id"]}  # the resumed job continues the same run
    steps = sorted(s for s, r in rows.items() if "loss/D" in r)
    assert steps == list(range(1, stopped + 6))  # continuous, no duplicates (history() refuses those)


def _kill_after(args, run, lines, e):
    proc = subprocess.Popen(args, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= lines):
        assert proc.poll() is None, proc.stdout.read()
    proc.kill()  # a crash: no checkpoint, no W&B finish
    proc.communicate(timeout=60)
    return len((run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_a_crash_and_resume_continue_the_same_wandb_run_and_relog_the_lost_steps(tmp_path):
    """W&B drops a log call whose step is below the run's current one; the steps re-run after a crash must not
    be given as W&B's step. And a crash before the first checkpoint must not start a second W&B run."""
    run = tmp_path / "run"
    args = [sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}", "log.every=1",
            "log.sample_every=0", "log.wandb.mode=offline"]
    e = env(WANDB_MODE=None)
    _kill_after([*args, "train.steps=400", "train.checkpoint_every=0"], run, 3, e)  # before any checkpoint
    assert not (run / "checkpoints" / "latest").exists()
    _kill_after([*args, "train.steps=400", "train.checkpoint_every=4"], run, 7, e)  # from step 0 again
    logged = len((run / "metrics.jsonl").read_text().splitlines())
    assert logged >= 7
    proc = subprocess.run([*args, f"train.steps={logged + 2}", "train.checkpoint_every=4"], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    resumed_from = int(proc.stdout.split("at step ")[1].split(" ")[0])
    assert resumed_from < logged  # steps after the checkpoint are trained and logged again
    runs = sorted((run / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    assert len(runs) == 3
    ids = {p.name.rsplit("-", 1)[1] for p in runs}  # offline-run-<time>-<run id>
    assert len(ids) == 1 and ids == {(run / "wandb" / "run_id").read_text().strip()}, runs  # one W&B run
    last = [r for r in history_rows(next(runs[-1].glob("run-*.wandb"))) if "loss/D" in r]
    assert [r["step"] for r in last] == list(range(resumed_from + 1, logged + 3))  # the re-run steps included
    assert [r["_step"] for r in last] != [r["step"] for r in last]  # W&B's own counter, not the training step
    metrics = {r.metric.name: r.metric for r in read_wandb(next(runs[-1].glob("run-*.wandb")))
               if r.WhichOneof("record_type") == "metric"}
    assert metrics["eval/classifier/fd"].summary.min and metrics["eval/classifier/confidence"].summary.max


def test_log_checkpoints_uploads_the_final_generator_as_an_artifact(tmp_path, smoke_args):
    proc = run_train(*smoke_args, "train.steps=4", "model.ema.decay=0.9", "log.wandb.mode=offline",
                     "log.wandb.log_checkpoints=true", extra_env={"WANDB_MODE": None})
    assert_ok(proc)
    records = read_wandb(next((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")))
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert len(artifacts) == 1 and artifacts[0].type == "model", artifacts
    assert {"final", "step-00000004"} <= set(artifacts[0].aliases)
    assert sorted(e.path for e in artifacts[0].manifest.contents) == ["generator_ema.safetensors", "meta.json"]


def test_online_without_credentials_warns_once_and_trains(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    e = {k: v for k, v in env().items() if not k.startswith("WANDB_")}
    e["HOME"] = str(home)
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml",
                           f"run.dir={tmp_path / 'run'}", "train.steps=4", "log.wandb.mode=online"],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("warning: W&B")]
    assert len(warnings) == 1 and "continuing with metrics.jsonl only" in warnings[0], proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_auto_mode_without_credentials_goes_offline_and_says_how_to_sync(tmp_path):
    e = {k: v for k, v in env().items() if not k.startswith("WANDB_")}
    e["HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml",
                           f"run.dir={tmp_path / 'run'}", "train.steps=2"], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=300)
    assert_ok(proc)
    assert "W&B: no credentials, logging offline" in proc.stdout and "wandb sync" in proc.stdout
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


def test_disabled_mode_writes_no_wandb_files(tmp_path, smoke_args):
    assert_ok(run_train(*smoke_args, "train.steps=2", "log.wandb.mode=disabled"))
    assert not (tmp_path / "run" / "wandb").exists()
    assert os.path.getsize(tmp_path / "run" / "metrics.jsonl") > 0


def test_tensorboard_gets_the_same_scalars(tmp_path, smoke_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert_ok(run_train(*smoke_args, "train.steps=8", "log.tensorboard=true"))
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = acc.Scalars("loss/D")
    assert [e.step for e in scalars] == [r["step"] for r in logged]
    assert [e.value for e in scalars] == pytest.approx([r["loss/D"] for r in logged], rel=1e-6)
    assert [e.step for e in acc.Images("samples/fixed_noise")] == [6, 8]  # the grids reach its Images tab
    assert [e.step for e in acc.Images("samples/real")] == [0]
