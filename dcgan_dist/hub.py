"""A generator in the Hugging Face Hub's folder layout for PyTorch models, written and read with huggingface_hub's
own `PyTorchModelHubMixin` and `ModelCard`:

    model.safetensors   the generator's weights (the EMA weights when the checkpoint has them)
    config.json         the generator's kwargs: `HubGenerator(**config)` builds it
    README.md           the model card: metadata (library, tags, datasets, licence, model-index with FID/KID and
                        their protocol) and what the weights are, how they were trained and measured
    samples.png         a fixed-noise grid (seed 0; one row per class for a conditional model)

`HubGenerator.from_pretrained(FOLDER or "user/name")` loads it (a Hub id needs the network the first time);
`dcgan-sample` and `dcgan-eval` accept the folder (`load_generator`). Before anything is allocated, config.json
is checked as the checkpoint reader checks meta.json: its kwargs against what a generator takes, and the tensors
they build against model.safetensors' header. Nothing is pickled, and a folder without model.safetensors is
refused rather than read from a pickle.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors.torch import load_file

from dcgan_dist import checkpoint, sample_files
from dcgan_dist.errors import UserError
from dcgan_dist.gan import sampling
from dcgan_dist.gan.models import Generator
from dcgan_dist.registry import DATASETS, LUCIC_BEST, METRICS

CONFIG, WEIGHTS, CARD, GRID = "config.json", "model.safetensors", "README.md", "samples.png"
FILES = (WEIGHTS, CONFIG, CARD, GRID)
MAX_CONFIG_BYTES = 2**20  # config.json is a few hundred bytes; a larger one is not ours and is not read
PIPELINE = "unconditional-image-generation"

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

![samples](samples.png)

*{{ grid_caption }}*

## Use

```python
{{ imports }}

G = HubGenerator.from_pretrained("{{ repo_id }}")   # a Hub id, or this folder on disk
images, labels = draw(G, 64, seed=0)   # {{ shape }} in [-1, 1]{{ labels_note }}
```

Or, with this folder on disk, `dcgan-sample FOLDER --num 64 --out grid.png`: the same images, for the same
`--seed`, as the checkpoint it was exported from.

## Quality

{{ quality }}

## Training

{{ training }}

## Files

| file | what |
|---|---|
| `model.safetensors` | the generator's weights ({{ weights }}) |
| `config.json` | its kwargs: `HubGenerator(**config)` builds it |
| `samples.png` | the grid above |

Licence: {{ licence }}.
"""


class HubGenerator(Generator, PyTorchModelHubMixin, library_name="dcgan_dist", tags=["dcgan", "gan"],
                   model_card_template=TEMPLATE):
    """A `Generator` that saves and loads in the Hub's layout (`save_pretrained`, `from_pretrained`, `push_to_hub`).
    Its state dict, forward and samples are the Generator's own."""

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, config: dict | None = None, map_location: str = "cpu",
                         strict: bool = True, **model_kwargs) -> HubGenerator:
        weights = _fetch(model_id, WEIGHTS, revision=revision, cache_dir=cache_dir, force_download=force_download,
                         local_files_only=local_files_only, token=token)
        if config is None:
            raise UserError(f"{model_id} has no readable {CONFIG}: it is not a generator exported by dcgan-export")
        kwargs = {**config, **model_kwargs}
        checkpoint.check_model_file(weights, {"generator": kwargs}, "generator", source=CONFIG)  # before allocation
        model = cls(**kwargs)
        model.load_state_dict(load_file(weights, device=map_location), strict=strict)
        return model.eval()

    def generate_model_card(self, *args, metadata: dict | None = None, eval_results: list[dict] = (),
                            **template) -> ModelCard:
        """The card of this generator: the class's metadata (library, tags) with `metadata` (datasets, licence,
        model name, ...), `eval_results` (dicts of `EvalResult`'s fields) as the model-index, and the template's
        text fields. `save_pretrained(..., model_card_kwargs=...)` and `push_to_hub` call it."""
        base, metadata = self._hub_mixin_info.model_card_data.to_dict(), dict(metadata or {})
        metadata["tags"] = sorted(set(base.get("tags") or []) | set(metadata.get("tags") or []))
        data = ModelCardData(**{**base, **metadata}, eval_results=[EvalResult(**r) for r in eval_results] or None)
        return ModelCard.from_template(card_data=data, template_str=self._hub_mixin_info.model_card_template,
                                       **template)


def _fetch(model_id: str, filename: str, **download) -> Path:
    """`filename` of a local folder or of a Hub repository (downloaded through huggingface_hub's cache)."""
    if os.path.isdir(model_id):
        path = Path(model_id) / filename
        if not path.is_file():
            raise UserError(f"{model_id} has no {filename}: it is not a generator exported by dcgan-export")
        return path
    try:
        return Path(hf_hub_download(repo_id=model_id, filename=filename, **download))
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as e:
        raise UserError(f"cannot fetch {filename} of {model_id} from the Hub: {str(e).splitlines()[0]}") from None


