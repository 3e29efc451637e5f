"""Checkpoint files: contents, damage detection, fallback, no code execution."""

import json
import pickle
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, assert_ok, run_train
from dcgan_dist import checkpoint
from dcgan_dist.errors import UserError
from dcgan_dist.train import state as train_state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run with checkpoints at steps 3 and 6 (EMA on), copied fresh into each test."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=6",
                        "train.checkpoint_every=3", "model.ema.decay=0.9"))
    return run


@pytest.fixture
def run(trained, tmp_path):
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_checkpoint_holds_everything_to_continue(run):
    ckpt = run / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "discriminator.safetensors", "generator.safetensors", "generator_ema.safetensors", "meta.json",
        "optimizer_D.safetensors", "optimizer_G.safetensors", "rng.safetensors"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["batch_size"]) == (6, 1, 16)
    assert meta["data"] == {"epoch": 0, "position": 6, "world_size": 1, "batch_size": 16} and meta["epoch"] == 0
    assert set(meta["files"]) == {p.name for p in ckpt.iterdir()} - {"meta.json"}
    assert meta["optimizer_G"]["param_groups"][0]["lr"] == 2e-4
    opt = load_file(ckpt / "optimizer_G.safetensors")
    assert {k.split(".", 1)[1] for k in opt} == {"step", "exp_avg", "exp_avg_sq"}
    rng = load_file(ckpt / "rng.safetensors")
    assert rng["torch"].shape[0] == rng["noise"].shape[0] == rng["python"].shape[0] == 1  # [world, ...]
    for path in ckpt.iterdir():  # nothing but safetensors and JSON
        assert path.suffix in (".safetensors", ".json")
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl")) and not list(run.rglob("*.bin"))


def test_optimizer_and_rng_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    tensors, rest = train_state.flatten_optimizer(opt.state_dict())
    json.dumps(rest)  # the non-tensor part is JSON
    again = train_state.unflatten_optimizer(tensors, json.loads(json.dumps(rest)))
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    fresh.load_state_dict(again)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    noise = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leaves a cached gaussian behind: part of numpy's state
    state = train_state.rng_state(noise)
    expect = (torch.rand(2), np.random.randn(3), random.random(), torch.randn(2, generator=noise))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    train_state.set_rng_state(state, noise)
    got = (torch.rand(2), np.random.randn(3), random.random(), torch.randn(2, generator=noise))
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]
    assert torch.equal(got[3], expect[3])


def test_retention_keeps_last_and_every(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=10",
                        "train.checkpoint_every=1", "train.keep_last=2", "train.keep_every=4"))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-00000004", "step-00000008", "step-00000009", "step-00000010"]


