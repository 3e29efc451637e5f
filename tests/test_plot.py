"""dcgan-plot and run_dir/curves.png: every logged metric of real runs drawn into one PNG, runs overlaid; a damaged
or empty metrics.jsonl is one line, not a traceback."""

import json

import pytest
from PIL import Image

from conftest import assert_ok, run_main, run_train
from dcgan_dist import plot


@pytest.fixture
def cli(capsys):
    """dcgan-plot, run in this process."""
    return lambda *args: run_main(capsys, "plot_main", *map(str, args))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs: a conditional one on MNIST's digits evaluated during training (eval/classifier/*, the
    requested-class accuracy and class shares) that draws its curves at the end, and an unconditional smoke run
    with another global batch."""
    root = tmp_path_factory.mktemp("runs")
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={root / 'digits'}", "data.name=mnist5k",
                        "model.num_classes=10", "train.steps=8", "train.eval_every=4", "train.eval_num=64",
                        "log.curves=true"))
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={root / 'shapes'}", "train.batch_size=8"))
    return root / "digits", root / "shapes"


def test_two_runs_in_one_png_with_every_metric(runs, tmp_path, cli):
    digits, shapes = runs
    assert Image.open(digits / "curves.png").size[0] > 800  # log.curves: drawn at the end of the run
    assert not (shapes / "curves.png").exists()  # smoke.yaml turns it off

    out = tmp_path / "both.png"
    proc = cli(str(digits), str(shapes), "--out", str(out))
    assert_ok(proc)
    assert f"wrote {out}" in proc.stdout
    image = Image.open(out)
    assert image.format == "PNG" and image.size[0] > 1000 and image.size[1] > 1000

    panels = plot.series([digits, shapes])
    drawn = {key: set(by_run) for keys in panels.values() for key, by_run in keys.items()}
    for run in (digits, shapes):  # every numeric key of every record has its line
        for record in plot.read_metrics(run):
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    assert run.name in drawn[key], key
    titles = [title for title, _ in panels]
    for wanted in ("losses", "D(x), D(G(z)), D accuracy", "throughput", "requested-class accuracy (classifier space)",
                   "class shares (smallest, largest) (classifier space)", "Fréchet distance + real floor "
                   "(classifier space)"):
        assert wanted in titles
    assert titles.index("losses") < titles.index("requested-class accuracy (classifier space)")
    assert {"eval/classifier/fd", "eval/classifier/fd_floor"} == set(
        panels[("Fréchet distance + real floor (classifier space)", "Fréchet distance")])


def test_a_torn_last_line_is_left_out(runs, tmp_path, cli):
    run = tmp_path / "torn"
    run.mkdir()
    lines = (runs[1] / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(lines + '{"step": 16, "loss/D": 0.')  # killed while writing a line
    assert [r["step"] for r in plot.read_metrics(run)] == [r["step"] for r in plot.read_metrics(runs[1])]
    assert_ok(cli(str(run), "--out", str(tmp_path / "torn.png")))


@pytest.mark.parametrize("content,message", [
    ("", "holds no complete record"),
    ('{"step": 4, "loss/D": 1.0}\nnot json\n{"step": 8, "loss/D": 0.9}\n', "metrics.jsonl:2 is not a metrics record"),
    ('[1, 2]\n', "metrics.jsonl:1 is not a metrics record"),
    ('{"loss/D": 1.0}\n', "metrics.jsonl:1 is not a metrics record"),
    (None, "has no metrics.jsonl"),
])
def test_a_damaged_or_empty_metrics_file_is_one_line(tmp_path, content, message, cli):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    proc = cli(str(run), "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and not (tmp_path / "x.png").exists()


def test_out_must_be_a_png(runs, tmp_path, cli):
    proc = cli(str(runs[1]), "--out", str(tmp_path / "x.jpg"))
    assert proc.returncode == 2 and "the curves are a .png file" in proc.stderr


def test_fid_is_drawn_against_training_minutes(tmp_path, cli):
    """The minutes of a step are the logged per-step times summed over the intervals before it (a resumed run's
    repeated interval counted once); FID gets a panel against them besides its panel against steps."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 100, "perf/step_time": 0.6}, {"step": 200, "perf/step_time": 1.2},
               {"step": 200, "eval/inception/fd": 40.0}, {"step": 200, "perf/step_time": 0.6},  # resumed
               {"step": 300, "perf/step_time": 0.6}, {"step": 300, "eval/inception/fd": 20.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    panels = plot.series([run])
    assert panels[plot.TIME_PANEL]["eval/inception/fd"]["run"] == [(2.0, 40.0), (3.0, 20.0)]
    assert panels[("FID (inception space)", "FID")]["eval/inception/fd"]["run"] == [(200, 40.0), (300, 20.0)]
    assert_ok(cli(str(run), "--out", str(tmp_path / "c.png")))
