import contextlib
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_train
from dcgan_dist.config import Config, check_data, validate_world
from dcgan_dist.errors import UserError
from dcgan_dist.recipe import load_config
from dcgan_dist.train import devices


def test_defaults_and_typed_overrides():
    cfg = load_config(None, ["train.steps=200", "optim.lr_g=1e-3", "model.sync_bn=true", "run.name=123",
                             "data.num_images=null", "model.ema.decay=0.99"])
    assert cfg.train.steps == 200 and cfg.optim.lr_g == 1e-3 and cfg.model.sync_bn is True
    assert cfg.run.name == "123" and cfg.data.num_images is None and cfg.model.ema.decay == 0.99
    assert cfg.run_dir == Path("runs/123")
    assert isinstance(load_config(None, ["optim.lr_d=1"]).optim.lr_d, float)  # an int is a fine float


def test_every_recipe_loads(tmp_path):
    from dcgan_dist.data.prepare import PrepareOptions, prepare_store
    from dcgan_dist.data.sources import facts

    store = tmp_path / "store"  # for the recipes that train from a prepared store
    prepare_store("synthetic", store, 64, 3, PrepareOptions(progress=False, log=lambda *_: None))
    for path in sorted(Path("configs").glob("*.yaml")):
        if yaml.safe_load(path.read_text())["data"]["name"] == "store":
            for root, error in ((tmp_path / "missing", r"is not a prepared store .* dcgan-prepare SOURCE --size S "
                                 "--out"), (store, None)):
                cfg = load_config(str(path), [f"data.root={root}"])
                with pytest.raises(UserError, match=error) if error else contextlib.nullcontext():
                    check_data(cfg, facts(cfg.data, cfg.model))
        else:
            load_config(str(path))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["train.steps=3", "loss.name=hinge"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_global_batch_is_split_over_ranks():
    cfg = load_config(None, ["train.global_batch_size=256"])
    assert validate_world(cfg, 4).train.batch_size == 64
    with pytest.raises(UserError, match=r"train.global_batch_size = 256 .* divisible by the world size 3"):
        validate_world(cfg, 3)
    with pytest.raises(UserError, match="train.mixed_precision = 'fp16'.*fp16 needs CUDA.*bf16"):
        validate_world(load_config(None, ["train.mixed_precision=fp16"]), 1, device="cpu")


def test_cuda_graphs_are_refused_where_a_captured_step_cannot_run():
    """train.cuda_graphs: one CUDA process, fp32 or bf16, eager kernels, no sync BN; else one line each."""
    graphs = load_config(None, ["train.cuda_graphs=true", "train.mixed_precision=bf16"])
    assert validate_world(graphs, 1, "cuda", True).train.cuda_graphs
    cases = [(["train.mixed_precision=fp16"], "gradient scaler reads its overflow flag on the host"),
             (["train.compile=true"], "choose one of train.compile and train.cuda_graphs"),
             (["model.sync_bn=true"], "set model.sync_bn=false")]
    for extra, message in cases:
        with pytest.raises(UserError, match=f"train.cuda_graphs = True is not accepted; .*{message}"):
            load_config(None, ["train.cuda_graphs=true", *extra])
    with pytest.raises(UserError, match="CUDA graphs need a CUDA GPU and this process trains on cpu"):
        validate_world(graphs, 1, "cpu")
    with pytest.raises(UserError, match="this job has 2 processes .*launch one process"):
        validate_world(graphs, 2, "cuda", True)


def test_auto_precision_is_bf16_only_where_the_hardware_has_it():
    auto = load_config(None, ["train.mixed_precision=auto"])
    has = torch.cpu._is_amx_tile_supported()  # AVX512-BF16 alone runs these models slower in bf16 than in fp32
    assert devices.native_bf16("cpu") == has and not devices.native_bf16("mps")
    for device, bf16 in (("cpu", has), ("cuda", True), ("cuda", False), ("xpu", True), ("mps", False)):
        cfg = validate_world(auto, 1, device, bf16)
        assert cfg.train.mixed_precision == ("bf16" if bf16 else "no"), (device, bf16)


def test_device_choice_follows_what_is_present(monkeypatch):
    """The decision logic, with the probes patched (no GPU, XPU or Mac here)."""
    present = {"cuda": False, "xpu": False, "mps": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present["cuda"])
    monkeypatch.setattr(torch.xpu, "is_available", lambda: present["xpu"])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: present["mps"])
    assert devices.accelerator_type() == "cpu"
    for name, expected in (("mps", "mps"), ("xpu", "xpu"), ("cuda", "cuda")):  # CUDA first, then XPU, then MPS
        present[name] = True
        assert devices.accelerator_type() == expected
    assert all(devices.fused_adam(d) for d in ("cpu", "cuda", "xpu", "mps"))


def test_mps_runs_one_process_and_says_so():
    cfg = load_config(None, [])
    assert validate_world(cfg, 1, "mps").train.batch_size == cfg.train.batch_size
    with pytest.raises(UserError, match="2 processes on Apple MPS, which has no distributed backend.*--num_proc"):
        validate_world(cfg, 2, "mps")


# Bad configs, overrides and flags: tests/faults/test_bad_input.py (the bad-input matrix).


def test_print_config(tmp_path):
    proc = run_train("--config", "configs/smoke.yaml", "--print-config", "train.steps=7")
    assert proc.returncode == 0
    assert yaml.safe_load(proc.stdout)["train"]["steps"] == 7
    assert Config().train.steps != 7
