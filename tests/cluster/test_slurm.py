"""The SLURM batch scripts on a real two-node cluster (node1, node2: one machine, two network namespaces).

Run through `tests/cluster/run.sh` (root), which boots the cluster, runs `pytest -m cluster tests/cluster`
and tears it down. Without a cluster these tests skip; under run.sh (DCGAN_TEST_CLUSTER=1) they fail instead.
Jobs are submitted with --chdir=<repo root>, their log in the test's tmp dir, and polled every second.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_tracking import history

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests/cluster/allreduce_probe.py"
DEFAULT_CONF = "/run/dcgan-cluster/slurm.conf"  # where tests/cluster/cluster.sh writes it
NODES = ("node1", "node2")
JOB_TIMEOUT_S = 240
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _cluster_problem(env: dict) -> str | None:
    """Why the cluster cannot be used, or None when both nodes answer."""
    if os.geteuid() != 0:
        return "needs root (the test cluster is namespaces + daemons)"
    if shutil.which("sinfo") is None:
        return "SLURM client tools not installed"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, timeout=10
        ).stdout
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    up = [n for n in NODES if states.get(n, "").rstrip("*~#") in ("idle", "mix", "alloc")]
    if len(up) < len(NODES):
        return f"nodes {', '.join(NODES)} not up (sinfo: {states or 'no answer'})"
    return None


@pytest.fixture(scope="session")
def slurm_env() -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled"}  # as in the other tests: no tracker traffic from jobs
    if "SLURM_CONF" not in env and Path(DEFAULT_CONF).exists():
        env["SLURM_CONF"] = DEFAULT_CONF
    problem = _cluster_problem(env)
    if problem:
        message = f"no test SLURM cluster: {problem}; run tests/cluster/run.sh as root"
        if os.environ.get("DCGAN_TEST_CLUSTER") == "1":  # run.sh booted one: its absence is a failure
            pytest.fail(message)
        pytest.skip(message)
    return env


@dataclass
class Job:
    id: str
    state: str
    exit_code: int
    restarts: int
    output: str


def _job_fields(job_id: str, env: dict) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, timeout=10
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def submit(env, tmp_path, script, *args, sbatch_opts=(), extra_env=None) -> str:
    """sbatch SCRIPT ARGS from the repo root; returns the job id. The log goes to tmp_path/job-<id>.out."""
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/job-%j.out", *sbatch_opts]
    result = subprocess.run(
        [*cmd, script, *args], env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def output_of(tmp_path, job_id) -> str:
    log = tmp_path / f"job-{job_id}.out"
    return log.read_text() if log.exists() else ""


def wait_job(env, tmp_path, job_id, timeout=JOB_TIMEOUT_S) -> Job:
    """Poll until the job has ended for good (a requeued job is PENDING again, so it is waited for too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = _job_fields(job_id, env)
        if fields.get("JobState") in FINAL_STATES:
            return Job(
                job_id,
                fields["JobState"],
                int(fields.get("ExitCode", "0:0").split(":")[0]),
                int(fields.get("Restarts", "0")),
                output_of(tmp_path, job_id),
            )
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, timeout=10)
    state = fields.get("JobState")
    pytest.fail(f"job {job_id} still {state} after {timeout} s:\n{output_of(tmp_path, job_id)}")


def run_job(env, tmp_path, script, *args, **kwargs) -> Job:
    return wait_job(env, tmp_path, submit(env, tmp_path, script, *args, **kwargs))


def assert_ok(job: Job) -> None:
    assert (job.state, job.exit_code) == ("COMPLETED", 0), f"job {job.id}: {job.state}\n{job.output}"


PROBE_LINE = re.compile(r"probe rank=(?P<rank>\d+) world_size=(?P<world_size>\d+) host=(?P<host>\S+?) sum=(?P<sum>\d+)")


def probe_lines(output: str) -> list[dict]:
    return [m.groupdict() for m in PROBE_LINE.finditer(output)]  # ranks' lines may interleave


# --- fast checks of the launch machinery, with the all-reduce probe standing in for the trainer ---


