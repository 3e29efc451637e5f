"""The standard FID: pytorch-fid's TF-Inception built without its download, weights read without unpickling code,
`dcgan-eval` on a samples npz, cached reference statistics, and the peer test against pytorch-fid itself.

Every network here carries randomly initialised weights written by the test (in the layout pytorch-fid loads):
nothing is downloaded. One Inception forward at 299x299 is ~6 GFLOPs (~0.3-0.5 s per image on a shared 2-core
CPU), so image sets are small; the tests that run Inception on more than a few images are marked slow.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import conftest
from conftest import accelerate_launch, assert_ok, random_inception
from dcgan_dist.data.sources import load_images
from dcgan_dist.errors import UserError
from dcgan_dist.quality import evaluation as E
from dcgan_dist.quality import fid
from dcgan_dist.quality import metrics as M


def run_main(main, args, capsys) -> tuple[int, str, str]:
    """A command in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    proc = conftest.run_main(capsys, main, *map(str, args))
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds randomly initialised weights under the exact name pytorch-fid loads
    (`hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`, a plain state dict as torch.save writes it), so
    pytorch-fid's own `InceptionV3()` finds them there and downloads nothing (`conftest.random_inception`)."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(random_inception().state_dict(), home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE)
    return home


@pytest.fixture
def weights(torch_home, monkeypatch):
    """The random weights file, with TORCH_HOME pointing at its hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE


# --- weights ----------------------------------------------------------------------------------------


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_weights_loader_refuses_pickles_that_are_not_plain_state_dicts(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCode(tmp_path / "pwned")}, evil)
    with pytest.raises(UserError, match="not a plain state dict of tensors"):
        fid.load_weights(evil)
    assert not (tmp_path / "pwned").exists()  # weights_only: the pickled call never ran
    torch.save([torch.zeros(1)], tmp_path / "list.pth")  # loadable with weights_only, but no state dict
    with pytest.raises(UserError, match="not a plain state dict"):
        fid.load_weights(tmp_path / "list.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="junk.safetensors: not a plain state dict"):
        fid.load_weights(tmp_path / "junk.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")  # a state dict, of another network
    with pytest.raises(UserError, match="not the pt_inception-2015-12-05 Inception weights"):
        fid.build_fid_inception(tmp_path / "other.pth")


def test_missing_weights_offline_is_one_line_saying_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")  # refused: offline
    with pytest.raises(UserError, match=r"the download failed .*--fid-weights PATH"):
        fid.find_weights(None)
    assert not list((tmp_path / "empty" / "hub" / "checkpoints").iterdir())  # no partial file left behind
    with pytest.raises(UserError, match=f"no {fid.FID_WEIGHTS_FILE} in"):
        fid.find_weights(None, download=False)
    np.savez(tmp_path / "s.npz", np.zeros((8, 32, 32, 1), np.uint8))
    code, out, err = run_main("eval_main", [str(tmp_path / "s.npz"), "--data", "mnist5k", "--fid"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "TF-Inception weights" in err and "127.0.0.1:9" in err and "convert-fid-weights" in err
    code, _, err = run_main("eval_main", [str(tmp_path / "s.npz"), "--data", "mnist5k", "--fid-weights",
                                          str(tmp_path / "nope.pth")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope.pth does not exist" in err, err


def test_convert_to_safetensors_gives_the_same_network(weights, tmp_path, capsys):
    out = tmp_path / "fid.safetensors"
    code, stdout, err = run_main("eval_main", ["convert-fid-weights", str(weights), str(out)], capsys)
    assert code == 0 and f"wrote {out} (sha256 " in stdout, err
    pth_state, st_state = torch.load(weights, weights_only=True), load_file(out)
    assert pth_state.keys() == st_state.keys() and all(torch.equal(pth_state[k], st_state[k]) for k in pth_state)
    net, info = fid.build_fid_inception(out)
    assert info["weights"] == "pt_inception-2015-12-05" and info["path"] == str(out)
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    feats = fid.fid_features(net, gray)  # grayscale -> RGB, 28 -> 299
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.std() > 0
    assert torch.allclose(feats, fid.fid_features(net, gray.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-6)
    code, _, err = run_main("eval_main", ["convert-fid-weights", str(weights), str(tmp_path / "x.bin")], capsys)
    assert code == 2 and "must end in .safetensors" in err


def test_fid_statistics_that_fid_stats_computed_ahead_are_read(weights, tmp_path, capsys):
    spaces, notes = E.feature_spaces("synthetic", "data", tmp_path, image_size=32, channels=3, num_images=4,
                                     compute_missing=False)  # read only
    assert spaces == [] and not (tmp_path / "fid-stats").exists()
    (note,) = [n for n in notes if "fid-stats" in n]
    command = note.split("compute them once with dcgan-eval ")[1].split()
    assert command == ["fid-stats", "--data", "synthetic", "--data-root", "data", "--image-size", "32", "--channels",
                       "3", "--num-images", "4", "--cache-dir", str(tmp_path)]
    code, out, err = run_main("eval_main", command, capsys)  # the command the note names
    assert code == 0 and "FID statistics of 4 synthetic images at 32x32 (pt_inception-2015-12-05)" in out, err
    spaces, notes = E.feature_spaces("synthetic", "data", tmp_path, image_size=32, channels=3, num_images=4,
                                     compute_missing=False)
    (space,) = spaces
    assert space.name == "inception" and space.mu.shape == (2048,) and space.info["protocol"]["reference_count"] == 4
    assert E.protocol_note(space, 1000) == ("run: 1000 samples vs 4 synthetic training images at 32x32, "
                                            "pt_inception-2015-12-05")


def test_a_conditional_generator_is_scored_in_the_fid_space(weights, tmp_path, capsys):
    """A class-conditional model evaluated with FID (dcgan-eval, train.eval_every): the class check reads only
    spaces with class shares, and FidSpace has none (it raised AttributeError before)."""
    from dcgan_dist.gan.models import Generator

    assert run_main("eval_main", ["fid-stats", "--data", "synthetic", "--image-size", "32", "--channels", "3",
                                  "--num-images", "4", "--cache-dir", str(tmp_path)], capsys)[0] == 0
    (space,), _ = E.feature_spaces("synthetic", "data", tmp_path, image_size=32, channels=3, num_images=4,
                                   compute_missing=False)
    generator = Generator(latent_dim=8, channels=3, image_size=32, width=4, num_classes=2)
    scores = E.evaluate(generator, 4, [space], seed=0)
    assert set(scores) == {"inception/fd", "inception/kid"} and all(np.isfinite(list(scores.values())))


# --- samples files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arrays,message", [
    ({"images": np.zeros((8, 32, 32, 1), np.uint8), "labels": np.zeros(8)}, "no arr_0 array (it holds images, "),
    ({"arr_0": np.zeros((8, 32, 32, 1), np.float32)}, "are float32 [8, 32, 32, 1]; expected uint8 [N, H, W]"),
    ({"arr_0": np.zeros((8, 2, 32, 32), np.uint8)}, "the images are uint8 [8, 2, 32, 32]"),  # 2 channels
    ({"arr_0": np.zeros((8, 32), np.uint8)}, "the images are uint8 [8, 32]"),
    ({"arr_0": np.zeros((8, 32, 32, 3), np.uint8)}, "its images have 3 channel(s) but mnist5k images have 1"),
    ({"arr_0": np.zeros((8, 32, 28), np.uint8)}, "its images are 28x32; scoring against a dataset needs square"),
    ({"arr_0": np.zeros((3, 32, 32, 1), np.uint8)}, "holds 3 image(s); score at least 8"),
    (None, "not a readable .npz"),
])
def test_bad_samples_file_is_one_line_and_exit_2(tmp_path, capsys, arrays, message):
    path = tmp_path / "s.npz"
    if arrays is None:
        path.write_text("not a zip")
    else:
        np.savez(path, **arrays)
    code, out, err = run_main("eval_main", [str(path), "--data", "mnist5k"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_image_sets_in_every_layout_and_folders_read_the_same(tmp_path):
    """Grey [N, H, W], [N, H, W, C] and [N, C, H, W] in .npz (arr_0 or its only array) and .npy, and a folder of
    PNG files (grey; mixed grey and colour as RGB) -> the same uint8 [N, C, H, W]."""
    from dcgan_dist.quality.image_sets import is_image_set, read_image_set

    grey = torch.randint(0, 256, (5, 1, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    nhw = grey[:, 0].numpy()
    np.save(tmp_path / "nhw.npy", nhw)
    np.savez(tmp_path / "nhwc.npz", nhw[..., None])
    np.savez(tmp_path / "nchw.npz", images=nhw[:, None])  # one array, not named arr_0
    np.savez(tmp_path / "labelled.npz", nhw, labels=np.arange(5))  # dcgan-sample's: arr_0 and labels
    _write_pngs(grey, tmp_path / "pngs")
    for name in ("nhw.npy", "nhwc.npz", "nchw.npz", "labelled.npz", "pngs"):
        assert is_image_set(str(tmp_path / name)), name
        assert torch.equal(read_image_set(tmp_path / name), grey), name
    colour = torch.randint(0, 256, (2, 3, 12, 10), dtype=torch.uint8)
    (tmp_path / "pngs" / "sub").mkdir()
    _write_pngs(colour, tmp_path / "pngs" / "sub" / "c")  # any depth, sorted by path: after 0000..0004.png
    mixed = read_image_set(tmp_path / "pngs")
    assert torch.equal(mixed, torch.cat([grey.expand(-1, 3, -1, -1), colour]))
    np.save(tmp_path / "nhwc3.npy", colour.permute(0, 2, 3, 1).numpy())
    assert torch.equal(read_image_set(tmp_path / "nhwc3.npy"), colour)


@pytest.mark.parametrize("make,message", [
    (lambda d: d.mkdir(), "holds no PNG/JPG/JPEG images"),
    (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"not a png")), "cannot decode image"),
    (lambda d: (_write_pngs(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), d),
                Image.new("L", (9, 8)).save(d / "b.png")), "is 9x8 but"),
    (lambda d: np.save(d.with_suffix(".npy"), np.zeros((8, 4, 4, 4), np.float64)), "float64 [8, 4, 4, 4]"),
])
def test_bad_image_sets_are_one_line_naming_file_shape_and_dtype(tmp_path, capsys, make, message):
    make(tmp_path / "set")
    arg = tmp_path / "set.npy" if (tmp_path / "set.npy").exists() else tmp_path / "set"
    np.savez(tmp_path / "ok.npz", np.zeros((8, 8, 8), np.uint8))
    empty = not any(arg.iterdir()) if arg.is_dir() else False  # as the scored side: no images, so not a set
    for args, says in (([str(arg), "--data", "mnist5k"], "is not a checkpoint" if empty else message),
                       ([str(tmp_path / "ok.npz"), "--ref", str(arg)], message)):
        code, out, err = run_main("eval_main", args, capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and says in err, err
        assert str(arg) in err


def test_samples_file_needs_a_dataset(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((8, 32, 32, 1), np.uint8))
    code, _, err = run_main("eval_main", [str(tmp_path / "s.npz")], capsys)
    assert code == 2 and "pass --data" in err


# --- the peer test --------------------------------------------------------------------------------------


def _write_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir()
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(folder / f"{i:04d}.png")


@pytest.mark.slow
def test_fid_equals_pytorch_fid_on_the_same_images(weights, tmp_path, capsys):
    """pytorch-fid's own code (its InceptionV3, loading the test's random weights from the torch hub cache, its
    PNG reader and `get_activations`, its scipy-sqrtm `calculate_frechet_distance`: what `calculate_fid_given_paths`
    runs) and `dcgan-eval SAMPLES.npz` (reference statistics computed, cached, then read back) agree on two sets.

    Design: Inception costs ~0.3-0.5 s per image here, so the sets hold n = 16 images (about 100 forwards in all).
    With n < 2048 both covariances are rank-deficient (rank 15); the FID is still well defined (the eigenvalues of
    S1 S2 are real and non-negative) and was measured to agree between scipy's sqrtm and the project's two
    symmetric eigendecompositions to ~1e-7 relative for 20 to 1,000 samples in 2048-d (and 5e-15 at 2,500), and
    to 5e-7 on these two sets, so the 1e-4 comparison is meaningful. The generated set is n other shapes of the
    same kind with pixel noise, so the covariances overlap and the cross term 2 tr (S1 S2)^1/2 exceeds the FID
    itself (checked): the figure is a cancellation, which is where two sqrtm methods would part. (Two unrelated
    rank-15 sets have nearly orthogonal covariances: the cross term is then ~10% of the figure and tests little.)
    The features are compared to 1e-5 first. `test_frechet_maths_equals_pytorch_fid_at_full_rank` covers full
    rank on the maths alone: the same comparison through Inception at full rank needs > 2 x 2,048 images per
    pipeline (over an hour on this 2-core CPU; seconds on a GPU).
    """
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations
    from pytorch_fid.inception import InceptionV3

    n = 16
    real = load_images("synthetic", "data", 32, 3, num_images=n)  # the reference: the dataset as dcgan-eval loads it
    other = load_images("synthetic", "data", 32, 3, num_images=2 * n)[n:]  # n other shapes of the same kind
    assert torch.equal(load_images("synthetic", "data", 32, 3, num_images=2 * n)[:n], real)
    noise = torch.randint(-40, 41, other.shape, generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    fake = (other.int() + noise).clamp(0, 255).to(torch.uint8)  # close to the real images, not the same
    _write_pngs(real, tmp_path / "real")
    _write_pngs(fake, tmp_path / "fake")
    np.savez(tmp_path / "fake.npz", fake.permute(0, 2, 3, 1).numpy())

    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # loads hub/checkpoints/<file>: no network
    acts = {name: get_activations(sorted((tmp_path / name).glob("*.png")), model, batch_size=n, dims=2048,
                                  device="cpu", num_workers=0) for name in ("fake", "real")}
    ref_stats = [(a.mean(0), np.cov(a, rowvar=False)) for a in (acts["fake"], acts["real"])]
    theirs = float(calculate_frechet_distance(*ref_stats[0], *ref_stats[1]))

    net, _ = fid.build_fid_inception(weights)
    for name, images in (("fake", fake), ("real", real)):
        ours = fid.fid_features(net, images).double().numpy()
        assert np.allclose(ours, acts[name], rtol=1e-5, atol=1e-5 * np.abs(acts[name]).max()), name
    mu1, s1, mu2, s2 = (torch.from_numpy(v) for pair in ref_stats for v in pair)
    tr_sqrt = (s1.trace() + s2.trace() + (mu1 - mu2).square().sum() - theirs) / 2
    assert 2 * tr_sqrt > theirs > 0.1  # the cross term outweighs the figure: a cancellation, tested to 1e-4

    cache = tmp_path / "cache"
    args = [str(tmp_path / "fake.npz"), "--data", "synthetic", "--ref-num", str(n), "--cache-dir", str(cache)]
    code, out, err = run_main("eval_main", [*args, "--json", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    ours = json.loads((tmp_path / "a.json").read_text())
    assert ours["metrics"]["inception/fd"] == pytest.approx(theirs, rel=1e-4)
    assert f"FID reference: Inception features of {n} synthetic train images" in out  # computed once ...
    note = f"[run: {n} samples vs {n} synthetic training images at 32x32, pt_inception-2015-12-05]"
    assert out.count(note) == 2, out  # beside FID and beside KID
    assert ours["protocol"]["inception"]["reference_count"] == n and ours["protocol"]["inception"]["num_samples"] == n
    (stats_file,) = (cache / "fid-stats").glob("*.safetensors")  # beside its lock file
    stored = load_file(stats_file)
    assert stored["mu"].dtype == stored["sigma"].dtype == torch.float64 and stored["sigma"].shape == (2048, 2048)
    assert np.allclose(stored["mu"].numpy(), ref_stats[1][0], rtol=1e-5, atol=1e-6)
    code, out, err = run_main("eval_main", [*args, "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "FID reference" not in out, err  # ... and read back
    assert json.loads((tmp_path / "b.json").read_text())["metrics"] == ours["metrics"]

    # any two sets, as pytorch-fid's two-path command: the same figure with the real set given as an .npz (NHWC),
    # an .npy (NCHW), and with both sets given as the very folders pytorch-fid read
    np.savez(tmp_path / "real.npz", real.permute(0, 2, 3, 1).numpy())
    np.save(tmp_path / "real.npy", real.numpy())
    for fake_set, real_set in (("fake.npz", "real.npz"), ("fake.npz", "real.npy"), ("fake", "real")):
        code, out, err = run_main("eval_main", [str(tmp_path / fake_set), "--ref", str(tmp_path / real_set),
                                                "--json", str(tmp_path / "pair.json")], capsys)
        assert code == 0, err
        pair = json.loads((tmp_path / "pair.json").read_text())
        assert pair["metrics"]["inception/fd"] == pytest.approx(theirs, rel=1e-4), (fake_set, real_set)
        assert f"[pair: {n} images vs {n} images of {tmp_path / real_set}, pt_inception-2015-12-05]" in out


@pytest.mark.slow
def test_frechet_maths_equals_pytorch_fid_at_full_rank():
    """2,100 samples in 2048-d (full-rank covariances, non-diagonal, non-negative like pool3 features):
    `metrics.frechet_from_stats` against pytorch-fid's `calculate_frechet_distance`."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    g = np.random.default_rng(0)
    mix = g.standard_normal((2048, 2048)) / 45
    a = np.abs(g.standard_normal((2100, 2048)) @ mix)
    b = np.abs(g.standard_normal((2100, 2048)) @ mix * 1.1 + 0.05)
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    theirs = float(calculate_frechet_distance(*stats[0], *stats[1]))
    ours = M.frechet_from_stats(*(torch.from_numpy(v) for pair in stats for v in pair))
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.slow
def test_fid_during_two_rank_training_equals_one_process(torch_home, weights, tmp_path, capsys):
    """train.eval_every with FID: the reference statistics computed once by one rank (under the cache file's lock;
    the other waits, then reads them), each rank running Inception on its share; the logged value equals a
    one-process `evaluate` of the saved checkpoint over the statistics read back from the cache."""
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    proc = accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
                             "data.num_images=32", f"data.cache_dir={cache}", "train.steps=4",
                             "train.checkpoint_every=4", "train.eval_every=4", "train.eval_num=8",
                             "train.keep_best=inception/fd", "train.eval_protocol=run",
                             extra_env={"TORCH_HOME": str(torch_home)})
    assert_ok(proc)
    (stats_file,) = (cache / "fid-stats").glob("*.safetensors")  # computed once, by one rank
    assert "eval/inception/fd: FID [run: 8 samples vs 32 synthetic training images at 32x32" in proc.stdout
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    (record,) = [r for r in records if "eval/inception/fd" in r]
    from dcgan_dist.checkpoint import load_generator

    generator, _, _ = load_generator(str(run / "checkpoints" / "step-00000004"))
    spaces, _ = E.feature_spaces("synthetic", "data", cache, image_size=32, channels=1, num_images=32,
                                 compute_missing=False)
    one = E.evaluate(generator, 8, spaces, seed=0)
    for key in ("inception/fd", "inception/kid"):
        assert record[f"eval/{key}"] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["best"]["metric"] == "inception/fd"
