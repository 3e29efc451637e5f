"""safetensors checkpoints: written atomically, verified by sha256, found through `checkpoints/latest`.

A checkpoint directory holds only `*.safetensors` files and `meta.json` (no pickle anywhere):
    checkpoints/step-00001000/{generator,discriminator,generator_ema}.safetensors + meta.json
    checkpoints/latest   text file naming the newest complete checkpoint directory
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dcgan_dist.errors import UserError

FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(ckpt_root: Path, step: int, state: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
    """Write `state` (file stem -> tensors) and `meta` as checkpoint `step`; return its directory.

    Files go to a temporary directory, are fsynced, and the directory is renamed into place; only then
    is `latest` replaced (itself atomically). A crash at any instant leaves `latest` naming a complete
    checkpoint.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hashes = {}
    for stem, tensors in state.items():
        path = tmp / f"{stem}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
        hashes[path.name] = _fsync_and_hash(path)
    meta = {"format_version": FORMAT_VERSION, "step": step, **meta, "files": hashes}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    _fsync_and_hash(tmp / "meta.json")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. the final save on a checkpoint_every boundary)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_atomic(ckpt_root / "latest", final.name + "\n")
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    return ckpt_root / pointer.read_text().strip()


def read_meta(ckpt_dir: Path, verify: bool = True) -> dict:
    """meta.json of a checkpoint; with `verify`, every file's sha256 is checked first."""
    meta_path = ckpt_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing: {ckpt_dir} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is damaged ({e}); use another checkpoint") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{meta_path} has format_version {version!r}; this dcgan_dist reads up to "
                        f"{FORMAT_VERSION}: upgrade dcgan_dist")
    if verify:
        for name, digest in meta.get("files", {}).items():
            path = ckpt_dir / name
            if not path.is_file():
                raise UserError(f"{path} is missing: the checkpoint is incomplete")
            if _hash(path) != digest:
                raise UserError(f"{path} does not match its sha256 in meta.json: the file is damaged")
    return meta


def load_tensors(ckpt_dir: Path, stem: str) -> dict[str, torch.Tensor]:
    path = ckpt_dir / f"{stem}.safetensors"
    try:
        return load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def resolve(arg: str) -> tuple[Path, str]:
    """A checkpoint dir, a run dir (its latest) or a `*.safetensors` beside its meta.json -> (dir, stem)."""
    path = Path(arg)
    if path.suffix == ".safetensors":
        return path.parent, path.stem
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise UserError(f"run directory {arg} has no checkpoints/latest yet: no complete checkpoint")
        path = latest
    if not (path / "meta.json").is_file():
        raise UserError(f"{arg} is not a checkpoint: expected a checkpoint dir, a run dir, or a "
                        "generator.safetensors beside its meta.json")
    return path, "generator"


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_and_hash(path: Path) -> str:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return _hash(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
