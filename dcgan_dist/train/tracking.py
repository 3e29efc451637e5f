"""Where scalars and images go: `metrics.jsonl` always, W&B and TensorBoard through accelerate's trackers.

Only global rank 0 writes (accelerate's `init_trackers` and `log` run on the main process alone). W&B is
an optional witness: if it cannot start or fails later, one warning is printed and training goes on with
the local files.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dcgan_dist import checkpoint, sample_files
from dcgan_dist.data.batches import to_model_range
from dcgan_dist.errors import UserError
from dcgan_dist.gan import sampling
from dcgan_dist.recipe import save_config
from dcgan_dist.registry import HIGHER_IS_BETTER, LOWER_IS_BETTER, METRIC_SPACES


def wandb_mode(mode: str) -> str:
    """`auto`: WANDB_MODE if set, else online when credentials are present, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if _has_credentials() else "offline"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def log_with(cfg) -> list[str]:
    """The accelerate tracker names a config asks for (given to `Accelerator(log_with=...)`)."""
    names = ["tensorboard"] if cfg.log.tensorboard else []
    if cfg.log.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return names + (["wandb"] if wandb_mode(cfg.log.wandb.mode) != "disabled" else [])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def prepare_run_dir(cfg, step: int, overwrite: bool) -> None:
    """Rank 0, before logging: `--overwrite` clears a previous run; config.yaml is written; metrics.jsonl keeps
    only the lines up to `step` (the checkpoint resumed from), since the steps after it are logged again."""
    run_dir = cfg.run_dir
    if overwrite:
        for name in ("checkpoints", "samples", "wandb", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "curves.png").unlink(missing_ok=True)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        metrics.write_text("".join(ln + "\n" for ln in keep))


def run_config(cfg, world_size: int) -> dict:
    """What the trackers record about a run: the resolved config, the launch and the versions."""
    import accelerate
    import torch

    return {**asdict(cfg), "world_size": world_size, "global_batch": cfg.train.batch_size * world_size,
            "precision": cfg.train.mixed_precision, "torch": torch.__version__,
            "accelerate": accelerate.__version__, "git_commit": git_commit()}