def _damage(kind, ckpt):
    meta_path = ckpt / "meta.json"
    meta = json.loads(meta_path.read_text())
    g = ckpt / "generator.safetensors"
    if kind == "truncated":
        g.write_bytes(g.read_bytes()[:100])
    elif kind == "flipped":
        data = bytearray(g.read_bytes())
        data[len(data) // 2] ^= 0x01
        g.write_bytes(bytes(data))
    elif kind == "missing":
        g.unlink()
    elif kind == "shape":  # well-formed file with a consistent hash, but the wrong tensor shape
        tensors = load_file(g)
        key = next(k for k, v in tensors.items() if v.dim() == 4)
        tensors[key] = torch.zeros(2, 2, 2, 2)
        save_file(tensors, g)
        meta["files"][g.name] = checkpoint._hash(g)
        meta_path.write_text(json.dumps(meta))
    elif kind == "newer":
        meta["format_version"] = checkpoint.FORMAT_VERSION + 1
        meta_path.write_text(json.dumps(meta))
    elif kind == "pickle":  # a pickle in place of the weights, its hash made to match
        g.write_bytes(pickle.dumps(_Planted()))
        meta["files"][g.name] = checkpoint._hash(g)
        meta_path.write_text(json.dumps(meta))


MESSAGES = {"truncated": r"generator.safetensors does not match its sha256",
            "flipped": r"generator.safetensors does not match its sha256",
            "missing": r"generator.safetensors is missing",
            "shape": r"generator.safetensors does not match meta.json's generator",
            "newer": r"meta.json has format_version 2; .*upgrade dcgan_dist",
            "pickle": r"cannot read .*generator.safetensors"}


class _Planted:
    def __reduce__(self):  # would create the marker file if anything ever unpickled it
        return (open, (str(REPO / ".planted-pickle-ran"), "w"))


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_damaged_checkpoint_exits_2_naming_the_file(run, kind):
    ckpt = run / "checkpoints" / "step-00000006"
    _damage(kind, ckpt)
    before = {p: p.read_bytes() for p in ckpt.iterdir()}
    proc = run_train("--config", "configs/smoke.yaml", f"run.dir={run.parent / 'new'}", "train.steps=8",
                     f"train.resume={ckpt}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(MESSAGES[kind], lines[0]), proc.stderr
    assert not (run.parent / "new").exists()
    assert {p: p.read_bytes() for p in ckpt.iterdir()} == before  # nothing touched
    assert not (REPO / ".planted-pickle-ran").exists()


@pytest.mark.parametrize("kind", ["truncated", "missing", "newer"])
def test_auto_resume_falls_back_to_the_previous_complete_checkpoint(run, kind):
    _damage(kind, run / "checkpoints" / "step-00000006")
    proc = run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=8")
    assert_ok(proc)
    assert "warning: skipping damaged checkpoint step-00000006" in proc.stdout
    assert "resuming from" in proc.stdout and "step-00000003 at step 3" in proc.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000008"


def test_planted_pickles_never_run(run, cli):
    ckpt = run / "checkpoints" / "step-00000006"
    for name in ("optimizer.pt", "data.pkl", "pytorch_model.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Planted()))
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run.parent / 'b'}", "train.steps=7",
                        f"train.resume={ckpt}"))
    assert_ok(cli("sample_main", str(ckpt), "--num", "2", "--out", str(run.parent / "s.npz")))
    assert_ok(cli("export_main", str(ckpt), str(run.parent / "export")))
    assert not (REPO / ".planted-pickle-ran").exists()


def test_incompatible_resume_lists_the_changed_keys(run):
    proc = run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=8", "model.g_width=16",
                     "data.num_images=128")
    assert proc.returncode == 2
    assert "changed model.g_width (8 -> 16), data.num_images (256 -> 128)" in proc.stderr
    proc = run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=8", "train.resume=never")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr


def test_finished_run_is_left_alone(run):
    before = (run / "checkpoints" / "step-00000006" / "generator.safetensors").read_bytes()
    proc = run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=6")
    assert_ok(proc)
    assert "run already complete: step 6 of 6" in proc.stdout
    assert (run / "checkpoints" / "step-00000006" / "generator.safetensors").read_bytes() == before


def test_readme_snippet_loads_the_latest_generator(run, tmp_path):  # dcgan-export's folder: tests/test_hub.py
    readme = (REPO / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_file" in b)
    snippet = snippet.replace('"runs/demo"', repr(str(run)))  # the run's checkpoints/latest names step-00000006
    scope: dict = {}
    exec(snippet, scope)
    assert scope["G"](torch.randn(2, 16)).shape == (2, 1, 32, 32)


def test_find_resumable_reports_each_damaged_one(tmp_path, run):
    warnings = []
    for step in ("00000006", "00000003"):
        _damage("flipped", run / "checkpoints" / f"step-{step}")
    assert checkpoint.find_resumable(run / "checkpoints", warnings.append) is None
    assert len(warnings) == 2
    with pytest.raises(UserError, match="is not a checkpoint"):
        checkpoint.resolve(str(tmp_path / "nothing"))
