"""The quality of a finished run, as `dcgan-eval` measures it, callable from Python.

`plan` decides what a checkpoint (or a samples .npz) is compared against: the dataset (its meta.json's, or
`data`), the number of samples, the real references and the feature spaces (`evaluation.feature_spaces`: the
domain classifier's held-out halves; the FID statistics of the training images as the checkpoint trained on
them, or of the whole training split for the published protocol). `Plan.run` scores it (`evaluation.evaluate`
or `evaluation.score`) and returns a `Report` of plain numbers; `Report.lines` is the table dcgan-eval prints.
`cache_fid_stats` and `save_classifier_for` make, ahead, the two files the spaces read (dcgan-eval fid-stats,
train-classifier).

    report = plan("runs/x", num=5000).run()   # report.metrics["classifier/fd"], report.to_json()
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dcgan_dist.errors import UserError
from dcgan_dist.fileio import user_cache_dir
from dcgan_dist.hub import load_generator
from dcgan_dist.quality import evaluation, reference
from dcgan_dist.quality.features import classifier_path, save_classifier
from dcgan_dist.quality.fid import build_fid_inception
from dcgan_dist.quality.image_sets import LAYOUTS, is_image_set, read_image_set
from dcgan_dist.registry import DATASETS, FID_PROTOCOLS, METRICS

USUAL_NUM = 5000  # generated images when a checkpoint is scored and no number is given
MIN_NUM = 8


@dataclass
class Plan:
    """What is scored (`generator`, or the ready-made `images` of a samples file) and against what (`spaces`)."""

    checkpoint: str
    source: str  # "step N, EMA generator" | "samples file"
    num: int  # the images scored
    seed: int | None  # the noise seed (None: a samples file)
    data: str
    step: int | None
    ema: bool | None
    spaces: list  # evaluation.FeatureSpace | evaluation.FidSpace
    notes: list[str]  # one per space left out: why, and how to get it
    generator: nn.Module | None = None
    images: torch.Tensor | None = None  # uint8 [N, C, S, S]

    def references(self) -> dict[str, dict]:
        """{space name: its info}: which real references each space compares with."""
        return {s.name: s.info for s in self.spaces}

    def run(self) -> Report:
        if self.images is not None:
            metrics = evaluation.score(self.images, self.spaces)
        else:
            metrics = evaluation.evaluate(self.generator, self.num, self.spaces, seed=self.seed)
        real = {f"{s.name}/{k}": v for s in self.spaces for k, v in s.real_metrics().items()}
        protocols = {s.name: {**s.info["protocol"], "num_samples": self.num,
                              "note": evaluation.protocol_note(s, self.num)}
                     for s in self.spaces if "protocol" in s.info}  # FID/KID: printed beside every figure
        return Report(self, metrics, real, protocols)


@dataclass
class Report:
    plan: Plan
    metrics: dict[str, float]  # {"<space>/<metric>": value}
    real: dict[str, float]  # the class metrics of the real reference images
    protocols: dict[str, dict]  # FID/KID spaces: what was compared, and the note printed beside the figures

    def to_json(self) -> dict:
        p = self.plan
        return {"checkpoint": p.checkpoint, "step": p.step, "ema": p.ema, "num": p.num, "seed": p.seed,
                "data": p.data, "metrics": self.metrics, "real": self.real, "notes": p.notes,
                "protocol": self.protocols, "spaces": p.references()}

    def write_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def lines(self) -> list[str]:
        """dcgan-eval's table: per space, the generated images' figures beside the real reference's (rows:
        `registry.METRICS`); FID/KID with the protocol beside every figure; then the notes."""
        p, metrics = self.plan, self.metrics
        seed = "" if p.seed is None else f", seed {p.seed}"
        out = [f"dcgan-eval: {p.checkpoint} ({p.source}), {p.num} samples{seed}, data {p.data}"]
        for s in p.spaces:
            extra = f", held-out accuracy {s.info['accuracy']:.2%}" if "accuracy" in s.info else ""
            out += ["", f"{s.name} space ({s.info['reference']}{extra})"]
            if s.name in self.protocols:
                out += [f"  {label:<22}{_fmt(key, metrics[f'{s.name}/{key}']):>12}   [{self.protocols[s.name]['note']}]"
                        for key, label in (("fd", "FID"), ("kid", "KID"))]
                continue
            out.append(f"  {'metric':<22}{'generated':>12}{'real':>12}   (real: held-out images; for FD the "
                       "real-vs-real floor)")
            for key, label in ((k, m.label) for k, m in METRICS.items()):
                name = f"{s.name}/{key}"
                if name in metrics:
                    ref = metrics[f"{s.name}/fd_floor"] if key == "fd" else self.real.get(name)  # fd: the floor
                    ref = s.info.get("accuracy") if key == "class_accuracy" else ref  # real: the classifier's own
                    out.append(f"  {label:<22}{_fmt(key, metrics[name]):>12}{_fmt(key, ref):>12}")
                if key == "fd" and name in metrics:
                    out.append(f"  {'  / floor':<22}{metrics[name] / metrics[f'{s.name}/fd_floor']:>12.2f}")
        return out + [f"note: {note}" for note in p.notes]


def _fmt(key: str, value) -> str:
    return "-" if value is None else f"{value:.{METRICS[key].decimals}f}"


FIXED_NUM = {"standard": evaluation.STANDARD_NUM, "lucic": evaluation.LUCIC_NUM}  # protocols that fix the counts


def _check_counts(protocol: str, fixed: int | None, num: int | None, ref_num: int | None,
                  ref: str | None) -> int | None:
    """The images to score (`fixed`: the protocol's count), once the protocol and the counts asked are accepted."""
    if protocol not in FID_PROTOCOLS:
        raise UserError(f"--protocol {protocol}: use one of {', '.join(FID_PROTOCOLS)}")
    if fixed and (ref_num is not None or ref or num not in (None, fixed)):
        raise UserError(f"--protocol {protocol} fixes --num at {fixed} and the reference ("
                        f"{FID_PROTOCOLS[protocol]}); drop --num/--ref-num/--ref")
    num = fixed or num
    if num is not None and num < MIN_NUM:
        raise UserError(f"--num {num}: use at least 8 images (5000 is the usual)")
    if ref_num is not None and ref_num < 2:
        raise UserError(f"--ref-num {ref_num}: use at least 2 real images")
    return num


def plan(checkpoint: str, num: int | None = None, seed: int = 0, ema: bool = True, data: str | None = None,
         data_root: str | None = None, classifier: str | None = None, cache_dir: str | None = None,
         fid: bool = False, fid_weights: str | None = None, fid_standard: bool = False,
         ref_num: int | None = None, protocol: str = "run", ref: str | None = None, sample_fit: str = "resize",
         use_classifier: bool = True, log=print) -> Plan:
    """What `dcgan-eval CHECKPOINT` compares, with its flags as arguments: the generator of a checkpoint dir, run
    dir or generator*.safetensors (`ema`: its EMA weights when it has them), or the images of a samples .npz
    (needs `data`, or `ref`). `num`: images scored (default 5000; a samples file: all, or its first `num`).
    `protocol` (registry.FID_PROTOCOLS; `fid_standard` is "standard"): what FID compares with; "standard" and
    "lucic" fix `num` and the reference. `ref_num`: a fixed subset of real images for the FID statistics
    (default: the training set as the checkpoint trained on it). `ref`: another samples .npz, the reference of
    FID/KID instead of a dataset (protocol "pair"). `sample_fit`: a samples file's images at another size than
    the reference's were trained on images padded ("pad": their centre is scored) or resized (a checkpoint says
    itself: its data.fit). `use_classifier` False: FID/KID alone. `fid`/`fid_weights`: require FID/KID
    (default: when the weights are on disk). Builds the spaces, computing and caching what is missing (`log`
    says so); a UserError when nothing can be measured."""
    protocol = "standard" if fid_standard else protocol
    fixed = FIXED_NUM.get(protocol)
    num = _check_counts(protocol, fixed, num, ref_num, ref)
    generator = images = None
    if ref:
        return _pair_plan(checkpoint, ref, num, seed, ema, fid_weights, sample_fit)
    if is_image_set(checkpoint):
        if not data:
            raise UserError(f"{checkpoint}: a set of images names no dataset; pass --data (and --data-root), or "
                            "--ref OTHER (.npz, .npy or a folder of images)")
        images = _samples(checkpoint, num)
        if images.shape[-1] != images.shape[-2]:
            raise UserError(f"{checkpoint}: its images are {images.shape[-1]}x{images.shape[-2]}; scoring against a "
                            "dataset needs square ones (or compare with another set: --ref)")
        num, image_size, channels, source = len(images), images.shape[-1], images.shape[1], "samples file"
        root, trained_on, step, ema, data_cfg = data_root or "data", None, None, None, {"fit": sample_fit}
        wanted = DATASETS[data].channels if data in DATASETS else None
        if wanted is not None and channels != wanted:
            raise UserError(f"{checkpoint}: its images have {channels} channel(s) but {data} images have {wanted}; "
                            "score samples against a dataset with the same channels (--data)")
    else:
        generator, meta, ema = load_generator(checkpoint, ema=ema)
        num, image_size, channels = num or USUAL_NUM, generator.image_size, generator.channels
        data_cfg, step = meta.get("config", {}).get("data", {}), meta.get("step")
        data, root = data or data_cfg.get("name"), data_root or data_cfg.get("root", "data")
        if not data:
            raise UserError(f"{checkpoint}: its meta.json names no dataset (an exported generator?); pass --data")
        trained_on = data_cfg.get("num_images") if data == data_cfg.get("name") else None
        source = f"step {step}, {'EMA' if ema else 'raw'} generator"
    if ref_num is None and protocol == "run":  # the FID reference: the images as the checkpoint trained on them
        ref_num = trained_on
    spaces, notes = evaluation.feature_spaces(
        data, root, cache_dir or data_cfg.get("cache_dir") or "", classifier,
        fid=True if (fid or fid_weights or fixed) else None, fid_weights=fid_weights,
        image_size=image_size, channels=channels, num_images=ref_num, log=log, announce=log, protocol=protocol,
        fit=data_cfg.get("fit", "resize"), use_classifier=use_classifier)
    if not spaces:
        raise UserError(f"nothing to measure for data {data}: " + "; ".join(notes))
    return Plan(checkpoint, source, num, None if images is not None else seed, data, step, ema, spaces, notes,
                generator, images)


def _samples(path: str, num: int | None) -> torch.Tensor:
    """The images of a set (`image_sets.read_image_set`) to score: all, or its first `num`; at least MIN_NUM."""
    images = read_image_set(path)
    if num is not None:
        if num > len(images):
            raise UserError(f"--num {num}: {path} holds only {len(images)} images")
        images = images[:num]
    if len(images) < MIN_NUM:
        raise UserError(f"{path}: holds {len(images)} image(s); score at least 8 (5000 or 50000 are the usual)")
    return images


def _pair_plan(scored: str, ref: str, num: int | None, seed: int, ema: bool, fid_weights: str | None,
               sample_fit: str) -> Plan:
    """FID/KID of a generator's samples or a set of images against another set (.npz/.npy arrays or a folder of
    images, each at its own size), as pytorch-fid's two-path command compares two folders. A generator's
    samples at another size than square references are brought to theirs as its data.fit says (`fit_back`), as
    under --protocol lucic, so `--ref` of the test digits gives that protocol's figure."""
    if not (is_image_set(ref) or Path(ref).is_dir()):
        raise UserError(f"--ref {ref}: give a set of real images: an .npz/.npy of {LAYOUTS} or a "
                        "folder of PNG/JPEG files")
    reference = read_image_set(ref)
    generator = images = step = used_ema = None
    if is_image_set(scored):
        images, source, num = _samples(scored, num), "samples file", None
    else:
        generator, meta, used_ema = load_generator(scored, ema=ema)
        step, sample_fit = meta.get("step"), meta.get("config", {}).get("data", {}).get("fit", "resize")
        source, num = f"step {step}, {'EMA' if used_ema else 'raw'} generator", num or USUAL_NUM
    net, weights = build_fid_inception(fid_weights)
    space = evaluation.pair_space(net, weights, reference, ref, sample_fit)
    return Plan(scored, source, len(images) if images is not None else num, None if images is not None else seed,
                ref, step, used_ema, [space], [], generator=generator, images=images)


def cache_fid_stats(data: str, root: str, image_size: int, channels: int, num_images: int | None = None,
                    cache_dir: str | Path | None = None, fid_weights: str | None = None,
                    log=print, fit: str = "resize") -> tuple[dict, dict]:
    """Compute (once) and cache the FID reference statistics that training with train.eval_every reads:
    (the reference, as `reference.fid_reference` returns it; the weights' info)."""
    net, weights = build_fid_inception(fid_weights)
    ref = reference.fid_reference(net, weights["sha256"], data, root, image_size, channels, num_images, cache_dir,
                                   log=log, fit=fit)
    return ref, weights


def save_classifier_for(data: str, root: str = "data", image_size: int = 32, epochs: int = 6,
                        cache_dir: str | Path | None = None, out: str | Path | None = None,
                        log=print) -> tuple[Path, dict]:
    """Train the domain classifier of `data` on the fixed split and save it to `out` (default: where
    `feature_spaces` looks, under `cache_dir`): (its path, its info with the held-out accuracy)."""
    if image_size < 8 or epochs < 1:
        raise UserError("--image-size must be at least 8 and --epochs at least 1")
    path = Path(out) if out else classifier_path(cache_dir or user_cache_dir(), data, image_size)
    model, info = evaluation.fit_classifier(data, root, image_size, epochs, log=log)
    save_classifier(model, path, info)
    return path, info