class Tracker:
    """metrics.jsonl plus the accelerate trackers; every method is a no-op off the main process.

    W&B gets no `step=`: it drops a log call whose step is below the run's current step, which is what the
    steps re-run after resuming from a crash are. Each call takes W&B's next internal step instead, and the
    training step is the `step` metric, the x-axis of every panel. The run id is kept in `wandb/run_id`
    from the start, so a job that crashes before its first checkpoint is continued in the same run.
    """

    def __init__(self, accelerator, cfg, run_dir: Path, run_config: dict, resume_id: str | None):
        self.acc, self.main, self.run_dir = accelerator, accelerator.is_main_process, run_dir
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if self.main else None
        self.wandb_run, self.log_checkpoints, self.curves = None, cfg.log.wandb.log_checkpoints, cfg.log.curves
        if not self.main or not accelerator.log_with:
            return
        w = cfg.log.wandb
        mode = wandb_mode(w.mode)
        id_file = run_dir / "wandb" / "run_id"  # removed with the run's wandb/ by --overwrite
        if resume_id is None and id_file.is_file():
            resume_id = id_file.read_text().strip() or None
        init = {"wandb": {"mode": mode, "dir": str(run_dir), "name": w.name or cfg.run.name, "entity": w.entity or None,
                          "group": w.group or None, "tags": list(w.tags) or None, "resume": "allow",
                          **({"id": resume_id} if resume_id else {})}}
        try:
            accelerator.init_trackers(w.project, config=run_config, init_kwargs=init)
        except Exception as e:  # an external service: whatever it raises must not stop training
            self._drop_wandb(f"W&B could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return
        if "wandb" in [t.name for t in accelerator.trackers]:
            self.wandb_run = accelerator.get_tracker("wandb", unwrap=True)
            self.wandb_run.define_metric("step")
            for space in METRIC_SPACES:  # the run summary keeps each evaluation metric's best value
                for name in LOWER_IS_BETTER + HIGHER_IS_BETTER:
                    self.wandb_run.define_metric(f"eval/{space}/{name}", step_metric="step",
                                                 summary="min" if name in LOWER_IS_BETTER else "max")
            self.wandb_run.define_metric("*", step_metric="step")  # `step` is the x-axis of every panel
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.wandb_run.id + "\n")
            if mode == "offline" and w.mode == "auto":
                print(f"W&B: no credentials, logging offline to {run_dir / 'wandb'}; upload later with "
                      f"`wandb sync {run_dir / 'wandb'}/offline-run-*`", flush=True)

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self.metrics.log(record)
        for tracker in self.acc.trackers:
            if tracker.name != "wandb":  # TensorBoard: the training step is its step
                tracker.log(record, step=record["step"])
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(record)  # no step= (see the class docstring); record["step"] is the x-axis
            except Exception as e:  # W&B failing mid-run: keep training, keep the local log
                self._drop_wandb(f"W&B logging failed ({type(e).__name__}: {e})")

    def log_image(self, key: str, grid: np.ndarray, step: int) -> None:
        """`grid`: uint8 [H, W, C]."""
        if not self.main:
            return
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(key, grid, global_step=step, dataformats="HWC")
        if self.wandb_run is None:
            return
        import wandb

        try:
            self.wandb_run.log({key: wandb.Image(grid), "step": step})
        except Exception as e:  # as in log()
            self._drop_wandb(f"W&B image logging failed ({type(e).__name__}: {e})")

    def log_data(self, data, num: int) -> None:
        """Rank 0: a grid of the batch source's first `num` images (what the data looks like)."""
        if self.main:
            self.log_image("samples/real", sampling.grid_array(to_model_range(data.first(num))), step=0)

    def log_samples(self, generator, z, y, nrow: int, step: int) -> None:
        """Rank 0: the grid of `generator` (eval mode: no collectives) on fixed noise `z` (and labels `y`) ->
        samples/step-N.png and the trackers."""
        if not self.main:
            return
        images = sampling.generate(generator, z, y)
        sample_files.save_grid(images, self.run_dir / "samples" / f"step-{step:08d}.png", nrow)
        self.log_image("samples/fixed_noise", sampling.grid_array(images, nrow), step=step)

    def log_eval(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """An evaluation during training -> eval/* (and eval/seconds); its headline numbers printed."""
        self.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}, "eval/seconds": seconds})
        shown = [k for k in metrics if k.split("/")[1] in ("fd", "fd_floor", "coverage", "confidence",
                                                           "class_accuracy")]
        if self.main:
            print(f"eval at step {step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown), flush=True)

    def draw_curves(self) -> None:
        """log.curves, rank 0, at the end of a run: every metric of metrics.jsonl -> run_dir/curves.png. Drawing
        is a convenience: a failure is one warning, and the run ends as it would have."""
        if not self.main or not self.curves:
            return
        from dcgan_dist import plot

        out = self.run_dir / "curves.png"
        try:
            plot.write([self.run_dir], out)
        except Exception as e:  # matplotlib missing or failing, a damaged metrics.jsonl: the run itself is done
            print(f"warning: could not draw {out} ({type(e).__name__}: {e}); draw it later with "
                  f"`dcgan-plot {self.run_dir} --out curves.png`", file=sys.stderr, flush=True)
            return
        print(f"curves: {out}", flush=True)

    def mark_preempting(self) -> None:
        """A stop signal arrived: W&B marks the run preempting (it is resumed by the requeued job)."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.mark_preempting()
            except Exception as e:  # as in log()
                self._drop_wandb(f"W&B mark_preempting failed ({type(e).__name__}: {e})")

    def log_generator(self, ckpt_dir: Path, alias: str) -> None:
        """log.wandb.log_checkpoints: the checkpoint's generator (`checkpoint.choose_generator`'s: EMA if saved,
        else raw) and meta.json as a W&B model artifact, with `alias` ("final" or "best") and the step."""
        if self.wandb_run is None or not self.log_checkpoints:
            return
        import wandb

        try:
            ckpt_dir, stem, _ = checkpoint.choose_generator(str(ckpt_dir))
            artifact = wandb.Artifact(f"generator-{self.wandb_run.id}", type="model",
                                      metadata={"checkpoint": ckpt_dir.name, "weights": stem})
            artifact.add_file(str(ckpt_dir / f"{stem}.safetensors"), name=f"{stem}.safetensors")
            artifact.add_file(str(ckpt_dir / "meta.json"), name="meta.json")
            self.wandb_run.log_artifact(artifact, aliases=[alias, ckpt_dir.name])
        except Exception as e:  # as in log()
            self._drop_wandb(f"W&B artifact upload failed ({type(e).__name__}: {e})")

    def _drop_wandb(self, why: str) -> None:
        print(f"warning: {why}; continuing with metrics.jsonl only", file=sys.stderr, flush=True)
        self.acc.trackers = [t for t in self.acc.trackers if t.name != "wandb"]
        self.wandb_run = None

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


class MetricsLog:
    """Appends one JSON line per logged step; opened only on the main process."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps every full line

    def log(self, record: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._file.close()


def describe_run(cfg, data, world: int, device_type: str) -> str:
    """What a run prints first: the model, the data (`data`: the batch source), the launch, the run dir."""
    m, t = cfg.model, cfg.train
    conditional = f", conditional on {m.num_classes} classes ({m.cond})" if m.num_classes else ""
    return (f"dcgan_dist: {m.arch} {m.image_size}x{m.image_size}{conditional} on {cfg.data.name} "
            f"({data.num_items} images, {data.batches_per_epoch} batches/epoch)\n"
            f"  world size {world} ({device_type}), batch {t.batch_size}/rank = {t.batch_size * world} global, "
            f"precision {t.mixed_precision}, {t.steps} steps, run dir {cfg.run_dir}")


def show(bar, line: str, main: bool, progress: bool) -> None:
    """An interval's `format_line` on rank 0 (`main`): on the bar, or printed when there is none (log.progress)."""
    if main:
        bar.set_postfix_str(line.split("  ", 1)[1])
        if not progress:
            print(line, flush=True)


def format_line(step: int, steps: int, record: dict) -> str:
    """The short progress text printed on the bar and in logs."""
    return (f"step {step}/{steps}  loss D {record['loss/D']:.3f} G {record['loss/G']:.3f}  "
            f"D(x) {record['D/real']:.2f} D(G(z)) {record['D/fake_before']:.2f}  "
            f"{record['perf/img_per_s']:.0f} img/s")
