"""Image files (or a table's encoded bytes) decoded, resized and cropped for a store, by worker processes that
write each image's pixels straight into its slot of a unit file (`prepare.py` hands out the units), so no
pixels cross a pipe; what the folder's images and their classes are.

No torch at import, nor anything of the package but `errors`: the spawned decoding workers import this module.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from dcgan_dist.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
BACKGROUND = 255  # data.background's default: transparent pixels land on white
FOLDER_RESIZE = ("shorter side to S (PIL bilinear), centre crop S x S; JPEGs of at least 2S first decoded at a "
                 "reduced scale no smaller than S (PIL draft); uint8")
_CHUNK = 64  # images per decoding task: small enough to keep workers busy, large enough to amortise the pipe


def list_images(root: Path, exclude: Path | None = None, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file under `root`, at any depth, sorted (the order of a store); none under `exclude`. Links to
    files and to folders are followed, as torchvision's ImageFolder does; a folder reached again (a loop of links)
    is read once. Names need not be UTF-8: they are the file system's bytes (surrogate-escaped str)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        st = here.stat()
        if (st.st_dev, st.st_ino) in seen or (exclude is not None and (here == exclude or exclude in here.parents)):
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        found += [here / f for f in files if os.path.splitext(f)[1].lower() in extensions and (here / f).is_file()]
    return sorted(found)


def folder_classes(root: Path, files: list[Path]) -> tuple[list[int] | None, list[str] | None]:
    """(label per file, class names) when every image sits in a first-level sub-folder of `root` (the sorted
    sub-folder names are the classes); (None, None) otherwise."""
    parts = [p.relative_to(root).parts for p in files]
    if not parts or any(len(q) != 2 for q in parts):
        return None, None
    names = sorted({q[0] for q in parts})
    index = {name: i for i, name in enumerate(names)}
    return [index[q[0]] for q in parts], names


def flatten_alpha(im, background: int):
    """A PIL image with transparency (RGBA, LA, PA, or a palette / grey / RGB image with a transparent colour) ->
    the same composited onto an opaque grey `background` (0..255), as RGBA; others unchanged. One rule for every
    mode, so transparent pixels never come out as whatever colour they happen to store."""
    from PIL import Image

    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
        return im
    im = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", im.size, (background,) * 3 + (255,)), im)


def decode_image(path: Path, size: int, channels: int, draft: bool = False, encoded: bytes | None = None,
                 fix: str = "remove or replace the file", background: int = BACKGROUND) -> np.ndarray:
    """One image file (or `encoded` bytes, `path` then naming them in messages) -> uint8 [C, S, S]: transparent
    pixels composited onto the grey `background` (`flatten_alpha`), the shorter side resized to `size`
    (bilinear), then centre-cropped.

    `draft`: a JPEG at least twice `size` is decoded at a reduced scale (1/2, 1/4 or 1/8, never below `size`),
    several times faster for large photos; its pixels then differ slightly from a full decode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path if encoded is None else io.BytesIO(encoded)) as im:
            mode = "L" if channels == 1 else "RGB"
            if draft and im.format == "JPEG" and min(im.size[0] // size, im.size[1] // size) >= 2:
                im.draft(mode, (size, size))
            im = flatten_alpha(im, background).convert(mode)
            w, h = im.size
            scale = size / min(w, h)  # resize the shorter side to `size`, then centre-crop
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image {path} vanished while it was being read; is something else changing "
                        "the folder? Run again once it is stable") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot decode image {path}: {e}; {fix}") from None
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return arr.transpose(2, 0, 1).copy()  # [C, S, S], C-contiguous and writable (PIL's array is read-only)


def _decode_into(task: tuple[str, int, list], size: int, channels: int, background: int) -> list[str | None]:
    """A worker's task (unit file, first slot, images: paths, or (name, encoded bytes or None)): each image
    decoded and written into its slot of the unit file, so no pixels cross a pipe; per image None, or the
    one-line reason it cannot be decoded (its slot stays empty; the parent decides)."""
    unit, slot, items = task
    errors: list[str | None] = []
    fd = os.open(unit, os.O_WRONLY)
    try:
        for k, item in enumerate(items):
            try:
                if isinstance(item, str):
                    image = decode_image(Path(item), size, channels, draft=True, background=background)
                elif item[1] is None:
                    raise UserError(f"{item[0]} has no image bytes")
                else:
                    image = decode_image(item[0], size, channels, draft=True, encoded=item[1],
                                         fix="fix or drop that row", background=background)
            except UserError as e:
                errors.append(str(e))
                continue
            os.pwrite(fd, image.tobytes(), (slot + k) * image.nbytes)
            errors.append(None)
    finally:
        os.close(fd)
    return errors


@contextlib.contextmanager
def decoding_pool(workers: int) -> Iterator:
    """`workers` decoding processes, or None for one (decode in this process); stopped on the way out.
    spawn, not fork: the parent may hold torch's threads; the workers import only this module, numpy and PIL."""
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def decode_jobs(items_of: Callable[[int, int], list], size: int, channels: int, background: int, pool,
                workers: int, skip_bad_files: bool, skip_option: str,
                jobs: list[tuple[range, Path]]) -> Iterator[tuple[int, bool]]:
    """Decode the sources of each job (sources, unit file) into the unit file's slots (`_decode_into`) by
    `pool`'s workers in chunks (or here, without a pool); yield (index, written: False for a skipped source) in
    order, once the image is in its file. `items_of(start, stop)`: the sources' paths or (name, bytes). Up to
    16 chunks a worker are queued ahead, across units: the workers go on decoding while the writer finishes
    (hashes, fsyncs) a unit, and a table's encoded bytes are read only that far ahead. A source that cannot be
    decoded stops it (a UserError naming `skip_option`) unless `skip_bad_files`."""
    total = sum(len(r) for r, _ in jobs)
    n = max(1, min(_CHUNK, total // (4 * workers))) if pool else 1  # a small job keeps every worker busy
    tasks = ((str(unit), i - r.start, items_of(i, min(i + n, r.stop)))
             for r, unit in jobs for i in range(r.start, r.stop, n))
    decode = functools.partial(_decode_into, size=size, channels=channels, background=background)
    results = _in_order(pool, decode, tasks, 16 * workers) if pool else map(decode, tasks)
    indices = (i for r, _ in jobs for i in r)
    for errors in results:
        for error in errors:
            if error is not None and not skip_bad_files:
                how = f"pass {skip_option}" if skip_option.startswith("-") else f"set {skip_option}=true"
                raise UserError(f"{error}; or {how} to skip such files")
            yield next(indices), error is None


def _in_order(pool, fn: Callable, tasks: Iterator, limit: int) -> Iterator:
    """fn(task) of each task, run by `pool`, in order, with at most `limit` tasks submitted and not yet taken."""
    ahead: collections.deque = collections.deque()
    for task in tasks:
        ahead.append(pool.apply_async(fn, (task,)))
        if len(ahead) >= limit:
            yield ahead.popleft().get()
    while ahead:
        yield ahead.popleft().get()
