"""Shared helpers: run the real commands as subprocesses, the way users run them."""

from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The user's cache (stores prepared on first use, classifiers) is one fresh directory per test session, shared by
# the tests and every process they start: nothing from an earlier session or the user's own cache is reused.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dcgan-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


def env(**extra: str | None) -> dict[str, str]:
    """The test environment: one thread per process, W&B off unless a test asks (None removes a variable)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **extra}
    e.pop("RANK", None)
    return {k: v for k, v in e.items() if v is not None}


FAULTY_TRAIN = "tests/faults/faulty_train.py"  # dcgan-train with test-side faults (FAULT_* variables)


def run_train(*args: str, cwd: Path = REPO, timeout: float = 300, extra_env: dict[str, str] | None = None,
              script: str = "launch/train.py") -> subprocess.CompletedProcess:
    """`python launch/train.py ARGS` (or another entry `script`) in one process."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd,
                          env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int, script: str, *args: str, timeout: float = 300,
                      **kw) -> subprocess.CompletedProcess:
    """The real launcher: `accelerate launch --multi_gpu --num_processes N` gives N gloo ranks on a CPU host."""
    launcher = ["--num_processes", str(num_processes)] + (["--multi_gpu"] if num_processes > 1 else [])
    cmd = [str(BIN / "accelerate"), "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**kw.pop("extra_env", {})), capture_output=True, text=True,
                          timeout=timeout, **kw)


def command_module(main: str) -> str:
    """Where a command's main function lives: `dcgan-eval`'s in eval_cli, the others in cli."""
    return "dcgan_dist.eval_cli" if main == "eval_main" else "dcgan_dist.cli"


def run_main(capsys, main: str, *args: str) -> subprocess.CompletedProcess:
    """A command (`dcgan_dist.cli.<main>`, `eval_cli.eval_main`) in this process, as a CompletedProcess: exit
    status, stdout, stderr."""
    try:
        getattr(importlib.import_module(command_module(main)), main)(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess([main, *args], code, out.out, out.err)


@pytest.fixture
def cli(capsys):
    """The commands in this process: `cli("sample_main", *args)` -> CompletedProcess (the same parsing, one-line
    errors and exit status as the console scripts, without seconds of imports per call)."""
    return lambda main, *args: run_main(capsys, main, *map(str, args))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    out, err = proc.stdout[-3000:], proc.stderr[-5000:]
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


@pytest.fixture
def smoke_args(tmp_path: Path) -> list[str]:
    return ["--config", "configs/smoke.yaml", f"run.dir={tmp_path / 'run'}"]


def launch_background(num_processes: int, *args: str, launcher_args: tuple[str, ...] = (),
                      script: str = "launch/train.py", **extra_env: str) -> subprocess.Popen:
    """`accelerate launch [launcher_args] ... launch/train.py ARGS` (or another `script`) in its own session (killpg
    reaches every rank); output merged."""
    launcher = ["--num_processes", str(num_processes)] + (["--multi_gpu"] if num_processes > 1 else [])
    cmd = [str(BIN / "accelerate"), "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), *launcher_args, script, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl has `step` lines (log.every=1) while `proc` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("training did not progress")


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of the training processes a launcher started (read from /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:  # the ppid
                continue
            environ = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if "RANK" in environ:
            ranks[int(environ["RANK"])] = int(entry.name)
    return ranks


def session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (directories as 'dir'): to prove nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def fault_row(record_property):
    """Records one row of docs/RELIABILITY.md (tests/faults/report.py collects them from the JUnit XML)."""
    def record(fault: str, trials: int, survived: int, data_lost: int = 0, exit_s: float | None = None,
               whole_run: bool = False) -> None:  # whole_run: exit_s counts from the process's start
        record_property("fault_row", json.dumps({"fault": fault, "trials": trials, "survived": survived,
                                                 "data_lost": data_lost, "exit_s": exit_s, "whole_run": whole_run}))
    return record


def random_inception():
    """pytorch-fid's TF-Inception with seeded random weights (nothing downloaded). Kaiming-normal convolutions keep
    the activations O(1) through the ~90 layers (BatchNorm at its identity initialisation)."""
    import torch

    from dcgan_dist.quality import fid

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = fid.fid_inception()
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.01)
                torch.nn.init.zeros_(m.bias)
    return net