def is_folder(arg: str) -> bool:
    """Whether `arg` is a Hub-layout folder (config.json and model.safetensors, no checkpoint meta.json)."""
    path = Path(arg)
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file() \
        and not (path / "meta.json").exists()


def load_generator(arg: str, ema: bool = True) -> tuple[Generator, dict, bool]:
    """`checkpoint.load_generator` for a checkpoint, a run dir or a generator file, and `load` for a Hub folder
    (which holds one set of weights: `ema` does not apply): what `dcgan-sample` and `dcgan-eval` read."""
    return load(arg) if is_folder(arg) else checkpoint.load_generator(arg, ema)


def load(folder: str) -> tuple[HubGenerator, dict, bool]:
    """(generator in eval mode, a meta like a checkpoint's: its kwargs, step, whether EMA, dataset; whether EMA)
    from a Hub-layout folder, the step and dataset read from its card."""
    path = Path(folder) / CONFIG
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes, not a generator's config; use another folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object of generator kwargs; use another folder")
    generator = HubGenerator.from_pretrained(folder)
    about = read_card(Path(folder)).get("dcgan_dist", {})
    about = about if isinstance(about, dict) else {}
    meta = {"generator": config, "step": about.get("step"), "ema": bool(about.get("ema"))}
    if isinstance(about.get("data"), str):
        meta["config"] = {"data": {"name": about["data"]}}  # dcgan-eval's default reference (--data overrides)
    return generator, meta, meta["ema"]


def read_card(folder: Path) -> dict:
    """The metadata of `folder`'s model card ({} when it has none or it does not parse)."""
    try:
        return ModelCard.load(folder / CARD).data.to_dict()
    except Exception:  # noqa: BLE001 - a missing or hand-edited card only loses the step and dataset shown
        return {}


# --- export ------------------------------------------------------------------------------------------------------


def export(arg: str, out: str | Path, ema: bool = True, evals: list[str] = (), name: str | None = None,
           licence: str = "other") -> tuple[Path, int]:
    """Write the generator `checkpoint.choose_generator` picks from `arg` as a Hub-layout folder at the new
    directory `out`, its card holding the figures of the `dcgan-eval --json` files `evals` (each of this very
    checkpoint): (the weights file exported, its step). Written to a hidden sibling and renamed into place, so
    `out` is either absent or complete."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory; choose a new OUT_DIR")
    src, stem, meta = checkpoint.choose_generator(arg, ema=ema)
    ema = checkpoint.is_ema(stem, meta)
    results = [_read_eval(Path(p), meta["step"], ema) for p in evals]  # every file checked before anything is built
    generator = HubGenerator(**meta["generator"])
    generator.load_state_dict(checkpoint.load_tensors(src, stem))
    generator.eval()
    name = name or out.resolve().name
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generator.save_pretrained(tmp, model_card_kwargs=card_fields(meta, ema, name, licence, results))
        z, labels, nrow = sampling.class_grid(64, generator.latent_dim, generator.num_classes, seed=0)
        sample_files.save_grid(sampling.generate(generator, z, labels), tmp / GRID, nrow=nrow)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src / f"{stem}.safetensors", meta["step"]


def _read_eval(path: Path, step: int, ema: bool) -> dict:
    """A `dcgan-eval --json` file of the exported checkpoint (same step, same EMA choice), else a UserError."""
    try:
        report = json.loads(path.read_text())
        metrics, protocols = report["metrics"], report.get("protocol", {})
        scored = (report["step"], bool(report["ema"]))
        assert isinstance(metrics, dict) and isinstance(protocols, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise UserError(f"--eval {path}: not a dcgan-eval --json report ({type(e).__name__}: {e}); write one with "
                        "dcgan-eval CHECKPOINT --json FILE") from None
    if scored != (step, ema):
        raise UserError(f"--eval {path} scored step {scored[0]} ({_weights(scored[1])}), but the export is step {step} "
                        f"({_weights(ema)}); evaluate the checkpoint exported (dcgan-eval ... --json)")
    return report


def _weights(ema: bool) -> str:
    return "EMA weights" if ema else "raw generator weights"


def card_fields(meta: dict, ema: bool, name: str, licence: str, reports: list[dict]) -> dict:
    """What `HubGenerator.generate_model_card` takes for the generator of checkpoint `meta`: its metadata, its
    model-index (FID/KID of `reports`, each named with its protocol) and the card's text."""
    cfg, kwargs, step = meta.get("config", {}), meta["generator"], meta["step"]
    size = kwargs.get("image_size", 64)
    data = cfg.get("data", {}).get("name", "")
    info = DATASETS.get(data)
    conditional = kwargs.get("num_classes", 0) > 0
    world, batch = meta.get("world_size", 1), meta.get("batch_size")
    seen = step * world * batch if isinstance(batch, int) and isinstance(world, int) else None
    metadata = {"model_name": name, "license": licence, "tags": ["dcgan", "gan", "image-generation", data or "custom"]
                + (["class-conditional"] if conditional else []),
                "datasets": [info.hub] if info and info.hub else None,
                "pipeline_tag": None if conditional else PIPELINE,
                "dcgan_dist": {"step": step, "ema": ema, "data": data or None, "images_seen": seen}}
    fid_rows, own_rows, results, published = [], [], [], []
    for r in reports:
        for space, protocol in r.get("protocol", {}).items():
            for key, label in (("fd", "FID"), ("kid", "KID")):
                value = r["metrics"].get(f"{space}/{key}")
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                note = protocol.get("note", "")
                fid_rows.append(f"| {label} | {value:.4g} | {note} |")
                best = LUCIC_BEST.get(protocol.get("reference"), {}) if protocol.get("protocol") == "lucic" else {}
                if key == "fd" and best:
                    published.append(f"Under this protocol Lucic et al. 2018 (\"Are GANs Created Equal?\") report best "
                                      f"FIDs on {protocol['reference']} of " +
                                      ", ".join(f"{v} ({k})" for k, v in best.items()) + ".")
                results.append({"task_type": PIPELINE, "dataset_type": info.hub if info and info.hub else data,
                                "dataset_name": data, "dataset_split": protocol.get("split"),
                                "metric_type": label.lower(), "metric_value": round(float(value), 6),
                                "metric_name": f"{label} ({note})"})
        for key, value in r["metrics"].items():
            name_ = key.split("/", 1)[1]
            if key.startswith("classifier/") and isinstance(value, (int, float)):
                label = "real-vs-real floor" if name_ == "fd_floor" else METRICS[name_].label if name_ in METRICS \
                    else name_
                own_rows.append(f"| {label} | {value:.4g} | {r['num']} samples, seed {r.get('seed')} |")
    imports = "\n".join(f"from dcgan_dist.{m} import {n}" for m, n in (("hub", "HubGenerator"),
                                                                      ("gan.sampling", "draw")))
    return {"metadata": metadata, "eval_results": results, "model_name": name, "repo_id": f"USER/{name}",
            "imports": imports,
            "summary": _summary(kwargs, data, info, step, seen, ema),
            "grid_caption": "64 samples of seeded noise (seed 0)" if not conditional else
                            "one row per class, each column one z (seed 0)",
            "labels_note": "; labels: class i mod K" if conditional else "",
            "shape": f"[64, {kwargs.get('channels', 1)}, {size}, {size}]",
            "quality": _quality(fid_rows + ([""] + published if published else []), own_rows),
            "training": _training(cfg, meta), "weights": _weights(ema),
            "licence": licence if licence != "other" else "not stated by the exporter (`dcgan-export --license`); "
                       f"the weights derive from {data or 'the training images'}, whose own terms apply"}


