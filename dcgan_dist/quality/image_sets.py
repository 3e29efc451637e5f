"""Sets of images as people have them, read for scoring: uint8 arrays in `.npz`/`.npy` files in any of the usual
layouts, or a folder of PNG/JPEG files (what pytorch-fid, torch-fidelity and clean-fid take), each -> uint8
[N, C, H, W] with C 1 or 3; anything else is a UserError naming the file, its shape and dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dcgan_dist.data.decode import list_images
from dcgan_dist.errors import UserError

LAYOUTS = "uint8 [N, H, W] (grey), [N, H, W, C] or [N, C, H, W] with C 1 or 3 (values 0..255)"
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")


def is_image_set(path: str) -> bool:
    """Whether `path` names images rather than a generator: an .npz/.npy file, or a folder of image files."""
    p = Path(path)
    return p.suffix in (".npz", ".npy") or (p.is_dir() and not (p / "meta.json").exists()
                                            and not (p / "checkpoints").is_dir()
                                            and not (p / "config.json").exists() and _image_files(p) != [])


def read_image_set(path: str | Path) -> torch.Tensor:
    """The images of an .npz (its arr_0, or its only array), an .npy or a folder of PNG/JPEG files (any depth, in
    sorted order; all of one size; grey when every file is grey, else RGB, alpha dropped as pytorch-fid's
    convert("RGB") does) -> uint8 [N, C, H, W]."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                name = "arr_0" if "arr_0" in f.files else f.files[0] if len(f.files) == 1 else None
                if name is None:
                    raise UserError(f"{path}: no arr_0 array (it holds {', '.join(f.files) or 'nothing'}); save the "
                                    f"images as arr_0 (np.savez(path, images)), {LAYOUTS}")
                arr = f[name]
    except (OSError, ValueError, EOFError) as e:  # not a file, not a zip of .npy arrays, or an object array
        raise UserError(f"{path}: not a readable {path.suffix} of arrays ({str(e).splitlines()[0]})") from None
    return to_nchw(arr, str(path))


def to_nchw(arr: np.ndarray, name: str) -> torch.Tensor:
    """A uint8 array in one of LAYOUTS -> uint8 [N, C, H, W]. A 4-d array whose last axis is 1 or 3 is NHWC."""
    shape = list(arr.shape)
    if arr.dtype == np.uint8 and len(arr) > 0:
        if arr.ndim == 3 and min(shape[1:]) > 0:
            return torch.from_numpy(np.ascontiguousarray(arr[:, None]))
        if arr.ndim == 4 and shape[3] in (1, 3) and min(shape[1:3]) > 3:
            return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        if arr.ndim == 4 and shape[1] in (1, 3) and min(shape[2:]) > 3:
            return torch.from_numpy(np.ascontiguousarray(arr))
    raise UserError(f"{name}: the images are {arr.dtype} {shape}; expected {LAYOUTS}")


def _image_files(folder: Path) -> list[Path]:
    return list_images(folder, extensions=FOLDER_EXTENSIONS)


def _read_folder(folder: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    files = _image_files(folder)
    if not files:
        raise UserError(f"{folder}: holds no {'/'.join(e[1:].upper() for e in FOLDER_EXTENSIONS)} images")
    arrays, size = [], None
    for file in files:
        try:
            with Image.open(file) as im:
                im.load()
                if size is None:
                    size = im.size
                elif im.size != size:
                    raise UserError(f"{file} is {im.size[0]}x{im.size[1]} but {files[0]} is {size[0]}x{size[1]}; "
                                    "give a folder of images of one size")
                arrays.append(np.asarray(im.convert("L") if im.mode in ("L", "1", "I;16") else im.convert("RGB"),
                                         dtype=np.uint8))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"cannot decode image {file}: {e}; remove or replace the file") from None
    if any(a.ndim == 3 for a in arrays):  # some colour: every image as RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return torch.from_numpy(np.stack(arrays)[:, None].copy())
