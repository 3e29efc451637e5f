"""launch/accelerate/*.yaml: each file loads in accelerate and gives the world it promises.

No cluster needed (this file is not marked `cluster`). The GPU files cannot run as written on a CPU host,
so they run with the probe and the smallest command-line override that keeps their meaning: GPU counts
become CPU process counts (the trainer's rule: no CUDA -> Accelerator(cpu=True) -> gloo).
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "launch" / "accelerate"
PROBE = "tests/cluster/allreduce_probe.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
EXPECTED = {  # file: (distributed_type, processes, machines)
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1),
    "multi_node.yaml": ("MULTI_GPU", 16, 2),
    "cpu.yaml": ("MULTI_GPU", 2, 1),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_validates(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(CONFIGS / name))
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == EXPECTED[name]
    # the launcher's own checks, as `accelerate launch --config_file ... launch/train.py` would run them
    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / name), "launch/train.py", "--config", "configs/smoke.yaml"]
    )
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == EXPECTED[name][1]
    assert args.multi_gpu == (EXPECTED[name][0] == "MULTI_GPU")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(*args, env=None):
    return subprocess.Popen(
        [*ACCELERATE, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
    )


def _probe_worlds(*procs, timeout=180) -> list[int]:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return sorted(int(w) for out in outputs for w in re.findall(r"probe rank=\d+ world_size=(\d+)", out))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides, world",
    [
        ("cpu.yaml", [], 2),
        ("single_gpu.yaml", [], 1),
        ("multi_gpu.yaml", ["--num_processes", "2", "--main_process_port", _free_port()], 2),
    ],
)
def test_config_launches(name, overrides, world):
    proc = _launch("--config_file", str(CONFIGS / name), *overrides, PROBE)
    assert _probe_worlds(proc) == [world] * world


@pytest.mark.slow
def test_multi_node_config_forms_one_group_from_two_machine_ranks():
    common = [
        "--config_file",
        str(CONFIGS / "multi_node.yaml"),
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        _free_port(),
    ]
    procs = [_launch(*common, "--machine_rank", str(rank), PROBE) for rank in (0, 1)]
    assert _probe_worlds(*procs) == [2, 2]


@pytest.mark.slow
def test_cpu_config_trains_smoke_with_two_ranks(tmp_path):
    proc = _launch(
        "--config_file",
        str(CONFIGS / "cpu.yaml"),
        "launch/train.py",
        "--config",
        "configs/smoke.yaml",
        f"run.dir={tmp_path}",
    )
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert json.loads((tmp_path / "checkpoints" / latest / "meta.json").read_text())["world_size"] == 2
