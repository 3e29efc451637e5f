"""The trainer end to end in one process, through the real command, and the sampling command."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import FAULTY_TRAIN, assert_ok, random_inception, run_main, run_train
from dcgan_dist.gan.models import Generator


@pytest.fixture
def sample(capsys):
    """dcgan-sample, run in this process."""
    return lambda *args: run_main(capsys, "sample_main", *args)


def test_smoke_run_writes_the_run_directory(tmp_path, smoke_args):
    proc = run_train(*smoke_args)
    assert_ok(proc)
    run = tmp_path / "run"
    assert "world size 1" in proc.stdout and "done: samples in" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    for key in ("epoch", "loss/D", "loss/D_real", "loss/D_fake", "loss/G", "D/real", "D/fake_before",
                "D/fake_after", "perf/img_per_s", "lr/G", "lr/D"):
        assert key in records[-1]
    assert records[-1]["loss/D"] == pytest.approx(records[-1]["loss/D_real"] + records[-1]["loss/D_fake"], rel=1e-5)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000006.png", "step-00000012.png"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    ckpt = run / "checkpoints" / "step-00000012"
    assert {"discriminator.safetensors", "generator.safetensors", "meta.json"} <= {p.name for p in ckpt.iterdir()}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 12 and meta["world_size"] == 1 and meta["format_version"] == 1
    assert meta["config"] == yaml.safe_load((run / "config.yaml").read_text())
    # the checkpoint contract (README): the weights rebuild with plain safetensors + the kwargs in meta.json
    g = Generator(**meta["generator"])
    g.load_state_dict(load_file(ckpt / "generator.safetensors"))
    assert g(torch.randn(2, g.latent_dim)).shape == (2, 1, 32, 32)


def test_resolved_config_reproduces_the_run(tmp_path, smoke_args):
    assert_ok(run_train(*smoke_args, "train.steps=5", "train.checkpoint_every=0"))
    again = tmp_path / "again"
    assert_ok(run_train("--config", str(tmp_path / "run" / "config.yaml"), f"run.dir={again}"))
    for name in ("generator.safetensors", "discriminator.safetensors"):
        a = (tmp_path / "run" / "checkpoints" / "step-00000005" / name).read_bytes()
        assert a == (again / "checkpoints" / "step-00000005" / name).read_bytes()


def test_existing_run_is_not_overwritten_without_the_flag(tmp_path, smoke_args):
    assert_ok(run_train(*smoke_args, "train.steps=2"))
    weights = tmp_path / "run" / "checkpoints" / "step-00000002" / "generator.safetensors"
    before = weights.read_bytes()
    proc = run_train(*smoke_args, "train.steps=3", "train.resume=never")
    assert proc.returncode == 2 and "already holds a run; pass --overwrite" in proc.stderr
    assert weights.read_bytes() == before
    assert_ok(run_train(*smoke_args, "train.steps=3", "--overwrite"))
    assert not weights.exists() and (tmp_path / "run" / "checkpoints" / "step-00000003").is_dir()


@pytest.mark.parametrize("extra", [["train.mixed_precision=bf16"], ["model.arch=mlp"], ["loss.name=hinge"],
                                   ["loss.g_loss=minimax", "model.norm=none", "model.ema.decay=0.9"],
                                   ["train.channels_last=true", "train.compile=true"]])
def test_variants_train(tmp_path, smoke_args, extra, sample):
    proc = run_train(*smoke_args, "train.steps=4", *extra)
    assert_ok(proc)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(last[k]) for k in ("loss/D", "loss/G"))
    files = {p.name for p in (tmp_path / "run" / "checkpoints" / "step-00000004").iterdir()}
    assert ("generator_ema.safetensors" in files) == ("model.ema.decay=0.9" in extra)
    # compiled or NHWC, the checkpoint holds the plain model's keys: dcgan-sample rebuilds it from them
    assert_ok(sample(str(tmp_path / "run"), "--num", "4", "--out", str(tmp_path / "s.npz")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16's GradScaler, fused Adam, pinned memory)")
@pytest.mark.parametrize("extra", [["train.mixed_precision=fp16"],
                                   ["train.mixed_precision=bf16", "train.channels_last=true"],
                                   ["train.mixed_precision=bf16", "train.compile=true"]])
def test_trains_on_cuda_and_skips_a_nonfinite_step(tmp_path, smoke_args, extra):
    proc = run_train(*smoke_args, "train.steps=8", *extra, extra_env={"FAULT_NONFINITE": "3"}, script=FAULTY_TRAIN)
    assert_ok(proc)
    assert "(cuda)" in proc.stdout
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(last[k]) for k in ("loss/D", "loss/G", "grad_norm/G", "grad_norm/D"))
    assert last["perf/max_mem_gb"] > 0
    # the injected NaN at step 3 (fp16: also the scaler's first overflows, if any)
    assert last["train/nonfinite_steps"] >= 1 if "train.mixed_precision=fp16" in extra else \
        last["train/nonfinite_steps"] == 1
    weights = load_file(tmp_path / "run" / "checkpoints" / "step-00000008" / "generator.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_sample_command(tmp_path, smoke_args, sample):
    assert_ok(run_train(*smoke_args, "train.steps=2", "model.ema.decay=0.5"))
    run = tmp_path / "run"
    for target in (run, run / "checkpoints" / "step-00000002",
                   run / "checkpoints" / "step-00000002" / "generator.safetensors"):
        proc = sample(str(target), "--num", "10", "--out", str(tmp_path / "s.npz"))
        assert_ok(proc)
        arr = np.load(tmp_path / "s.npz")["arr_0"]
        assert arr.shape == (10, 32, 32, 1) and arr.dtype == np.uint8
    assert_ok(sample(str(run), "--num", "16", "--out", str(tmp_path / "grid.png")))
    assert (tmp_path / "grid.png").stat().st_size > 100
    # EMA weights by default, the raw generator on request: different images
    ema = np.load(tmp_path / "s.npz")["arr_0"]
    assert_ok(sample(str(run), "--num", "10", "--no-ema", "--out", str(tmp_path / "raw.npz")))
    assert not np.array_equal(ema, np.load(tmp_path / "raw.npz")["arr_0"])


def test_colour_through_every_reader(tmp_path, smoke_args, cli):
    """A 3-channel run: its grids, dcgan-sample's .npz and .png, dcgan-export's folder and card grid, dcgan-sample
    from that folder, and dcgan-eval of the samples against a folder of colour PNGs all keep the colour."""
    from PIL import Image

    from dcgan_dist.data.builtin import synthetic_shapes

    assert_ok(run_train(*smoke_args, "model.channels=3", "train.steps=2", "log.sample_every=2"))
    run = tmp_path / "run"
    grid = np.asarray(Image.open(sorted((run / "samples").glob("step-*.png"))[-1]))
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert_ok(cli("sample_main", run, "--num", "8", "--out", tmp_path / "s.npz"))
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (8, 32, 32, 3)
    assert_ok(cli("sample_main", run, "--num", "8", "--out", tmp_path / "s.png"))
    assert Image.open(tmp_path / "s.png").mode == "RGB"
    assert_ok(cli("export_main", run, tmp_path / "hub"))
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["channels"] == 3
    assert Image.open(tmp_path / "hub" / "samples.png").mode == "RGB"
    assert_ok(cli("sample_main", tmp_path / "hub", "--num", "8", "--out", tmp_path / "hub.npz"))
    assert np.array_equal(np.load(tmp_path / "hub.npz")["arr_0"], np.load(tmp_path / "s.npz")["arr_0"])
    real = tmp_path / "real"
    real.mkdir()
    for i, image in enumerate(synthetic_shapes(8, 32, 3).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(real / f"{i}.png")
    weights = tmp_path / "inception.pth"  # seeded random TF-Inception weights: the path, not the figure, is tested
    torch.save(random_inception().state_dict(), weights)
    proc = cli("eval_main", tmp_path / "s.npz", "--ref", real, "--quiet", "--fid-weights", weights)
    assert_ok(proc)
    assert "pair: 8 images vs 8 images of" in proc.stdout


def test_sample_command_bad_input(tmp_path, smoke_args, sample):
    assert_ok(run_train(*smoke_args, "train.steps=2"))
    run = tmp_path / "run"
    cases = [
        ([str(tmp_path / "nowhere"), "--out", "x.npz"], "is not a checkpoint"),
        ([str(run), "--out", str(tmp_path / "x.jpg")], "use a .npz"),
        ([str(run), "--num", "0", "--out", str(tmp_path / "x.npz")], "--num 0"),
    ]
    ckpt = run / "checkpoints" / "step-00000002"
    data = bytearray((ckpt / "generator.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "generator.safetensors").write_bytes(bytes(data))
    cases.append(([str(ckpt), "--out", str(tmp_path / "x.npz")], "generator.safetensors does not match its sha256"))
    for args, message in cases:
        proc = sample(*args)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "x.npz").exists()


def test_ema_update_rule_with_warmup(tmp_path):
    """EMA_t = d_t EMA_{t-1} + (1 - d_t) G_t with d_t = decay * min(1, t / warmup); BN buffers copied from G."""
    from dcgan_dist.recipe import load_config
    from dcgan_dist.train.trainer import Trainer

    cfg = load_config("configs/smoke.yaml", [f"run.dir={tmp_path / 'run'}", "log.wandb.mode=disabled",
                                             "model.ema.decay=0.9", "model.ema.warmup_steps=4"])
    trainer = Trainer(cfg, overwrite=True)
    real, z = torch.rand(16, 1, 32, 32) * 2 - 1, torch.randn(16, 16)
    G, G_ema = trainer.accelerator.unwrap_model(trainer.G), trainer.ema.module
    assert all(torch.equal(a, b) for a, b in zip(G_ema.parameters(), G.parameters()))  # starts as G
    for t in range(1, 7):
        before = [p.detach().clone() for p in G_ema.parameters()]
        trainer.train_step(real, z)
        trainer.step += 1
        d = 0.9 * min(1.0, t / 4)
        for old, ema, g in zip(before, G_ema.parameters(), G.parameters()):
            torch.testing.assert_close(ema, d * old + (1 - d) * g, rtol=0, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(G_ema.buffers(), G.buffers()))
    trainer.close()


@pytest.mark.parametrize("extra", [["model.cond=projection", "model.ema.decay=0.9", "model.spectral_norm=both"],
                                   ["model.cond=concat", "model.spectral_norm=d", "train.mixed_precision=bf16",
                                    "train.channels_last=true"]], ids=["projection", "concat"])
def test_conditional_run_grid_rows_and_class_sampling(tmp_path, smoke_args, sample, extra):
    from PIL import Image

    from dcgan_dist.gan import sampling

    proc = run_train(*smoke_args, "data.name=mnist5k", "data.num_images=null", "model.num_classes=10",
                     "train.steps=4", "log.num_samples=20", *extra)
    assert_ok(proc)
    assert "conditional on 10 classes" in proc.stdout
    run = tmp_path / "run"
    meta = json.loads((run / "checkpoints" / "step-00000004" / "meta.json").read_text())
    cond = extra[0].split("=")[1]
    assert meta["generator"]["num_classes"] == meta["discriminator"]["num_classes"] == 10
    assert meta["generator"]["cond"] == cond and meta["discriminator"]["spectral_norm"] is True
    assert meta["generator"]["spectral_norm"] == ("model.spectral_norm=both" in extra)
    # the fixed grid: one row per class, 20 // 10 = 2 columns of 32x32 images with 2-pixel padding
    assert Image.open(run / "samples" / "step-00000004.png").size == (2 * 34 + 2, 10 * 34 + 2)
    z, labels, nrow = sampling.class_grid(20, 16, 10, seed=0)
    assert nrow == 2 and labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.equal(z[:2], z[2:4]) and not torch.equal(z[0], z[1])  # a column keeps its z across the classes
    if cond == "concat":  # dcgan-sample on a concat model, byte for byte against its export: tests/test_hub.py
        return

    assert_ok(sample(str(run), "--num", "6", "--class", "3", "--out", str(tmp_path / "three.npz")))
    three = np.load(tmp_path / "three.npz")
    assert three["arr_0"].shape == (6, 32, 32, 1) and three["labels"].tolist() == [3] * 6
    assert_ok(sample(str(run), "--num", "6", "--class", "4", "--out", str(tmp_path / "four.npz")))
    assert not np.array_equal(three["arr_0"], np.load(tmp_path / "four.npz")["arr_0"])  # same z, other class
    assert_ok(sample(str(run), "--num", "12", "--out", str(tmp_path / "all.npz")))
    every = np.load(tmp_path / "all.npz")
    assert every["labels"].tolist() == [i % 10 for i in range(12)] and every["labels"].dtype == np.int64
    # sample i has z_i either way: the uniform draw's 4th image (class 3) is --class 3's 4th, its 5th (class 4) not
    assert_ok(sample(str(run), "--num", "12", "--class", "3", "--out", str(tmp_path / "three12.npz")))
    three12 = np.load(tmp_path / "three12.npz")["arr_0"]
    assert np.array_equal(every["arr_0"][3], three12[3]) and not np.array_equal(every["arr_0"][4], three12[4])
    for label in ("5", "6"):  # a latent walk within one class
        assert_ok(sample(str(run), "--interpolate", "1", "2", "--steps", "4", "--class", label, "--out",
                         str(tmp_path / f"walk{label}.png")))
    assert Image.open(tmp_path / "walk5.png").size == (4 * 34 + 2, 36)
    assert (tmp_path / "walk5.png").read_bytes() != (tmp_path / "walk6.png").read_bytes()