def test_probe_spans_two_nodes(slurm_env, tmp_path):
    job = run_job(
        slurm_env,
        tmp_path,
        "slurm/train_multinode.sbatch",
        "configs/smoke.yaml",
        extra_env={"DCGAN_TRAIN_SCRIPT": PROBE},
    )
    assert_ok(job)
    ranks = {int(p["rank"]): p for p in probe_lines(job.output)}
    assert sorted(ranks) == [0, 1], job.output
    assert {p["host"] for p in ranks.values()} == set(NODES), job.output
    assert all(p["world_size"] == "2" and p["sum"] == "1" for p in ranks.values()), job.output
    assert f"run.dir=runs/slurm-{job.id}" in job.output  # the default run dir follows the job id


def test_probe_procs_per_node_knob(slurm_env, tmp_path):
    job = run_job(
        slurm_env,
        tmp_path,
        "slurm/train.sbatch",
        "configs/smoke.yaml",
        "run.dir=/nonexistent/unused",
        extra_env={"DCGAN_TRAIN_SCRIPT": PROBE, "DCGAN_PROCS_PER_NODE": "2"},
    )
    assert_ok(job)
    assert sorted(p["world_size"] for p in probe_lines(job.output)) == ["2", "2"], job.output
    assert "runs/slurm-" not in job.output  # a run.dir given by the user wins


def test_usr1_before_time_limit_stops_workers_and_requeues(slurm_env, tmp_path):
    """The --signal=B:USR1 path: SIGTERM reaches every worker on both nodes, the job requeues itself
    under the same id and its second run (SLURM_RESTART_COUNT=1, the probe no longer holds) completes."""
    job_id = submit(
        slurm_env,
        tmp_path,
        "slurm/train_multinode.sbatch",
        "configs/smoke.yaml",
        extra_env={"DCGAN_TRAIN_SCRIPT": PROBE, "DCGAN_PROBE_HOLD": "120"},
    )
    deadline = time.monotonic() + 120
    while len(probe_lines(output_of(tmp_path, job_id))) < 2:  # both ranks up and holding
        assert time.monotonic() < deadline, output_of(tmp_path, job_id)
        time.sleep(1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True, timeout=10)
    job = wait_job(slurm_env, tmp_path, job_id)
    assert_ok(job)
    assert job.restarts == 1, job.output
    for node in NODES:
        assert f"got SIGTERM on {node}" in job.output, job.output
    assert f"requeueing job {job_id}" in job.output
    assert "(restart 1)" in job.output
    assert len(probe_lines(job.output)) == 4, job.output  # two ranks, twice


def test_requeue_cap_stops_requeueing_and_says_how_to_continue(slurm_env, tmp_path):
    job_id = submit(slurm_env, tmp_path, "slurm/train.sbatch", "configs/smoke.yaml",
                    extra_env={"DCGAN_TRAIN_SCRIPT": PROBE, "DCGAN_PROBE_HOLD": "120", "DCGAN_MAX_REQUEUES": "0"})
    deadline = time.monotonic() + 120
    while not probe_lines(output_of(tmp_path, job_id)):
        assert time.monotonic() < deadline, output_of(tmp_path, job_id)
        time.sleep(1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True, timeout=10)
    job = wait_job(slurm_env, tmp_path, job_id)
    assert job.restarts == 0 and job.state != "COMPLETED", job.output
    assert "the cap (DCGAN_MAX_REQUEUES=0): not requeueing" in job.output and "requeueing job" not in job.output


