"""dcgan-export's Hugging Face Hub folder: written and read by huggingface_hub's own PyTorchModelHubMixin and
ModelCard, the same samples as the checkpoint it came from, a model card whose metrics name their protocol, and a
crafted config.json refused before anything is allocated."""

import json
import pickle
import shutil
import time

import numpy as np
import pytest
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from conftest import REPO, assert_ok, random_inception, run_train
from dcgan_dist import sample_files
from dcgan_dist.errors import UserError
from dcgan_dist.gan import sampling
from dcgan_dist.hub import HubGenerator


def assert_one_line(proc, message):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


RUNS = {  # an unconditional smoke run with EMA, and a class-conditional one on MNIST's 5,000 digits
    "unconditional": ["model.ema.decay=0.9"],
    "conditional": ["data.name=mnist5k", "model.num_classes=10", "model.cond=concat"],
}


@pytest.fixture(scope="module", params=list(RUNS))
def trained(request, tmp_path_factory):
    run = tmp_path_factory.mktemp(request.param) / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=6", *RUNS[request.param]))
    return run


def npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_export_loads_with_from_pretrained_and_samples_like_the_checkpoint(trained, tmp_path, cli):
    out = tmp_path / "hub"
    assert_ok(cli("export_main", str(trained), str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    meta = json.loads((trained / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert json.loads((out / "config.json").read_text()) == meta["generator"]  # the generator's kwargs

    generator = HubGenerator.from_pretrained(out)  # huggingface_hub's own loader, from the local folder
    assert not generator.training and generator.num_classes == meta["generator"]["num_classes"]
    images, labels = sampling.draw(generator, 40, seed=5)
    sample_files.save_samples(images, tmp_path / "hub.npz", labels)
    assert_ok(cli("sample_main", str(trained), "--num", "40", "--seed", "5", "--out", str(tmp_path / "ckpt.npz")))
    assert_ok(cli("sample_main", str(out), "--num", "40", "--seed", "5", "--out", str(tmp_path / "folder.npz")))
    ckpt, hub, folder = (npz(tmp_path / f"{n}.npz") for n in ("ckpt", "hub", "folder"))
    assert ckpt.keys() == hub.keys() == folder.keys()
    for key in ckpt:  # byte for byte: arr_0, and the requested classes of a conditional model
        assert ckpt[key].tobytes() == hub[key].tobytes() == folder[key].tobytes()
    if generator.num_classes:
        assert ckpt["labels"].tolist() == [i % 10 for i in range(40)]
        for source, name in ((trained, "c3"), (out, "f3")):
            assert_ok(cli("sample_main", str(source), "--num", "8", "--class", "3", "--out",
                          str(tmp_path / f"{name}.npz")))
        assert npz(tmp_path / "c3.npz")["arr_0"].tobytes() == npz(tmp_path / "f3.npz")["arr_0"].tobytes()
        assert set(npz(tmp_path / "f3.npz")["labels"].tolist()) == {3}

    card = ModelCard.load(out / "README.md")  # the metadata parses with huggingface_hub's own card reader
    data = card.data.to_dict()
    assert data["library_name"] == "dcgan_dist" and {"dcgan", "pytorch_model_hub_mixin"} <= set(data["tags"])
    assert data["dcgan_dist"]["step"] == 6 and data["dcgan_dist"]["ema"] == (not generator.num_classes)
    assert ("class-conditional" in data["tags"]) == bool(generator.num_classes)
    assert "![samples](samples.png)" in card.text and "Not measured at export" in card.text

    proc = cli("export_main", str(trained), str(out))  # an export never writes over another
    assert_one_line(proc, "already exists and is not an empty directory")


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """TF-Inception with random weights (nothing downloaded): a real dcgan-eval report to put in a card."""
    path = tmp_path_factory.mktemp("fid") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in random_inception().state_dict().items()}, path)
    return path


@pytest.mark.slow
def test_model_card_holds_the_metrics_with_their_protocol(fid_weights, tmp_path, cli):
    run = tmp_path / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=6", "model.ema.decay=0.9"))
    report = tmp_path / "eval.json"
    assert_ok(cli("eval_main", str(run), "--num", "8", "--ref-num", "8", "--fid-weights", str(fid_weights),
                  "--json", str(report)))
    scored = json.loads(report.read_text())
    note = scored["protocol"]["inception"]["note"]
    assert note.startswith("run: 8 samples vs 8 synthetic training images at 32x32")

    out = tmp_path / "hub"
    assert_ok(cli("export_main", str(run), str(out), "--eval", str(report), "--name", "smoke-dcgan",
                  "--license", "mit"))
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.model_name == "smoke-dcgan"
    results = {r.metric_type: r for r in card.data.eval_results}  # the model-index, parsed back
    assert set(results) == {"fid", "kid"}
    assert results["fid"].metric_value == pytest.approx(scored["metrics"]["inception/fd"], rel=1e-5)
    assert results["fid"].metric_name == f"FID ({note})" and results["fid"].dataset_split == "train"
    assert results["fid"].task_type == "unconditional-image-generation"
    assert f"| FID | {scored['metrics']['inception/fd']:.4g} | {note} |" in card.text

    # the folder, scored against the same real images given as a file (--ref), gives the card's figure
    from dcgan_dist.data.sources import load_images

    np.save(tmp_path / "real.npy", load_images("synthetic", "data", 32, 1, num_images=8).numpy())  # NCHW
    assert_ok(cli("eval_main", str(out), "--num", "8", "--ref", str(tmp_path / "real.npy"), "--fid-weights",
                  str(fid_weights), "--json", str(tmp_path / "pair.json")))
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair["metrics"]["inception/fd"] == pytest.approx(results["fid"].metric_value, rel=1e-5)
    assert pair["protocol"]["inception"]["note"].startswith("pair: 8 images vs 8 images of ")

    # a report of another checkpoint is refused before anything is written
    (tmp_path / "other.json").write_text(json.dumps({**scored, "step": 3}))
    proc = cli("export_main", str(run), str(tmp_path / "hub2"), "--eval", str(tmp_path / "other.json"))
    assert_one_line(proc, "scored step 3 (EMA weights), but the export is step 6 (EMA weights)")
    (tmp_path / "bad.json").write_text("[1, 2]")
    proc = cli("export_main", str(run), str(tmp_path / "hub2"), "--eval", str(tmp_path / "bad.json"))
    assert_one_line(proc, "not a dcgan-eval --json report")
    assert not (tmp_path / "hub2").exists() and not list(tmp_path.glob(".hub2*"))


class _Planted:
    def __reduce__(self):
        return (open, (str(REPO / ".planted-pickle-ran"), "w"))


@pytest.fixture
def folder(tmp_path, cli):
    run = tmp_path / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=2"))
    assert_ok(cli("export_main", str(run), str(tmp_path / "hub")))
    return tmp_path / "hub"


def test_a_crafted_folder_is_refused_with_one_line_before_allocation(folder, tmp_path, cli):
    config = json.loads((folder / "config.json").read_text())
    edits = {
        "an absurd width": ({**config, "width": 10**9}, "width=1000000000, which no dcgan_dist model has"),
        "a large width": ({**config, "width": 12_500}, "does not match config.json's generator"),
        "a key no generator takes": ({**config, "depth": 3}, "is not the kwargs of a generator"),
        "a value of the wrong type": ({**config, "width": "8"}, "is not the kwargs of a generator"),
        "an image size no model has": ({**config, "image_size": 48}, "image_size=48"),
    }
    for what, (edited, message) in edits.items():
        crafted = tmp_path / what.replace(" ", "_")
        shutil.copytree(folder, crafted)
        (crafted / "config.json").write_text(json.dumps(edited))
        t0 = time.perf_counter()
        with pytest.raises(UserError, match=message):  # those widths need terabytes: nothing was built
            HubGenerator.from_pretrained(crafted)
        assert time.perf_counter() - t0 < 5, what
        proc = cli("sample_main", str(crafted), "--num", "4", "--out", str(tmp_path / "x.npz"))
        assert_one_line(proc, message)
        assert not (tmp_path / "x.npz").exists()

    (folder / "config.json").write_text("[1]")
    assert_one_line(cli("sample_main", str(folder), "--out", str(tmp_path / "x.npz")), "is not a JSON object")
    # no model.safetensors: a planted pickle beside the config is never read
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted()))
    with pytest.raises(UserError, match="has no model.safetensors"):
        HubGenerator.from_pretrained(folder)
    assert not (REPO / ".planted-pickle-ran").exists()


def test_a_lucic_fid_is_shown_beside_the_published_figures():
    from dcgan_dist import hub

    note = ("lucic: 10000 samples (centre 28x28 of 32x32) vs all 10000 mnist test images at 28x28, "
            "pt_inception-2015-12-05")
    report = {"num": 10000, "seed": 0, "metrics": {"inception/fd": 5.381, "inception/kid": 0.0021},
              "protocol": {"inception": {"protocol": "lucic", "reference": "mnist", "split": "test", "note": note}}}
    meta = {"step": 15625, "world_size": 1, "batch_size": 64, "config": {"data": {"name": "mnist"}},
            "generator": {"latent_dim": 100, "channels": 1, "image_size": 32, "width": 64}}
    fields = hub.card_fields(meta, True, "m", "other", [report])
    assert f"| FID | 5.381 | {note} |" in fields["quality"]
    assert "Lucic et al. 2018 (\"Are GANs Created Equal?\") report best FIDs on mnist of 6.7 (WGAN), 6.8 (NS GAN)" \
        in fields["quality"]
    assert fields["eval_results"][0]["dataset_split"] == "test" and fields["metadata"]["datasets"] == ["ylecun/mnist"]
