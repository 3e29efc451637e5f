"""Multi-process runs through the real launcher: 2 gloo ranks on the CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, assert_ok

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "dist" / "train_worker.py")


def test_two_ranks_train_smoke_through_accelerate_launch(tmp_path):
    run = tmp_path / "run"
    proc = accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}")
    assert_ok(proc)
    assert proc.stdout.count("world size 2 (cpu), batch 16/rank = 32 global") == 1  # one banner: rank 0
    meta = json.loads((run / "checkpoints" / "step-00000012" / "meta.json").read_text())
    assert meta["world_size"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [4, 8, 12]  # written once, not once per rank
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000006.png", "step-00000012.png"]


def test_sharding_reductions_and_replicas(tmp_path):
    run = tmp_path / "run"
    # 96 images, 2 ranks x 20 per rank: 2 batches per epoch, 16 images dropped, 3 epochs in 6 steps
    proc = accelerate_launch(2, WORKER, "train", str(tmp_path), f"run.dir={run}", "data.num_images=96",
                             "train.batch_size=20", "train.steps=6", "train.checkpoint_every=0",
                             "model.ema.decay=0.8", "model.ema.warmup_steps=3")
    assert_ok(proc)
    records = [json.loads((tmp_path / f"record-rank{r}.json").read_text()) for r in range(2)]
    assert all(rec["world"] == 2 for rec in records)

    # every epoch: ranks disjoint, together the dataset less the dropped remainder
    for epoch in range(3):
        per_rank = [[i for e, idx in rec["indices"] if e == epoch for i in idx] for rec in records]
        assert len(per_rank[0]) == len(per_rank[1]) == 40
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(set(per_rank[0]) | set(per_rank[1])) == 96 - 96 % 40

    # D's gradients are all-reduced once per step, in the backward of its fake loss (the real-loss backward
    # only accumulates), and never in the G phase; G's only in the G phase, once per step.
    for rec in records:
        red = rec["reductions"]
        d_buckets = {b for _, _, b in red["D"]}
        assert {phase for _, phase, _ in red["D"]} == {"d_fake"}
        assert sorted((s, b) for s, _, b in red["D"]) == sorted((s, b) for s in range(6) for b in d_buckets)
        g_buckets = {b for _, _, b in red["G"]}
        assert {phase for _, phase, _ in red["G"]} == {"g"}
        assert len(red["G"]) == 6 * len(g_buckets)

    # replicas: every parameter, the EMA generator's too, identical on both ranks at the end
    a, b = (load_file(tmp_path / f"final-rank{r}.safetensors") for r in range(2))
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert len(params) > 10 and any(k.startswith("EMA.") for k in params)
    for k in params:
        assert torch.equal(a[k], b[k]), k
    # exactly one process wrote samples and metrics
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # steps 4 and 6 with log.every=4


def _step_params(tmp_path, world, batch, *extra):
    out = tmp_path / f"{world}x{batch}{'-'.join(extra)}"
    out.mkdir()
    assert_ok(accelerate_launch(world, WORKER, "step", str(out), f"train.batch_size={batch}",
                                "train.checkpoint_every=0", f"run.dir={tmp_path / 'run'}", *extra))
    return load_file(out / "step-rank0.safetensors"), load_file(out / "init-rank0.safetensors")


def test_two_ranks_batch_b_equal_one_process_batch_2b(tmp_path):
    """Gradient averaging: without BatchNorm, 2 x B over DDP is the same update as 1 x 2B."""
    two, init = _step_params(tmp_path, 2, 8, "model.norm=none")
    one, _ = _step_params(tmp_path, 1, 16, "model.norm=none")
    assert two.keys() == one.keys()
    for k in two:
        # fp32: gradients summed in another order differ by rounding; Adam's normalised update keeps it tiny
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-5, msg=k)
        assert (two[k] - init[k]).abs().max() > 1e-5, k  # two steps moved every tensor: not vacuous

    # With per-rank BatchNorm the statistics differ (B vs 2B), so the same comparison fails: it can fail.
    two_bn, _ = _step_params(tmp_path, 2, 8)
    one_bn, _ = _step_params(tmp_path, 1, 16)
    worst = max((two_bn[k] - one_bn[k]).abs().max().item() for k in two_bn)
    assert worst > 1e-4


@pytest.mark.parametrize("world,batch", [(2, 8), (3, 4)])
def test_sync_bn_step_equals_one_process_on_the_concatenated_batch(tmp_path, world, batch):
    """With model.sync_bn, W ranks x B make the same whole G+D step (parameters and running statistics)
    as one process with plain BatchNorm on the W*B batch."""
    many, init = _step_params(tmp_path, world, batch, "model.sync_bn=true")
    one, _ = _step_params(tmp_path, 1, world * batch)
    assert many.keys() == one.keys() and any("running_var" in k for k in many)
    for k in many:
        # fp32 rounding: partial sums are added in another order; BN divides by small variances
        torch.testing.assert_close(many[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
        if "num_batches" not in k:
            assert (many[k] - init[k]).abs().max() > 1e-6, k


def test_sync_bn_training_with_consistency_checks(tmp_path):
    run = tmp_path / "run"
    assert_ok(accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
                                "model.sync_bn=true", "train.check_consistency_every=3", "train.steps=6"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"


def test_global_batch_not_divisible_by_world_size_is_refused(tmp_path):
    run = tmp_path / "run"
    proc = accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
                             "train.global_batch_size=15")
    assert proc.returncode != 0
    assert proc.stderr.count("error: train.global_batch_size = 15 is not accepted; it must be divisible by "
                             "the world size 2") == 1
    assert not run.exists()


def test_bf16_two_ranks(tmp_path):
    run = tmp_path / "run"
    assert_ok(accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
                                "train.mixed_precision=bf16", "train.steps=4"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
