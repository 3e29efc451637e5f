from pathlib import Path

import pytest
import yaml

from conftest import run_train
from dcgan_dist.config import Config, load_config, validate_world
from dcgan_dist.errors import UserError


def test_defaults_and_typed_overrides():
    cfg = load_config(None, ["train.steps=200", "optim.lr_g=1e-3", "model.sync_bn=true", "run.name=123",
                             "data.num_images=null", "model.ema.decay=0.99"])
    assert cfg.train.steps == 200 and cfg.optim.lr_g == 1e-3 and cfg.model.sync_bn is True
    assert cfg.run.name == "123" and cfg.data.num_images is None and cfg.model.ema.decay == 0.99
    assert cfg.run_dir == Path("runs/123")
    assert isinstance(load_config(None, ["optim.lr_d=1"]).optim.lr_d, float)  # an int is a fine float


def test_every_recipe_loads():
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(str(path))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["train.steps=3", "loss.name=hinge"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_global_batch_is_split_over_ranks():
    cfg = load_config(None, ["train.global_batch_size=256"])
    assert validate_world(cfg, 4, cuda=False).train.batch_size == 64
    with pytest.raises(UserError, match=r"train.global_batch_size = 256 .* divisible by the world size 3"):
        validate_world(cfg, 3, cuda=False)
    with pytest.raises(UserError, match="train.mixed_precision = 'fp16'.*bf16"):
        validate_world(load_config(None, ["train.mixed_precision=fp16"]), 1, cuda=False)


BAD = [
    # (overrides or a YAML text, text the one-line message must contain)
    (["train.stepz=3"], "unknown config key train.stepz"),
    (["model.image_size=48"], "model.image_size = 48"),
    (["train.steps=ten"], "train.steps = 'ten' has the wrong type; expected int"),
    (["train.steps=0"], "train.steps = 0"),
    (["train.batch_size=-4"], "train.batch_size = -4"),
    (["model.sync_bn=maybe"], "model.sync_bn = 'maybe' has the wrong type; expected bool"),
    (["train.mixed_precision=fp8"], "train.mixed_precision = 'fp8'"),
    (["data.name=imagenet"], "data.name = 'imagenet'"),
    (["model.arch=resnet"], "model.arch = 'resnet'"),
    (["loss.real_target=1.5"], "loss.real_target = 1.5"),
    (["optim.lr_g=-1"], "optim.lr_g = -1.0"),
    (["optim.beta1=1.0"], "optim.beta1 = 1.0"),
    (["data.name=mnist5k", "model.channels=3"], "data.name=mnist5k has 1 channel(s)"),
    (["model.norm=none", "model.sync_bn=true"], "model.sync_bn = True"),
    (["loss.name=hinge", "loss.real_target=0.9"], "loss.real_target = 0.9"),
    (["trainsteps"], "override 'trainsteps' is not of the form section.key=value"),
    (["train=3"], "train must be a mapping"),
    (["model.ema.decay=1.0"], "model.ema.decay = 1.0"),
    (["train.global_batch_size=0"], "train.global_batch_size = 0"),
    ("train:\n  steps: [1, 2\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping of sections"),
    ("model:\n  widht: 3\n", "unknown config key model.widht"),
    ("data:\n  name: mnist\n  root: /nonexistent/x\n", "data.name=mnist: no MNIST training set under data.root="),
    ("data:\n  name: synthetic\n  num_images: 8\ntrain:\n  batch_size: 16\n", "train.batch_size = 16 x 1 rank(s)"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[str(b)[:40] for b, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, bad, message):
    run_dir = tmp_path / "run"
    if isinstance(bad, str):
        (tmp_path / "bad.yaml").write_text(bad)
        args = ["--config", str(tmp_path / "bad.yaml"), f"run.dir={run_dir}"]
    else:
        args = ["--config", "configs/smoke.yaml", f"run.dir={run_dir}", *bad]
    proc = run_train(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_missing_config_file_and_bad_flag(tmp_path):
    proc = run_train("--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "nope.yaml not found" in proc.stderr
    proc = run_train("--confg", "x.yaml")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_print_config(tmp_path):
    proc = run_train("--config", "configs/smoke.yaml", "--print-config", "train.steps=7")
    assert proc.returncode == 0
    assert yaml.safe_load(proc.stdout)["train"]["steps"] == 7
    assert Config().train.steps != 7
