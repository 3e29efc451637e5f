"""Sample-quality metrics, the domain classifier, `dcgan-eval`, `dcgan-sample --interpolate`, 2-rank `evaluate`."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import conftest
from conftest import REPO, accelerate_launch, assert_ok, env, run_train
from dcgan_dist.data.sources import load_dataset
from dcgan_dist.errors import UserError
from dcgan_dist.gan import sampling
from dcgan_dist.quality import evaluation as E
from dcgan_dist.quality import metrics as M


def cli(main: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    code = f"from {conftest.command_module(main)} import {main}; {main}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO,
                          env=env(**extra_env), capture_output=True, text=True, timeout=300)


# --- the maths --------------------------------------------------------------------------------------


def random_features(n: int, d: int, seed: int, shift: float = 0.0, mix_seed: int = 0) -> torch.Tensor:
    """n samples of a Gaussian with a non-diagonal covariance fixed by `mix_seed`."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(mix_seed), dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ mix + shift


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook formula, float64: tr sqrt(S1 S2) from the (real, non-negative) eigenvalues of S1 S2."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def test_frechet_distance_is_zero_for_identical_sets():
    a = random_features(300, 16, 0)
    assert abs(M.frechet_distance(a, a)) < 1e-9
    assert abs(M.frechet_distance(a.float(), a.float())) < 1e-4  # float32 features are promoted to float64


@pytest.mark.parametrize("n,d", [(400, 8), (1000, 64), (50, 64)])  # (50, 64): singular covariances
def test_frechet_distance_matches_a_float64_reference(n, d):
    a, b = random_features(n, d, 1), random_features(n + 7, d, 2, shift=0.3, mix_seed=1)  # other covariance
    ours, ref = M.frechet_distance(a, b), reference_frechet(a.numpy(), b.numpy())
    assert ours == pytest.approx(ref, rel=1e-7, abs=1e-8)
    assert M.frechet_distance(b, a) == pytest.approx(ours, rel=1e-9)
    # equal covariances: only the squared mean difference remains
    assert M.frechet_distance(a, a + 0.5) == pytest.approx(0.25 * d, abs=1e-6)  # sqrt of ~0 eigenvalues: 1e-7


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    a, b = random_features(600, 16, 3), random_features(600, 16, 4)
    same, shifted = M.kid(a, b, subsets=20, subset_size=300), M.kid(a, b + 1.0, subsets=20, subset_size=300)
    assert abs(same) < 0.02 and shifted > 0.5


def test_class_histogram_coverage_and_kl():
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    assert M.coverage(uniform) == 10 and M.class_kl(uniform, uniform) == pytest.approx(0.0, abs=1e-12)
    one = torch.zeros(10, dtype=torch.float64)
    one[3] = 1
    assert M.coverage(one) == 1 and M.class_kl(one, uniform) == pytest.approx(np.log(10))
    # 2% is the coverage threshold: 0.019 is out, 0.02 is in
    hist = torch.tensor([0.019, 0.02] + [0.961 / 8] * 8, dtype=torch.float64)
    assert M.coverage(hist) == 9
    half = torch.tensor([0.5, 0.5] + [0.0] * 8, dtype=torch.float64)
    assert M.class_kl(half, uniform) == pytest.approx(np.log(5))  # sum 0.5 log(0.5 / 0.1)
    probs = torch.eye(10)[torch.tensor([0, 0, 1, 9])]
    assert M.class_histogram(probs, 10).tolist() == [0.5, 0.25] + [0.0] * 7 + [0.25]
    shares = M.class_metrics(torch.eye(10)[torch.tensor([0, 0, 0] + list(range(1, 10)) * 2)], uniform)
    assert shares["class_share_min"] == pytest.approx(2 / 21) and shares["class_share_max"] == pytest.approx(3 / 21)


