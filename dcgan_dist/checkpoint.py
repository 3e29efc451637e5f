"""The checkpoint format on disk: safetensors files and meta.json, written atomically, verified by sha256
and against the model kwargs in meta.json, found through `checkpoints/latest`.

A checkpoint directory holds only `*.safetensors` files and `meta.json` (no pickle anywhere):
    checkpoints/step-00001000/{generator,discriminator,generator_ema}.safetensors + meta.json
    checkpoints/latest   text file naming the newest complete checkpoint directory
What a training checkpoint holds, and how it is saved and restored: `train_state`. Which generator
weights a reader gets (EMA or raw): `choose_generator`, here.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dcgan_dist.errors import RunError, UserError
from dcgan_dist.fileio import fsync_dir, sha256_file, swap_in, write_atomic
from dcgan_dist.gan.models import Discriminator, Generator
from dcgan_dist.registry import ARCHS, CONDS, IMAGE_CHANNELS, IMAGE_SIZES, NORMS

FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


STEP_DIR = re.compile(r"step-\d{8}")
MAX_META_BYTES = 16 * 2**20  # meta.json is a few KiB; a larger one is not ours and is not read


def save_checkpoint(ckpt_root: Path, step: int, state: dict[str, dict[str, torch.Tensor]], meta: dict,
                    name: str | None = None) -> Path:
    """Write checkpoint `step` (file stem -> tensors, plus `meta`) as `ckpt_root/name`: by default its step
    directory, which `latest` then points at; another name (`best`, train.keep_best) leaves `latest` alone.

    A failed write (a full disk, say) removes what it wrote and raises RunError: `latest` and the
    checkpoints before it are untouched.
    """
    final = ckpt_root / (name or step_dir_name(step))
    try:
        write_dir(final, state, {"step": step, **meta})
        if STEP_DIR.fullmatch(final.name):  # only after the directory is complete
            write_atomic(ckpt_root / "latest", (final.name + "\n").encode())
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as a SafetensorError
        previous, detail = latest_checkpoint(ckpt_root), getattr(e, "strerror", None) or str(e)
        raise RunError(f"cannot write checkpoint {final}: {detail}; nothing was "
                       f"lost: the last checkpoint is {previous or 'none'}. Free space there (or lower "
                       "train.keep_last) and continue with train.resume=auto") from None
    return final


def write_dir(final: Path, state: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
    """Write a complete checkpoint directory atomically.

    Files go to a temporary directory, are fsynced, and the directory is renamed into place, so a crash
    at any instant leaves either no `final` or a complete one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        hashes = {}
        for stem, tensors in state.items():
            path = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
            hashes[path.name] = _fsync_and_hash(path)
        meta = {"format_version": FORMAT_VERSION, **meta, "files": hashes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        _fsync_and_hash(tmp / "meta.json")
        fsync_dir(tmp)
    except BaseException:  # a full disk, a signal: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, final, final.parent / f".tmp-{final.name}-{os.getpid()}-old")  # the same step again, the next best
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Step directories, newest first (temporary directories of interrupted writes excluded)."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def prune(ckpt_root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and those on a multiple of `keep_every` steps.

    The one `latest` names is always kept. Temporaries left by killed writes are removed.
    """
    latest = latest_checkpoint(ckpt_root)
    removed = []
    for i, path in enumerate(complete_checkpoints(ckpt_root)):
        step = int(path.name.split("-")[1])
        if i < keep_last or path == latest or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(path)
        removed.append(path)
    for tmp in ckpt_root.glob(".tmp-*"):  # temporaries of writes that were killed
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return removed


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The directory `latest` names; None if there is none, or if it names anything but a step directory
    beside it (the pointer is never followed elsewhere)."""
    pointer = ckpt_root / "latest"
    if not pointer.is_file() or pointer.stat().st_size > 64:
        return None
    name = pointer.read_text(errors="replace").strip()
    return ckpt_root / name if STEP_DIR.fullmatch(name) else None


def read_meta(ckpt_dir: Path, verify: bool = True) -> dict:
    """meta.json of a checkpoint; with `verify`, every file's sha256 is checked first, and the model kwargs
    in meta.json against the tensors' names, shapes and dtypes (before any model is built)."""
    meta_path = ckpt_dir / "meta.json"
    try:
        if meta_path.stat().st_size > MAX_META_BYTES:
            raise UserError(f"{meta_path} is {meta_path.stat().st_size} bytes, not a dcgan_dist checkpoint's meta.json")
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing: {ckpt_dir} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is damaged ({e}); use another checkpoint") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{meta_path} has format_version {version!r}; this dcgan_dist reads up to "
                        f"{FORMAT_VERSION}: upgrade dcgan_dist")
    if type(meta.get("step")) is not int or meta["step"] < 0:
        raise UserError(f"{meta_path} has step {meta.get('step')!r}, not a step count: the file is damaged; use "
                        "another checkpoint")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(n, str) and "/" not in n and "\\" not in n and
                                              not n.startswith(".") for n in files):
        raise UserError(f"{meta_path} lists files outside its checkpoint directory; use another checkpoint")
    if verify:
        for name, digest in files.items():
            path = ckpt_dir / name
            if not path.is_file():
                raise UserError(f"{path} is missing: the checkpoint is incomplete")
            if _hash(path) != digest:
                raise UserError(f"{path} does not match its sha256 in meta.json: the file is damaged")
        for stem, key in MODEL_FILES.items():
            if f"{stem}.safetensors" in files:
                check_model_file(ckpt_dir / f"{stem}.safetensors", meta, key)
    return meta