def test_an_array_task_requeues_alone(slurm_env, tmp_path):
    """`scontrol requeue <array id>` would requeue every task; a preempted task requeues itself only."""
    array_id = submit(slurm_env, tmp_path, "slurm/train.sbatch", "configs/smoke.yaml", sbatch_opts=["--array=0-1"],
                      extra_env={"DCGAN_TRAIN_SCRIPT": PROBE, "DCGAN_PROBE_HOLD": "120"})
    tasks = [f"{array_id}_{i}" for i in (0, 1)]
    logs = lambda: [p.read_text() for p in tmp_path.glob("job-*.out")]  # noqa: E731  (one log per task)
    deadline = time.monotonic() + 120
    while sum(len(probe_lines(text)) for text in logs()) < 2:  # both tasks up and holding
        assert time.monotonic() < deadline, logs()
        time.sleep(1)
    # task 0's own job id is the array's id: the one whose `scontrol requeue $SLURM_JOB_ID` took every task along
    subprocess.run(["scancel", "--batch", "--signal=USR1", tasks[0]], env=slurm_env, check=True, timeout=10)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _job_fields(tasks[0], slurm_env).get("JobState") not in FINAL_STATES:
        assert time.monotonic() < deadline, logs()
        time.sleep(1)
    done, other = _job_fields(tasks[0], slurm_env), _job_fields(tasks[1], slurm_env)
    assert (done["JobState"], done.get("Restarts")) == ("COMPLETED", "1"), logs()
    assert other["JobState"] == "RUNNING" and other.get("Restarts", "0") == "0", other  # untouched
    assert any(f"requeueing job {tasks[0]}" in text for text in logs()), logs()
    subprocess.run(["scancel", tasks[1]], env=slurm_env, check=True, timeout=10)


# --- the trainer itself ---


def _check_run(run_dir: Path, job: Job, world_size: int) -> None:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    assert meta["world_size"] == world_size, job.output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps == sorted(set(steps)), f"metrics.jsonl must be written by rank 0 alone: {steps}"
    assert (run_dir / "config.yaml").exists()
    assert list((run_dir / "samples").glob("*.png"))