def _summary(kwargs: dict, data: str, info, step: int, seen: int | None, ema: bool) -> str:
    k = kwargs.get("num_classes", 0)
    kind = f"class-conditional ({k} classes, {kwargs.get('cond')} labels) " if k else ""
    size, ch = kwargs.get("image_size", 64), kwargs.get("channels", 1)
    about = f" The data: {info.about}." if info else ""
    images = f" ({seen:,} images seen)" if seen else ""
    return (f"A {kind}{kwargs.get('arch', 'dcgan').upper()} generator ({size}x{size}, {ch} channel{'s' * (ch > 1)}, "
            f"z of {kwargs.get('latent_dim')}, width {kwargs.get('width')}) trained with dcgan_dist on "
            f"`{data or 'unknown data'}` to step {step:,}{images}; these are its {_weights(ema)}.{about}")


def _quality(fid_rows: list[str], own_rows: list[str]) -> str:
    if not fid_rows and not own_rows:
        return ("Not measured at export. Score the checkpoint with `dcgan-eval CHECKPOINT --protocol lucic --json "
                "eval.json` (or `--protocol standard`) and export again with `--eval eval.json`.")
    text = ["| metric | value | protocol (weights, samples, reference) |", "|---|---|---|", *fid_rows] \
        if fid_rows else ["No FID was measured (dcgan-eval found no TF-Inception weights)."]
    if own_rows:
        text += ["", "dcgan_dist's own classifier-space figures (a cheap signal during training, comparable with "
                 "nothing outside dcgan_dist):", "", "| metric | value | samples |", "|---|---|---|", *own_rows]
    return "\n".join(text)


def _training(cfg: dict, meta: dict) -> str:
    t, m, o, loss = (cfg.get(k, {}) for k in ("train", "model", "optim", "loss"))
    rows = {"steps": meta.get("step"), "ranks x batch per rank": f"{meta.get('world_size')} x {meta.get('batch_size')}",
            "loss": f"{loss.get('name')} (G: {loss.get('g_loss')}, real target {loss.get('real_target')})"
            if loss else None,
            "optimizer": f"Adam, lr G {o.get('lr_g')} / D {o.get('lr_d')}, betas ({o.get('beta1')}, {o.get('beta2')})"
            if o else None,
            "EMA": f"decay {m['ema']['decay']}, from step {m['ema'].get('warmup_steps')}"
            if isinstance(m.get("ema"), dict) and m["ema"].get("decay") else "none",
            "augmentation": (t.get("augment") or "none") if t else None,
            "mixed precision": t.get("mixed_precision"), "seed": t.get("seed")}
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items() if v is not None)])