# file stem -> the meta.json key of the kwargs that build its model
MODEL_FILES = {"generator": "generator", "generator_ema": "generator", "discriminator": "discriminator"}
_MODEL_ARGS = {  # the kwargs meta.json may hold for each model, and the type of each (absent: the default), as
    # the model's own signature says: a new kwarg is read from it
    key: {name: type(p.default) for name, p in inspect.signature(model).parameters.items()}
    for key, model in (("generator", Generator), ("discriminator", Discriminator))
}
MAX_CLASSES = 100_000
MAX_WIDTH = 2**20  # latent_dim and the width unit (64 in DCGAN): far beyond any model that fits in memory


def check_model_file(path: Path, meta: dict, key: str, source: str = "meta.json") -> None:
    """Refuse (UserError) a model file whose tensors do not match what the `key` kwargs in `meta` build (read from
    `source` beside the file: meta.json, or a Hub folder's config.json).

    The model is built on the meta device (shapes only, no memory), and the file's header is read without
    its data, so an edited meta.json (say a width of 100000) costs nothing before it is refused."""
    kwargs, where = meta.get(key), f"{path.parent / source}"
    args = _MODEL_ARGS[key]
    if not isinstance(kwargs, dict) or not set(kwargs) <= set(args) or not all(
            type(kwargs[k]) is args[k] for k in kwargs):
        raise UserError(f"{where}: {key} = {kwargs!r} is not the kwargs of a {key} "
                        f"({', '.join(f'{k}: {t.__name__}' for k, t in args.items())}); use another checkpoint")
    bad = [f"{k}={v!r}" for k, v in kwargs.items() if (
        (k == "image_size" and v not in IMAGE_SIZES) or (k == "channels" and v not in IMAGE_CHANNELS) or
        (k in ("latent_dim", "width") and not 1 <= v <= MAX_WIDTH) or (k == "norm" and v not in NORMS) or
        (k == "arch" and v not in ARCHS) or (k == "num_classes" and not 0 <= v <= MAX_CLASSES) or
        (k == "cond" and v not in CONDS))]
    arch = kwargs.get("arch")  # absent: the default, dcgan
    if kwargs.get("num_classes") and arch in ARCHS and not ARCHS[arch].conditional:
        bad.append(f"num_classes with arch={arch!r}")
    if bad:
        raise UserError(f"{where}: {key} has {', '.join(bad)}, which no dcgan_dist model has; use another checkpoint")
    with torch.device("meta"):
        expected = (Generator if key == "generator" else Discriminator)(**kwargs).state_dict()
    try:
        with safe_open(path, framework="pt") as f:
            found = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    for name, tensor in expected.items():
        want = (tuple(tensor.shape), _SAFETENSORS_DTYPES.get(tensor.dtype))
        if found.get(name) != want:
            got = "missing" if name not in found else f"{list(found[name][0])} {found[name][1]}"
            raise UserError(f"{path} does not match {source}'s {key} {kwargs}: tensor {name} is {got} in the "
                            f"file, {list(want[0])} {want[1]} by {source}; use another checkpoint")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise UserError(f"{path} holds tensor {extra[0]}, which {source}'s {key} {kwargs} has not; "
                        "use another checkpoint")


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16"}


def load_tensors(ckpt_dir: Path, stem: str) -> dict[str, torch.Tensor]:
    path = ckpt_dir / f"{stem}.safetensors"
    try:
        return load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def find_resumable(ckpt_root: Path, warn) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies: `latest` first, then older ones, each failure reported by `warn`."""
    latest = latest_checkpoint(ckpt_root)
    candidates = complete_checkpoints(ckpt_root)
    if latest is not None:
        candidates = [latest] + [c for c in candidates if c != latest and c.name < latest.name]
    for path in candidates:
        try:
            return path, read_meta(path)
        except UserError as e:
            warn(f"skipping damaged checkpoint {path.name}: {e}")
    return None


def choose_generator(arg: str, ema: bool = True) -> tuple[Path, str, dict]:
    """Which generator weights a reader gets: (checkpoint dir, file stem, verified meta).

    `arg` is a checkpoint dir, a run dir (its latest) or a `*.safetensors` beside its meta.json. The EMA
    weights when the checkpoint has them and `ema`, else the raw generator; a named file is taken as named.
    """
    ckpt_dir, stem = resolve(arg)
    meta = read_meta(ckpt_dir)
    if stem == "generator" and ema and (ckpt_dir / "generator_ema.safetensors").is_file():
        stem = "generator_ema"
    if stem not in MODEL_FILES or MODEL_FILES[stem] != "generator":
        raise UserError(f"{ckpt_dir / stem}.safetensors is not a generator; pass generator.safetensors, "
                        "generator_ema.safetensors, or the checkpoint directory")
    check_model_file(ckpt_dir / f"{stem}.safetensors", meta, "generator")  # even if meta.json does not list it
    return ckpt_dir, stem, meta


def is_ema(stem: str, meta: dict) -> bool:
    """Whether the weights of `stem` are an EMA generator (an export says so in its meta.json)."""
    return stem == "generator_ema" or bool(meta.get("ema"))


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


_hash = sha256_file  # a file's sha256, as meta.json records it


def _fsync_and_hash(path: Path) -> str:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return sha256_file(path)


def load_generator(arg: str, ema: bool = True) -> tuple[Generator, dict, bool]:
    """(generator in eval mode, its checkpoint's meta, whether it is an EMA generator) from a checkpoint dir,
    run dir or generator*.safetensors: the weights `choose_generator` picks, verified (a Hub folder too:
    `hub.load_generator`)."""
    ckpt_dir, stem, meta = choose_generator(arg, ema)
    generator = Generator(**meta["generator"])  # checked against the file's tensors by read_meta
    generator.load_state_dict(load_tensors(ckpt_dir, stem))
    return generator.eval(), meta, is_ema(stem, meta)
