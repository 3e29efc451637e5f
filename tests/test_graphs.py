"""train.cuda_graphs (the step replayed as one CUDA graph) and the parts of the step it relies on.

The graph itself needs a GPU (`-m gpu`); the EMA's device-weight form and the step's one-tensor report are
checked here on the CPU, and the option's refusals in test_config.py and the bad-input matrix.
"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_ok, run_train
from dcgan_dist.gan.models import Generator
from dcgan_dist.train import stats
from dcgan_dist.train.ema import EMA

WEIGHTS = ("generator.safetensors", "discriminator.safetensors", "generator_ema.safetensors")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")


def test_ema_update_with_a_device_weight_equals_the_host_weight():
    torch.manual_seed(0)
    G = Generator(latent_dim=8, width=8, image_size=32)
    host, device = EMA(G, 0.9, warmup_steps=4), EMA(G, 0.9, warmup_steps=4)
    assert [host.weight(s) for s in range(5)] == pytest.approx([1 - 0.9 * t / 4 for t in (1, 2, 3, 4)] + [0.1])
    weight = torch.zeros(())
    for step in range(6):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        host.update(G, host.weight(step))
        weight.fill_(device.weight(step))
        device.update(G, weight)
        for a, b in zip(host.module.parameters(), device.module.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # rounding: lerp vs sub-mul-add


def test_step_row_holds_what_the_interval_statistics_need():
    gen = torch.Generator().manual_seed(1)
    real, fake, after = (torch.randn(16, 1, generator=gen) for _ in range(3))
    scalars = [torch.tensor(x) for x in (0.7, 0.6, 0.9, 2.0, 3.0)]
    row = stats.step_row(*scalars, torch.tensor(False), real.bfloat16(), fake, after)
    assert row.dtype == torch.float32 and row.shape == (6 + 3 * 16,)
    out = dict(zip(stats.STATS + ("nonfinite",), stats.per_step(torch.stack([row, row]))[1].tolist()))
    real = real.bfloat16().float()  # the logits as D returned them (bf16 under autocast)
    expected = {"loss/D": 1.3, "loss/D_real": 0.7, "loss/D_fake": 0.6, "loss/G": 0.9, "grad_norm/G": 2.0,
                "grad_norm/D": 3.0, "nonfinite": 0.0, "D/real": torch.sigmoid(real).mean().item(),
                "D/fake_before": torch.sigmoid(fake).mean().item(), "D/fake_after": torch.sigmoid(after).mean().item(),
                "D/accuracy": (((real > 0).float().mean() + (fake < 0).float().mean()) / 2).item()}
    assert out == pytest.approx(expected, rel=1e-6)


GRAPH_RUN = ["--config", "configs/smoke.yaml", "train.mixed_precision=bf16", "train.channels_last=true",
             "model.ema.decay=0.8", "train.augment=translation,cutout,color", "train.checkpoint_every=0"]


def _weights(run, step):
    path = run / "checkpoints" / f"step-{step:08d}"
    return {n: load_file(path / n) for n in WEIGHTS}


@pytest.mark.gpu
@cuda
def test_graph_replay_trains_as_the_eager_step(tmp_path):
    """20 steps replayed as a graph give eager's weights to bf16 tolerance (noise and augmentation included; the
    same seed gives both runs the same initial weights and data order)."""
    runs = {}
    for graphs in (False, True):
        run = tmp_path / f"graphs-{graphs}"
        assert_ok(run_train(*GRAPH_RUN, f"run.dir={run}", "train.steps=20", f"train.cuda_graphs={graphs}"))
        runs[graphs] = _weights(run, 20)
    for name in WEIGHTS:
        for key, eager in runs[False][name].items():
            graph = runs[True][name][key]
            if eager.is_floating_point():
                torch.testing.assert_close(graph, eager, rtol=1.6e-2, atol=1e-4, msg=f"{name} {key}")


@pytest.mark.gpu
@cuda
def test_graph_runs_resume_n_plus_n_equal_2n_byte_for_byte(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    graphs = [*GRAPH_RUN, "train.cuda_graphs=true"]
    assert_ok(run_train(*graphs, f"run.dir={whole}", "train.steps=12"))
    assert_ok(run_train(*graphs, f"run.dir={split}", "train.steps=6"))
    proc = run_train(*graphs, f"run.dir={split}", "train.steps=12")
    assert_ok(proc)
    assert "at step 6" in proc.stdout
    path = "checkpoints/step-00000012/"
    assert all((whole / path / n).read_bytes() == (split / path / n).read_bytes() for n in WEIGHTS)
