"""Shared helpers: run the real commands as subprocesses, the way users run them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(**extra: str | None) -> dict[str, str]:
    """The test environment: one thread per process, W&B off unless a test asks (None removes a variable)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **extra}
    e.pop("RANK", None)
    return {k: v for k, v in e.items() if v is not None}


def run_train(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python launch/train.py ARGS` in one process."""
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


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


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    out, err = proc.stdout[-3000:], proc.stderr[-5000:]
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


@pytest.fixture
def smoke_args(tmp_path: Path) -> list[str]:
    return ["--config", "configs/smoke.yaml", f"run.dir={tmp_path / 'run'}"]