def test_inception_score_and_confidence_on_constructed_predictions():
    confident_all_classes = torch.eye(10).repeat(5, 1)  # every class, one-hot
    assert M.inception_score(confident_all_classes) == pytest.approx(10, rel=1e-6)
    assert M.inception_score(torch.eye(10)[[4] * 50]) == pytest.approx(1, rel=1e-6)  # one class
    assert M.inception_score(torch.full((50, 10), 0.1)) == pytest.approx(1, rel=1e-6)  # no confidence
    assert M.mean_confidence(torch.tensor([[0.9, 0.1], [0.4, 0.6]])) == pytest.approx(0.75)


def test_precision_recall_on_constructed_point_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 2, generator=g)
    p, r = M.precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    p, r = M.precision_recall(real, torch.randn(500, 2, generator=g))  # same distribution
    assert p > 0.9 and r > 0.9
    collapsed = 0.05 * torch.randn(500, 2, generator=g)  # all fakes near the centre: precise, no recall
    p, r = M.precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.2
    p, r = M.precision_recall(real, torch.randn(500, 2, generator=g) + 20)  # far away: neither
    assert p == 0.0 and r == 0.0


def test_interpolation_is_a_great_circle_with_the_ends_included():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    path = sampling.interpolate_latents(a, b, 5)
    assert path.shape == (5, 64) and torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    assert path.norm(dim=1).min() > 0.9 * min(a.norm(), b.norm())  # no collapse towards 0 in the middle


def test_split_is_fixed_and_stratified():
    _, labels = load_dataset("mnist5k", "unused", 28, 1)  # the labels come from the data layer
    assert labels.shape == (5000,) and torch.bincount(labels).tolist() == [500] * 10
    train, test = E.split_indices(labels)
    assert len(test) == 1000 and torch.bincount(labels[test]).tolist() == [100] * 10
    assert not set(train.tolist()) & set(test.tolist()) and len(train) + len(test) == 5000
    assert torch.equal(test, E.split_indices(labels)[1])


