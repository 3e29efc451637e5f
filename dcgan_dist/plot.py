"""Training curves as one PNG, from the run directories' `metrics.jsonl`: `dcgan-plot RUN [RUN ...] --out FILE.png`,
and `run_dir/curves.png` at the end of a run (log.curves).

Every logged metric gets a panel: the losses; D(x), D(G(z)) and D's accuracy; gradient norms; throughput; step and
data time; learning rates; non-finite steps; then each `eval/*` metric (FID, KID, the classifier figures, a
conditional model's requested-class accuracy and class shares), FID once more against the minutes of training
(the steps' own time, from perf/step_time: how fast a recipe gets to its FID), and anything else logged.
The x-axis is the training step, with images seen on the top axis when every run has the same global batch
(else images seen is the x-axis). Several runs are overlaid, one colour each, named by their directory. A
logarithmic y-axis where the values are positive and span more than a factor of 30.
matplotlib's headless Agg backend: no display needed.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from dcgan_dist import checkpoint
from dcgan_dist.errors import UserError
from dcgan_dist.registry import METRICS

# panel title, unit and y-scale rule by key prefix; keys not listed get a panel of their own
_GROUPS = {
    "loss/": ("losses", "loss (nats)"),
    "D/": ("D(x), D(G(z)), D accuracy", "probability"),
    "grad_norm/": ("gradient norms", "L2 norm"),
    "perf/img_per_s": ("throughput", "images/s"),
    "perf/": ("time per step", "seconds"),
    "lr/": ("learning rates", "lr"),
    "train/": ("non-finite steps", "steps (total)"),
}
_SERIES = {"D/real": "D(x)", "D/fake_before": "D(G(z)) before G's step", "D/fake_after": "D(G(z)) after G's step",
           "D/accuracy": "D accuracy", "fd_floor": "real-vs-real floor", "class_share_min": "smallest",
           "class_share_max": "largest"}
_STYLES = ("-", "--", ":", "-.")
LOG_SPAN = 30  # a log y-axis when the positive values span more than this factor
TIME_PANEL = ("FID against training time", "FID")  # x: minutes of training steps, not steps


def read_metrics(run: Path) -> list[dict]:
    """The records of `run/metrics.jsonl` (non-finite values as floats). A torn last line (a run killed while
    writing it) is left out; an empty file or any other line that is not a JSON object is a UserError."""
    path = run / "metrics.jsonl"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{run} has no metrics.jsonl: not a run directory, or it logged nothing yet") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # the text after the last newline: "" unless a write was cut off
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{n} is not a metrics record (a JSON object with an integer step): "
                            f"{line[:60]!r}; remove the line or the file")
        records.append({k: _number(v) for k, v in record.items()})
    if not records:
        raise UserError(f"{path} holds no complete record{' (only a torn line)' if torn else ''}: nothing to plot yet")
    return records


def _number(value):
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):  # how MetricsLog writes non-finite values
        return float(value)
    return value


def global_batch(run: Path) -> int | None:
    """Images per step of `run` (ranks x batch per rank, from its latest checkpoint), None when unknown."""
    try:
        latest = checkpoint.latest_checkpoint(run / "checkpoints")
        meta = checkpoint.read_meta(latest, verify=False) if latest else {}
    except UserError:
        return None
    batch, world = meta.get("batch_size"), meta.get("world_size")
    return batch * world if isinstance(batch, int) and isinstance(world, int) else None


def _panel(key: str) -> tuple[str, str]:
    """(panel title, y label) of a metric key."""
    for prefix, panel in _GROUPS.items():
        if key.startswith(prefix):
            return panel
    if key == "eval/seconds":
        return "evaluation time", "seconds"
    if key.startswith("eval/") and key.count("/") == 2:  # eval/<space>/<metric>
        _, space, name = key.split("/")
        name = {"fd_floor": "fd", "class_share_max": "class_share_min"}.get(name, name)  # drawn with their pair
        label = {"class_share_min": "class shares (smallest, largest)", "fd": "Fréchet distance + real floor",
                 "class_accuracy": "requested-class accuracy"}.get(
            name, METRICS[name].label if name in METRICS else name)
        if space == "inception":  # TF-Inception: the standard FID/KID
            label = {"fd": "FID", "kid": "KID"}.get(name, label)
        return f"{label} ({space} space)", label.split(" (")[0].split(" +")[0]
    return key, key.rsplit("/", 1)[-1]


def _order(panel: tuple[str, str]) -> tuple[int, str]:
    """Training panels first (in _GROUPS' order), then FID/KID, the other eval panels, then the rest."""
    groups = list(dict.fromkeys(_GROUPS.values()))
    title = panel[0]
    if panel in groups:
        return groups.index(panel), ""
    rank = 1 if "(inception space)" in title or panel == TIME_PANEL else 2 if " space)" in title else \
        3 if title == "evaluation time" else 4
    return len(groups) + rank, title


def series(runs: list[Path]) -> dict[str, dict[str, dict[str, list]]]:
    """{panel: {key: {run name: [(step, value), ...]}}} of every numeric metric, panels in reading order."""
    names = _names(runs)
    panels: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    for run, name in zip(runs, names):
        points: dict[str, dict[int, float]] = defaultdict(dict)
        for record in read_metrics(run):
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    points[key][record["step"]] = float(value)  # a step logged twice: its last value
        for key, by_step in points.items():
            panels[_panel(key)][key][name] = sorted(by_step.items())
        minutes = training_minutes(points.get("perf/step_time", {}))
        if minutes and "eval/inception/fd" in points:  # how fast the recipe gets there, not only where it ends
            panels[TIME_PANEL]["eval/inception/fd"][name] = [
                (minutes[max((s for s in minutes if s <= step), default=min(minutes))], value)
                for step, value in sorted(points["eval/inception/fd"].items())]
    return dict(sorted(panels.items(), key=lambda kv: _order(kv[0])))


def training_minutes(step_time: dict[int, float]) -> dict[int, float]:
    """{step: minutes of training up to it} from the logged per-step times ({interval's last step: seconds per
    step}): the steps' own time, set-up, evaluations, sample grids and checkpoints left out."""
    out, total, last = {}, 0.0, 0
    for step, seconds in sorted(step_time.items()):
        total, last = total + seconds * (step - last), step
        out[step] = total / 60
    return out


def run_training_minutes(run: Path) -> float | None:
    """A run's training minutes from its metrics.jsonl (`training_minutes` at its last logged step; a resumed
    run's repeated steps counted once), or None without one."""
    if not (run / "metrics.jsonl").is_file():
        return None
    minutes = training_minutes({r["step"]: r["perf/step_time"] for r in read_metrics(run) if "perf/step_time" in r})
    return max(minutes.values()) if minutes else None


def _names(runs: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    short = [r.resolve().name for r in runs]
    return [n if short.count(n) == 1 else str(r) for n, r in zip(short, runs)]


def _count(x: float, _pos=None) -> str:
    """An axis tick as a count: 950, 12k, 1.5M."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def write(runs: list[Path], out: Path) -> Path:
    """Draw every metric of `runs` into the PNG `out` (written atomically); returns `out`."""
    import matplotlib

    matplotlib.use("Agg")  # headless: compute nodes have no display
    import matplotlib.pyplot as plt

    if out.suffix != ".png":
        raise UserError(f"--out {out}: the curves are a .png file")
    runs = [Path(r) for r in runs]
    panels = series(runs)
    names = _names(runs)
    per_step = {n: global_batch(r) for n, r in zip(names, runs)}
    known = None not in per_step.values()
    batch = next(iter(per_step.values())) if known and len(set(per_step.values())) == 1 else None
    images = known and not batch  # the runs' global batches differ: images seen is the x-axis
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for ax, ((title, unit), keys) in zip(axes.flat, panels.items()):
        values = []
        for style, (key, by_run) in zip(_STYLES * 8, keys.items()):
            for name, points in by_run.items():
                scale = per_step[name] if images and (title, unit) != TIME_PANEL else 1
                xs, ys = [s * scale for s, _ in points], [v for _, v in points]
                short = key.rsplit("/", 1)[-1]
                label = _SERIES.get(key, _SERIES.get(short, short))
                label = (name if len(keys) == 1 else f"{name}: {label}") if len(names) > 1 else label
                ax.plot(xs, ys, style, color=colours[name] if len(names) > 1 else None, label=label, lw=1.3,
                        marker="." if len(points) < 30 else None)
                values += [v for v in ys if math.isfinite(v)]
        if values and min(values) > 0 and max(values) / min(values) > LOG_SPAN and not title.startswith("D("):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        timed = (title, unit) == TIME_PANEL
        ax.set_xlabel("training minutes (the steps' own time)" if timed else "images seen" if images else "step",
                      fontsize=9)
        ax.xaxis.set_major_formatter(_count)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or len(names) > 1:
            ax.legend(fontsize=7, loc="best")
        if batch and not timed:
            top = ax.secondary_xaxis("top", functions=(lambda s, b=batch: s * b, lambda i, b=batch: i / b))
            top.xaxis.set_major_formatter(_count)
            top.tick_params(labelsize=7)
            top.set_xlabel(f"images seen (x{batch:,} per step)", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(", ".join(names), fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