def test_multinode_trains_on_two_nodes(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    # synchronized BN plus a cross-rank check every 4 steps: parameters and buffers are equal on both
    # nodes, or the check raises and the job fails
    job = run_job(slurm_env, tmp_path, "slurm/train_multinode.sbatch", "configs/smoke.yaml", f"run.dir={run_dir}",
                  "model.sync_bn=true", "train.check_consistency_every=4", extra_env={"WANDB_MODE": "offline"})
    assert_ok(job)
    assert "[slurm] node1: machine rank 0 of 2" in job.output, job.output
    assert "[slurm] node2: machine rank 1 of 2" in job.output, job.output
    _check_run(run_dir, job, world_size=2)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one W&B run per job (offline here)


def test_single_node_two_cpu_processes(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    job = run_job(
        slurm_env,
        tmp_path,
        "slurm/train.sbatch",
        "configs/smoke.yaml",
        f"run.dir={run_dir}",
        sbatch_opts=("--ntasks-per-node=2",),
    )
    assert_ok(job)
    assert "2 process(es), 0 GPU(s)" in job.output, job.output
    _check_run(run_dir, job, world_size=2)


def test_bad_config_fails_with_one_line_error(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    job = run_job(
        slurm_env,
        tmp_path,
        "slurm/train_multinode.sbatch",
        "configs/smoke.yaml",
        "train.no_such_key=1",
        f"run.dir={run_dir}",
    )
    assert job.state == "FAILED" and job.exit_code != 0, job.output
    errors = [line for line in job.output.splitlines() if "no_such_key" in line and "error" in line.lower()]
    assert errors, f"the trainer's error line is missing:\n{job.output}"
    assert "requeueing" not in job.output  # a user error is not a preemption
    assert not (run_dir / "checkpoints").exists()


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    """End to end: USR1 before the time limit -> SIGTERM to both ranks -> checkpoint, exit 75 -> the job
    requeues itself (same id, same run dir) -> train.resume=auto continues to the last step. W&B (offline) stays
    whole: one run across both attempts, every logged step in its files exactly once, no traceback."""
    run_dir, steps = tmp_path / "run", 600  # ~30 s of smoke training on this machine: time to preempt it
    args = ("configs/smoke.yaml", f"train.steps={steps}", "log.every=10", "train.checkpoint_every=0",
            "log.sample_every=0")
    one_thread = {"OMP_NUM_THREADS": "1"}  # the same arithmetic as the uninterrupted run below
    job_id = submit(slurm_env, tmp_path, "slurm/train_multinode.sbatch", *args, f"run.dir={run_dir}",
                    extra_env={**one_thread, "WANDB_MODE": "offline"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):  # training is under way
        assert time.monotonic() < deadline, output_of(tmp_path, job_id)
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True, timeout=10)
    job = wait_job(slurm_env, tmp_path, job_id)
    assert_ok(job)
    assert job.restarts == 1 and f"requeueing job {job_id}" in job.output, job.output

    first_run, second_run = job.output.split("(restart 1)", 1)
    stopped = re.search(r"stopped by signal at step (\d+)", first_run)
    assert stopped, f"the trainer did not report a preemption checkpoint:\n{job.output}"
    assert f"at step {stopped[1]}" in second_run and "resuming from" in second_run, job.output
    ckpts = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert ckpts == [int(stopped[1]), steps], ckpts
    _check_run(run_dir, job, world_size=2)
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(10, steps + 1, 10)), logged  # each step logged once across both runs
    # the ranks stop without a traceback (torchrun's own agent prints one for the SIGTERM it got: not ours) and
    # rank 0 finishes W&B before its service process goes
    assert "/dcgan_dist/" not in first_run and "ConnectionResetError" not in job.output, first_run
    assert "wandb: Run history:" in first_run, first_run
    rows, ids = history(run_dir)  # raises if a step's scalars are in the W&B files twice
    assert len(set(ids)) == 1 and len(list((run_dir / "wandb").glob("offline-run-*"))) == 2, ids
    assert sorted(step for step, row in rows.items() if "loss/D" in row) == logged, sorted(rows)

    # the preempted, requeued and resumed job ends with the weights of an uninterrupted run, byte for byte
    whole = tmp_path / "whole"
    local = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
         "launch/train.py", "--config", *args, f"run.dir={whole}", "log.progress=false"],
        cwd=REPO, env={**os.environ, **one_thread}, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    final = f"checkpoints/step-{steps:08d}"
    for name in ("generator.safetensors", "discriminator.safetensors"):
        assert (run_dir / final / name).read_bytes() == (whole / final / name).read_bytes(), name


def test_multinode_stages_the_store_to_each_node_and_trains_from_the_copy(slurm_env, tmp_path):
    """DCGAN_STAGE_DIR: before training, one `dcgan-prepare --stage` per node copies the config's store there and
    verifies it (here both nodes share the directory: one copies under the lock, the other finds the verified
    copy); training reads the copy. A second job reuses it; a damaged copy is copied again."""
    store, stage, run_dir = tmp_path / "shapes32", tmp_path / "stage", tmp_path / "run"
    prepared = subprocess.run([sys.executable, "-c", "from dcgan_dist.cli import prepare_main; prepare_main()",
                               "synthetic", "--size", "32", "--channels", "1", "--out", str(store)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    args = ("configs/smoke.yaml", "data.name=store", f"data.root={store}", "data.num_images=null", "train.steps=4")
    job = run_job(slurm_env, tmp_path, "slurm/train_multinode.sbatch", *args, f"run.dir={run_dir}",
                  extra_env={"DCGAN_STAGE_DIR": str(stage)})
    assert_ok(job)
    copy = stage / "shapes32"
    assert job.output.count(f"-> {copy}: 0.00 GB copied and verified") == 1, job.output
    assert job.output.count(f"staged store {copy} is already a verified copy") == 1, job.output
    assert f"\n  root: {copy}\n" in (run_dir / "config.yaml").read_text()  # data.root: the copy
    _check_run(run_dir, job, world_size=2)

    (copy / "shard-00000.u8").write_bytes(b"\0" * (copy / "shard-00000.u8").stat().st_size)  # same size, damaged
    job = run_job(slurm_env, tmp_path, "slurm/train_multinode.sbatch", *args, f"run.dir={tmp_path / 'run2'}",
                  extra_env={"DCGAN_STAGE_DIR": str(stage)})
    assert_ok(job)
    assert "warning: copying" in job.output and "shard-00000.u8 is damaged" in job.output, job.output
    assert (copy / "shard-00000.u8").read_bytes() == (store / "shard-00000.u8").read_bytes()


def _training_ranks(node: str) -> list[int]:
    """The pids of the training processes (torchrun's workers, not the launchers) running on `node`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"launch/train.py" in cmdline and b"launch" not in cmdline and \
                f"SLURMD_NODENAME={node}".encode() in environ and b"TORCHELASTIC_RESTART_COUNT=0" in environ:
            pids.append(int(proc.name))
    return pids


def test_multinode_restarts_in_the_job_when_a_rank_on_the_second_node_dies(slurm_env, tmp_path):
    """DCGAN_MAX_RESTARTS=1: a training process on node2 SIGKILLed after the first checkpoint;
    both nodes' launchers restart their processes inside the job (no requeue), which resume from `latest` and end
    with the weights of an uninterrupted run, byte for byte."""
    run_dir, steps = tmp_path / "run", 400
    args = ("configs/smoke.yaml", f"train.steps={steps}", "log.every=10", "train.checkpoint_every=20",
            "train.keep_last=2", "log.sample_every=0", "model.ema.decay=0.9", "train.collective_timeout_s=20")
    one_thread = {"OMP_NUM_THREADS": "1"}
    job_id = submit(slurm_env, tmp_path, "slurm/train_multinode.sbatch", *args, f"run.dir={run_dir}",
                    extra_env={**one_thread, "DCGAN_MAX_RESTARTS": "1"})
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline, output_of(tmp_path, job_id)
        time.sleep(0.2)
    victims = _training_ranks("node2")
    assert len(victims) == 1, (victims, output_of(tmp_path, job_id))
    os.kill(victims[0], 9)
    job = wait_job(slurm_env, tmp_path, job_id)
    assert_ok(job)
    assert job.restarts == 0 and "requeueing" not in job.output, job.output  # recovered inside the job
    assert "resuming from" in job.output and "/dcgan_dist/" not in job.output, job.output  # no traceback of ours
    _check_run(run_dir, job, world_size=2)

    whole = tmp_path / "whole"
    local = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
         "launch/train.py", "--config", *args, f"run.dir={whole}", "log.progress=false"],
        cwd=REPO, env={**os.environ, **one_thread, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
        timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    final = f"checkpoints/step-{steps:08d}"
    for name in ("generator.safetensors", "generator_ema.safetensors", "discriminator.safetensors"):
        assert (run_dir / final / name).read_bytes() == (whole / final / name).read_bytes(), name


def test_a_second_job_on_a_run_dir_in_use_from_another_node_stops(slurm_env, tmp_path):
    """The same run directory from a job on node1 and, while it trains, a job on node2: the second fails at once
    with one line naming the first (its node, pid, SLURM job); the first runs to the end alone."""
    run_dir = tmp_path / "run"
    args = ("configs/smoke.yaml", "train.steps=600", "log.every=10", "log.sample_every=0", f"run.dir={run_dir}")
    first = submit(slurm_env, tmp_path, "slurm/train.sbatch", *args, sbatch_opts=("--nodelist=node1",))
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert time.monotonic() < deadline, output_of(tmp_path, first)
        time.sleep(0.5)
    second = wait_job(slurm_env, tmp_path, submit(slurm_env, tmp_path, "slurm/train.sbatch", *args,
                                                  sbatch_opts=("--nodelist=node2",)))
    assert second.state == "FAILED" and second.exit_code != 0, second.output
    errors = [line for line in second.output.splitlines() if line.startswith("error")]  # accelerate's own
    # one-process launcher then repeats it in a RuntimeError of its own
    assert len(errors) == 1 and f"run directory {run_dir} is in use by another process (pid " in errors[0], errors
    assert f" on node1, slurm job {first}, since " in errors[0], errors[0]
    assert _job_fields(first, slurm_env).get("JobState") == "RUNNING", "the first job ended too soon: train longer"
    job = wait_job(slurm_env, tmp_path, first)
    assert_ok(job)
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(10, 601, 10)), logged  # every step once, in order: one writer