# --- the classifier and the commands -----------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """The default classifier for mnist5k at 32x32, trained once through the real command."""
    cache = tmp_path_factory.mktemp("cache")
    proc = cli("eval_main", "train-classifier", "--data", "mnist5k", "--image-size", "32", "--cache-dir", str(cache))
    assert_ok(proc)
    path = cache / "classifier-mnist5k-32.safetensors"
    assert "held-out accuracy" in proc.stdout and path.is_file() and path.with_suffix(".json").is_file()
    return path


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A tiny mnist5k GAN (smoke-sized networks), with EMA so both generators exist."""
    run = tmp_path_factory.mktemp("mnist") / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "data.name=mnist5k", "model.channels=0",
                        "train.steps=20", "model.ema.decay=0.9"))
    return run


def test_classifier_reaches_97_percent_on_held_out_mnist5k(classifier):
    model, meta = E.load_classifier(classifier)
    assert meta["accuracy"] >= 0.97, meta
    assert meta["num_heldout"] == 1000 and meta["data"] == "mnist5k" and meta["image_size"] == 32
    # the real images score as a good sample should: all classes, confident, near the data histogram
    images, labels = E.labelled_data("mnist5k", "data", 32)
    space = E.classifier_space(model, meta, images, labels)
    real = space.real_metrics()
    assert real["coverage"] == 10 and real["confidence"] > 0.9 and real["class_kl"] < 0.01
    assert real["inception_score"] > 8.5
    train, _ = E.split_indices(labels)
    other = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:1000]]
    held_out = space.metrics(*E.classifier_outputs(model, images[other]))  # real images as a "generator"
    assert held_out["fd"] < 3 * held_out["fd_floor"] and held_out["coverage"] == 10


def test_eval_command_on_a_tiny_mnist5k_run(tmp_path, classifier, mnist_run):
    out = tmp_path / "m.json"
    proc = cli("eval_main", str(mnist_run), "--num", "600", "--cache-dir", str(classifier.parent), "--json", str(out),
               TORCH_HOME=str(tmp_path / "torch"))
    assert_ok(proc)
    assert "EMA generator" in proc.stdout and "Fréchet distance" in proc.stdout and "class coverage" in proc.stdout
    assert "smallest class share" in proc.stdout and "largest class share" in proc.stdout
    assert "FID/KID skipped: no TF-Inception weights (pt_inception-2015-12-05)" in proc.stdout
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["ema"] is True and report["num"] == 600 and report["data"] == "mnist5k"
    for key in ("fd", "fd_floor", "kid", "precision", "recall", "inception_score", "coverage", "confidence",
                "class_kl", "class_share_min", "class_share_max"):
        assert np.isfinite(m[f"classifier/{key}"]), key
    assert 0 <= m["classifier/class_share_min"] <= 0.1 <= m["classifier/class_share_max"] <= 1
    assert 0 <= m["classifier/coverage"] <= 10 and 1 <= m["classifier/inception_score"] <= 10
    assert m["classifier/fd"] > m["classifier/fd_floor"] > 0  # 20 steps of training is far from the data
    assert report["real"]["classifier/coverage"] == 10
    raw = cli("eval_main", str(mnist_run), "--num", "600", "--cache-dir", str(classifier.parent), "--no-ema",
              "--json", str(tmp_path / "raw.json"), TORCH_HOME=str(tmp_path / "torch"))
    assert_ok(raw)
    assert "raw generator" in raw.stdout
    assert json.loads((tmp_path / "raw.json").read_text())["metrics"] != m


def test_eval_scores_a_samples_file_as_it_scores_the_generator(tmp_path, classifier, mnist_run):
    """dcgan-sample's npz of the same noise, scored as any generator's samples, gives the checkpoint's figures."""
    npz = tmp_path / "s.npz"
    assert_ok(cli("sample_main", str(mnist_run), "--num", "300", "--seed", "4", "--out", str(npz)))
    common = ["--cache-dir", str(classifier.parent), "--data", "mnist5k"]
    proc = cli("eval_main", str(npz), *common, "--json", str(tmp_path / "npz.json"), TORCH_HOME=str(tmp_path / "t"))
    assert_ok(proc)
    assert "(samples file), 300 samples, data mnist5k" in proc.stdout
    from_file = json.loads((tmp_path / "npz.json").read_text())
    assert_ok(cli("eval_main", str(mnist_run), "--num", "300", "--seed", "4", *common, "--json",
                  str(tmp_path / "ckpt.json"), TORCH_HOME=str(tmp_path / "t")))
    from_ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    assert from_file["metrics"].keys() == from_ckpt["metrics"].keys()
    for key, value in from_ckpt["metrics"].items():
        assert from_file["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def run_main(main, args, capsys) -> tuple[int, str, str]:
    """A command in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    proc = conftest.run_main(capsys, main, *map(str, args))
    return proc.returncode, proc.stdout, proc.stderr


def test_eval_command_on_unlabelled_data_names_the_metrics_that_need_labels(tmp_path, smoke_args, capsys,
                                                                            monkeypatch):
    assert_ok(run_train(*smoke_args, "train.steps=2"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there
    code, out, err = run_main("eval_main", [str(tmp_path / "run"), "--num", "64"], capsys)
    assert code == 2 and out == ""
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: nothing to measure for data synthetic")
    assert "need a labelled dataset (mnist5k, mnist, fashion_mnist, cifar10)" in err and "coverage" in err
    assert "FID/KID skipped: no TF-Inception weights" in err


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/run"], "is not a checkpoint"),
    (["{run}", "--num", "0"], "--num 0"),
    (["{run}", "--classifier", "/nonexistent/c.safetensors"], "dcgan-eval train-classifier"),
    (["{run}", "--fid-weights", "/nonexistent/w.safetensors"], "does not exist"),
    (["{run}", "--fid-standard", "--num", "100"], "--protocol standard fixes --num at 50000"),
    (["{run}", "--protocol", "lucic", "--num", "100"], "--protocol lucic fixes --num at 10000"),
    (["{run}", "--protocol", "lucic"], "FID protocol lucic scores against the test split at its own size: mnist5k"),
    (["{run}", "--ref", "/nonexistent/b.npz"], "/nonexistent/b.npz: no such file or folder"),
    (["{run}", "--ref-num", "1"], "--ref-num 1"),
    (["{run}", "--bogus"], "unrecognized arguments"),
    (["train-classifier", "--data", "synthetic"], "has no labels"),
])
def test_eval_command_bad_input_is_one_line_and_exit_2(mnist_run, capsys, args, message):
    code, _, err = run_main("eval_main", [a.format(run=mnist_run) for a in args], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_sample_interpolation_strip_is_reproducible(tmp_path, mnist_run, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        code, stdout, err = run_main("sample_main", [str(mnist_run), "--interpolate", "3", "7", "--steps", "6",
                                                     "--out", str(out)], capsys)
        assert code == 0 and "6-image interpolation from seed 3 to 7" in stdout, err
    assert a.read_bytes() == b.read_bytes()
    from PIL import Image

    assert Image.open(a).size == (6 * 34 + 2, 36)  # one row of 6 images of 32 px, 2 px padding around each
    code, _, err = run_main("sample_main", [str(mnist_run), "--interpolate", "3", "7", "--out",
                                            str(tmp_path / "x.npz")], capsys)
    assert code == 2 and "--interpolate writes a strip" in err


@pytest.mark.slow
def test_two_rank_evaluate_equals_one_process(tmp_path, classifier, mnist_run):
    num, seed = 301, 5  # odd: the last rank's share is padded and the padding dropped
    proc = accelerate_launch(2, "tests/dist/eval_worker.py", str(mnist_run), str(classifier), str(num), str(seed),
                             str(tmp_path / "two.json"))
    assert_ok(proc)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2
    from dcgan_dist.checkpoint import load_generator

    generator, _, _ = load_generator(str(mnist_run))
    model, meta = E.load_classifier(classifier)
    space = E.classifier_space(model, meta, *E.labelled_data("mnist5k", "data", 32))
    one = E.evaluate(generator, num, [space], seed=seed, batch_size=16)  # as the worker
    assert two["metrics"].keys() == one.keys()
    for key, value in one.items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_eval_during_two_rank_training_equals_one_process_and_keeps_the_best(tmp_path, classifier):
    cache = tmp_path / "cache"  # the module's classifier, where the trainer looks for it
    cache.mkdir()
    for p in (classifier, classifier.with_suffix(".json")):
        shutil.copy(p, cache / p.name)
    run = tmp_path / "run"
    proc = accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
                             "data.name=mnist5k", "model.channels=0", f"data.cache_dir={cache}", "train.steps=12",
                             "train.checkpoint_every=4", "train.keep_last=5", "model.ema.decay=0.9",
                             "train.eval_every=4", "train.eval_num=101", "train.keep_best=classifier/fd")
    assert_ok(proc)
    assert proc.stdout.count("eval at step") == 3  # printed once (rank 0), at steps 4, 8, 12
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/classifier/fd" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    # the values equal one process evaluating the same (EMA) generator on the same noise
    from dcgan_dist.checkpoint import load_generator

    model, meta = E.load_classifier(classifier)
    space = E.classifier_space(model, meta, *E.labelled_data("mnist5k", "data", 32))
    for record in evals:
        generator, _, _ = load_generator(str(run / "checkpoints" / f"step-{record['step']:08d}"))
        one = E.evaluate(generator, 101, [space], seed=0)
        for key, value in one.items():
            assert record[f"eval/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # checkpoints/best holds the step with the lowest classifier FD, and says so
    best = min(evals, key=lambda r: r["eval/classifier/fd"])
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["step"] == best["step"] and meta["best"]["value"] == pytest.approx(best["eval/classifier/fd"])
    assert (run / "checkpoints" / "best" / "generator_ema.safetensors").read_bytes() == \
        (run / "checkpoints" / f"step-{best['step']:08d}" / "generator_ema.safetensors").read_bytes()


# --- class-conditional models: requested-class accuracy ----------------------------------------------------


class RealDigits(torch.nn.Module):
    """A stand-in conditional generator that draws real held-out digits of class (y + shift) mod 10."""

    def __init__(self, images, labels, shift=0, num_classes=10):
        super().__init__()
        self.latent_dim, self.num_classes, self.channels, self.image_size = 4, num_classes, 1, 32
        self.by_class = [images[labels == c].float() / 127.5 - 1 for c in range(10)]
        self.shift, self.unused = shift, torch.nn.Parameter(torch.zeros(()))  # generate() asks for the device

    def forward(self, z, y):
        pick = (z[:, 0].abs() * 1e4).long()  # a pseudo-random image of the class, fixed by z
        return torch.stack([self.by_class[(c + self.shift) % 10][i % len(self.by_class[(c + self.shift) % 10])]
                            for c, i in zip(y.tolist(), pick.tolist())])


def test_requested_class_accuracy_is_the_share_classified_as_asked(classifier):
    model, meta = E.load_classifier(classifier)
    images, labels = E.labelled_data("mnist5k", "data", 32)
    space = E.classifier_space(model, meta, images, labels)
    _, held_out = E.split_indices(labels)
    right = E.evaluate(RealDigits(images[held_out], labels[held_out]), 500, [space])
    wrong = E.evaluate(RealDigits(images[held_out], labels[held_out], shift=1), 500, [space])
    assert right["classifier/class_accuracy"] >= 0.95 and wrong["classifier/class_accuracy"] <= 0.05
    assert right["classifier/coverage"] == 10 and right["classifier/class_kl"] < 0.01  # asked uniformly
    with pytest.raises(UserError, match="the generator has 5 classes but the classifier space's data has 10"):
        E.evaluate(RealDigits(images[held_out], labels[held_out], num_classes=5), 50, [space])


def test_conditional_eval_during_training_and_the_eval_command_report_it(tmp_path, classifier):
    run = tmp_path / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "data.name=mnist5k",
                        "data.num_images=null", "model.num_classes=10", f"data.cache_dir={classifier.parent}",
                        "train.steps=4", "train.eval_every=4", "train.eval_num=64"))
    record = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/seconds" in r][0]
    assert 0 <= record["eval/classifier/class_accuracy"] <= 1
    proc = cli("eval_main", str(run), "--num", "64", "--cache-dir", str(classifier.parent), "--json",
               str(tmp_path / "m.json"), TORCH_HOME=str(tmp_path / "torch"))
    assert_ok(proc)
    assert "requested class" in proc.stdout
    # the same generator, noise and labels: the same value as during training
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["classifier/class_accuracy"] == pytest.approx(record["eval/classifier/class_accuracy"])


# --- dcgan-eval from Python ------------------------------------------------------------------------------------


def test_assess_plan_picks_the_references_dcgan_eval_does(tmp_path, classifier, mnist_run, capsys, monkeypatch):
    """`assess.plan`, called from Python with the command's defaults, compares with what `dcgan-eval` does: the same
    dataset, sample count, spaces and real references, the same notes, and (run) the same figures and table."""
    from dcgan_dist.quality import assess

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights: the classifier space alone
    code, out, err = run_main("eval_main", [str(mnist_run), "--num", "64", "--cache-dir", str(classifier.parent),
                                            "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    command = json.loads((tmp_path / "m.json").read_text())
    plan = assess.plan(str(mnist_run), num=64, cache_dir=str(classifier.parent))
    assert (plan.data, plan.num, plan.seed, plan.step, plan.ema) == ("mnist5k", 64, 0, 20, True)
    assert [s.name for s in plan.spaces] == ["classifier"] and plan.generator is not None and plan.images is None
    assert json.loads(json.dumps(plan.references())) == command["spaces"]
    assert plan.references()["classifier"]["path"] == str(classifier)
    assert plan.notes == command["notes"] and any("FID/KID skipped" in n for n in plan.notes)
    report = plan.run()
    assert json.loads(json.dumps(report.to_json())) == command
    assert "\n".join(report.lines()) + f"\nwrote {tmp_path / 'm.json'}\n" == out
    with pytest.raises(UserError, match="--protocol standard fixes --num at 50000"):
        assess.plan(str(mnist_run), num=64, fid_standard=True)
