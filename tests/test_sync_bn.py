"""Synchronized BatchNorm: N ranks with sync on compute what ONE process computes with plain
nn.BatchNorm on the concatenated batch. The multi-process tests start tests/dist/sync_bn_worker.py
through the real launcher (torch.distributed.run, gloo, CPU) and compare the tensors it writes.
"""

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dcgan_dist.train.sync_bn import DistributedBatchNorm, check_consistency, convert_sync_batchnorm

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "sync_bn_worker.py"
CASES = ["layer", "layer_uneven", "layer_nosync", "layer_bf16", "gan", "gan_nosync", "gan_bf16",
         "consistency"]

# fp32: the ranks sum their partial statistics in another order than one process does, so results
# agree to a few ulps, not bitwise (observed: < 6e-6 on values up to 50, < 4e-7 in the GAN step).
FP32 = dict(atol=1e-5, rtol=1e-5)
# bf16 keeps 8 significant bits, so every rounding to bf16 errs by up to 2^-8 relative: one layer
# (input, output and gradient rounded) is allowed 2^-7 of its largest value, the small G and D (bf16
# at every conv) 2^-6.
BF16_LAYER, BF16_NET = 2**-7, 2**-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, out: Path, *cases: str, pg_timeout=120, wait=300, device="cpu"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(WORKER), str(out), *cases,
           "--timeout", str(pg_timeout), "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # 2 cores, up to 3 ranks
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its ranks
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the launcher still ran after {wait} s: a hang\n{stdout[-2000:]}{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(world) -> the directory where `world` ranks wrote every case (one launch per world size)."""
    done = {}

    def run(world: int) -> Path:
        if world not in done:
            out = tmp_path_factory.mktemp(f"sync_bn_{world}_ranks")
            proc = launch(world, out, *CASES)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            done[world] = out
        return done[world]

    return run


def load(out: Path, case: str, world: int):
    ranks = [load_file(out / f"{case}.rank{r}.safetensors") for r in range(world)]
    return load_file(out / f"{case}.ref.safetensors"), ranks


def expected(ref: dict, got: dict, key: str) -> torch.Tensor:
    lo, hi = got["rows"].tolist()
    return ref[key][lo:hi] if key.startswith("batch.") else ref[key]  # this rank's rows of the batch


def compare(ref: dict, got: dict, keys=None, **tolerance):
    for key in keys or [k for k in got if k != "rows"]:
        torch.testing.assert_close(got[key].double(), expected(ref, got, key).double(), **tolerance,
                                   msg=lambda m, key=key: f"{key}: {m}")


def max_gap(ref: dict, got: dict, keys) -> float:
    return max((got[k].double() - expected(ref, got, k).double()).abs().max().item() for k in keys)


# --- one process: conversion and the no-process-group path -----------------------------------------


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                        nn.BatchNorm1d(5, momentum=None))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[4].bias.normal_()
    net[1].weight.requires_grad_(False)
    return net


def test_convert_keeps_names_values_and_matches_batchnorm_without_process_group():
    plain = small_net()
    synced = convert_sync_batchnorm(copy.deepcopy(plain), "cpu")
    assert [type(m) for m in (synced[1], synced[4])] == [DistributedBatchNorm, DistributedBatchNorm]
    assert list(synced.state_dict()) == list(plain.state_dict())
    for (key, a), b in zip(plain.state_dict().items(), synced.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert [p.requires_grad for p in synced.parameters()] == [p.requires_grad for p in plain.parameters()]
    assert synced[4].momentum is None and synced[1].eps == plain[1].eps

    x = torch.randn(8, 3, 6, 6)
    for _ in range(2):  # training mode: batch statistics and two running-statistics updates
        assert torch.equal(synced(x), plain(x))
    for key, value in plain.state_dict().items():
        assert torch.equal(synced.state_dict()[key], value), key
    plain.eval()
    synced.eval()
    assert torch.equal(synced(x), plain(x))
    check_consistency(synced)  # no process group: nothing to compare, returns


def test_convert_for_cuda_uses_torch_sync_batchnorm_and_back():
    synced = convert_sync_batchnorm(small_net(), "cuda")  # conversion needs no GPU
    assert isinstance(synced[1], nn.SyncBatchNorm) and isinstance(synced[4], nn.SyncBatchNorm)
    assert list(synced.state_dict()) == list(small_net().state_dict())
    back_on_cpu = convert_sync_batchnorm(synced, "cpu")  # e.g. a CUDA-converted model resumed on CPU
    assert all(isinstance(back_on_cpu[i], DistributedBatchNorm) for i in (1, 4))


def test_bf16_autocast_without_process_group_is_batchnorm():
    plain, own = nn.BatchNorm2d(3), DistributedBatchNorm(3)
    x = torch.randn(4, 3, 5, 5).bfloat16()  # what a conv under bf16 autocast hands to BatchNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected_y = own(x), plain(x)
    assert y.dtype == expected_y.dtype == torch.bfloat16 and own.running_mean.dtype == torch.float32
    assert torch.equal(y, expected_y) and torch.equal(own.running_var, plain.running_var)


# --- several ranks through the launcher -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["layer", "layer_uneven"])
def test_layers_equal_batchnorm_on_concatenated_batch(run, world, case):
    """BatchNorm2d (momentum 0.1 and cumulative) and BatchNorm1d, two steps then eval: outputs, input
    gradients, summed weight/bias gradients, running statistics. `layer_uneven`: 3+5 or 0+5+2 rows."""
    ref, ranks = load(run(world), case, world)
    for got in ranks:
        compare(ref, got, **FP32)
        assert got["bn2d.num_batches_tracked"].item() == 2


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_gan_step_under_ddp_equals_one_process(run, world):
    """Two DCGAN steps (G forward, D real, D fake, G phase; SGD; DDP averaging): G's images, D's
    logits, the input gradient, and every parameter and BN buffer of G and D after the steps."""
    ref, ranks = load(run(world), "gan", world)
    for got in ranks:
        compare(ref, got, **FP32)
        assert got["d.3.num_batches_tracked"].item() == 6  # three D forwards per step


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_without_sync_the_same_runs_differ(run, world):
    """Plain BN per rank: the comparisons above must fail, by far more than their tolerance."""
    ref, ranks = load(run(world), "layer_nosync", world)
    assert max_gap(ref, ranks[0], ["batch.bn2d.y0", "batch.bn1d.y0"]) > 1e3 * FP32["atol"]
    assert max_gap(ref, ranks[0], ["bn2d.running_var"]) > 1e3 * FP32["atol"]
    ref, ranks = load(run(world), "gan_nosync", world)
    assert max_gap(ref, ranks[0], ["batch.fake0", "g.0.weight", "d.2.weight"]) > 1e3 * FP32["atol"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_bf16_autocast(run, world):
    """bf16 inputs under CPU bf16 autocast: bf16 outputs within bf16 rounding of the fp32 reference on
    the same rounded inputs, and fp32 running statistics equal to it at fp32 tolerance."""
    ref, ranks = load(run(world), "layer_bf16", world)
    for got in ranks:
        stats = [k for k in got if "running" in k]
        compare(ref, got, stats, **FP32)
        assert all(got[k].dtype == torch.float32 for k in stats)
        assert got["batch.bn2d.y0"].dtype == got["batch.bn2d.xgrad0"].dtype == torch.bfloat16
        for key in [k for k in got if k not in stats and k != "rows"]:
            scale = expected(ref, got, key).abs().max().item()
            compare(ref, got, [key], rtol=BF16_LAYER, atol=BF16_LAYER * scale)

    ref, ranks = load(run(world), "gan_bf16", world)
    for got in ranks:
        assert got["batch.fake0"].dtype == torch.bfloat16  # G's output under autocast
        assert got["g.1.running_mean"].dtype == got["d.3.running_var"].dtype == torch.float32
        for key in ["batch.fake0", "batch.logits_real0", "batch.logits_g0"]:  # before any update
            scale = expected(ref, got, key).abs().max().item()
            compare(ref, got, [key], rtol=BF16_NET, atol=BF16_NET * scale)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_check_consistency_names_the_differing_tensor(run, world):
    messages = [json.loads((run(world) / f"consistency.rank{r}.json").read_text()) for r in range(world)]
    assert all(m == messages[0] for m in messages)  # every rank raises, with the same message
    m = messages[0]
    assert m["identical"] == "ok" and m["restored"] == "ok"
    assert re.search(r"^D: 1 of \d+ .*: 2\.weight: max \|x - x_rank0\| = 0\.001 on rank\(s\) \[1\]$",
                     m["parameter"])
    assert re.search(rf": 3\.running_mean: max \|x - x_rank0\| = 0\.25 on rank\(s\) \[{world - 1}\]$",
                     m["buffer"])


@pytest.mark.slow
def test_a_rank_one_step_short_times_out_instead_of_hanging(tmp_path):
    """Rank 1 stops one step early and lives on: rank 0 waits in BN's all-reduce until the 10 s
    process-group timeout, then the launcher stops every rank and fails."""
    start = time.monotonic()
    proc = launch(2, tmp_path, "one_step_fewer", pg_timeout=10, wait=90)
    assert proc.returncode != 0 and time.monotonic() - start < 90
    assert re.search(r"timed out", proc.stdout + proc.stderr, re.IGNORECASE), proc.stderr[-3000:]


@pytest.mark.slow
def test_a_rank_one_forward_short_fails_loudly(tmp_path):
    """Rank 1 skips one D forward: its next all-reduce meets one of another size and gloo refuses."""
    start = time.monotonic()
    proc = launch(2, tmp_path, "one_forward_fewer", pg_timeout=10, wait=90)
    assert proc.returncode != 0 and time.monotonic() - start < 90
    assert re.search(r"collective mismatch|timed out", proc.stdout + proc.stderr, re.IGNORECASE), \
        proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's SyncBatchNorm refuses CPU)")
def test_torch_sync_batchnorm_on_cuda_matches_ours(tmp_path):
    """Two ranks sharing the GPU(s) over gloo, uneven batches: torch's kernel and ours agree."""
    proc = launch(2, tmp_path, "torch_vs_own", device="cuda")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for r in range(2):
        got = load_file(tmp_path / f"torch_vs_own.rank{r}.safetensors")
        assert got["cuda.type"].item() and not got["own.type"].item()
        for key in [k for k in got if k.startswith("cuda.") and k != "cuda.type"]:
            own = key.replace("cuda.", "own.", 1)
            torch.testing.assert_close(got[own].double(), got[key].double(), **FP32,
                                       msg=lambda m, k=own: f"{k}: {m}")
