"""The seams: a checkpoint of the first format still loads, samples and resumes; a meta.json that disagrees
with its tensors is refused by every reader before any model is built; config imports no torch; the
package holds no test hook; the repository cites only what it holds."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, assert_ok, run_train
from dcgan_dist import checkpoint
from dcgan_dist.data.batches import InMemoryBatches
from dcgan_dist.errors import UserError

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_v1_smoke_ema"  # written by the first format (smoke, EMA 0.9)
FIXTURE_ARGS = ["--config", "configs/smoke.yaml", "model.ema.decay=0.9", "train.seed=3"]


# --- the committed checkpoint of the first format -----------------------------------------------------


def test_first_format_checkpoint_loads_and_samples(tmp_path, cli):
    meta = checkpoint.read_meta(FIXTURE)  # hashes and tensors against meta.json
    assert meta["format_version"] == 1 and meta["step"] == 6 and meta["data"] == {"epoch": 0, "position": 6}
    from dcgan_dist.checkpoint import load_generator

    generator, _, ema = load_generator(str(FIXTURE))
    assert ema and generator.latent_dim == 16
    proc = cli("sample_main", str(FIXTURE), "--num", "5", "--out", str(tmp_path / "x.npz"))
    assert_ok(proc)
    assert np.load(tmp_path / "x.npz")["arr_0"].shape == (5, 32, 32, 1)


def test_first_format_checkpoint_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "checkpoints" / "step-00000006")
    proc = run_train(*FIXTURE_ARGS, f"run.dir={run}", "train.steps=12",
                     f"train.resume={run / 'checkpoints'}/step-00000006")
    assert_ok(proc)
    assert "at step 6 (epoch 0)" in proc.stdout and "the data order and noise change" not in proc.stdout
    final = checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))
    assert final["step"] == 12 and final["data"]["position"] == 12
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 12


# --- meta.json against the tensors -------------------------------------------------------------------

EDITS = {"width": ("generator", "width", 100000), "image size": ("generator", "image_size", 64),
         "latent size": ("generator", "latent_dim", 17), "channels": ("discriminator", "channels", 3),
         "classes": ("generator", "num_classes", 10), "spectral norm": ("discriminator", "spectral_norm", True)}


def _edited(tmp_path, edit: str):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000006"
    shutil.copytree(FIXTURE, ckpt)
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    meta = json.loads((ckpt / "meta.json").read_text())
    model, key, value = EDITS[edit]
    meta[model][key] = value
    if edit == "channels":  # a channel count in G and D alike
        meta["generator"]["channels"] = value
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return run, ckpt


@pytest.mark.parametrize("edit", list(EDITS))
def test_meta_json_that_disagrees_with_the_tensors_is_refused_in_process(tmp_path, edit):
    _, ckpt = _edited(tmp_path, edit)
    with pytest.raises(UserError, match=r"does not match meta.json's (generator|discriminator)"):
        checkpoint.read_meta(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("command", ["dcgan-sample", "dcgan-eval", "dcgan-export", "resume"])
def test_meta_json_that_disagrees_with_the_tensors_is_refused_by_every_reader(tmp_path, edit, command, cli):
    run, ckpt = _edited(tmp_path, edit)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    if command == "dcgan-sample":
        proc = cli("sample_main", str(run), "--num", "4", "--out", str(tmp_path / "x.npz"))
    elif command == "dcgan-eval":
        proc = cli("eval_main", str(ckpt), "--num", "8")
    elif command == "dcgan-export":
        proc = cli("export_main", str(ckpt), str(tmp_path / "export"))
    else:
        proc = run_train(*FIXTURE_ARGS, f"run.dir={run}", "train.steps=12")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert re.search(r"does not match meta.json's (generator|discriminator)", proc.stderr), proc.stderr
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # nothing overwritten
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "export").exists()


def test_meta_json_kwargs_of_the_wrong_kind_are_refused(tmp_path):
    _, ckpt = _edited(tmp_path, "width")
    meta = json.loads((ckpt / "meta.json").read_text())
    for bad in ({"width": "8"}, {"depth": 3}, {"image_size": 48}, {"norm": "layer"}, {"num_classes": -1},
                {"num_classes": 10**9}, {"cond": "film"}, {"spectral_norm": "yes"},
                {"num_classes": 3, "arch": "mlp"}):
        edited = {**meta, "generator": {**meta["generator"], "width": 8, **bad}}
        (ckpt / "meta.json").write_text(json.dumps(edited))
        with pytest.raises(UserError, match="meta.json"):
            checkpoint.read_meta(ckpt)


# --- the batch source -------------------------------------------------------------------------------


def test_in_memory_batches_keep_labels_with_their_images_and_resume():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous()
    labels = torch.arange(40) % 10
    a = InMemoryBatches(images, labels, batch_size=4, rank=1, world_size=2, seed=5, num_classes=10)
    assert (a.num_items, a.channels, a.image_size, a.num_classes, a.batches_per_epoch) == (40, 1, 2, 10, 5)
    for _ in range(7):  # into the second epoch
        x, y = next(a)
        assert x.dtype == torch.uint8 and x.shape == (4, 1, 2, 2) and y.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0].long() % 10, y)  # each label stays with its image
    state = a.state_dict()
    b = InMemoryBatches(images, labels, batch_size=4, rank=1, world_size=2, seed=5, num_classes=10)
    assert b.load_state_dict(state) and b.epoch == 1
    assert all(torch.equal(next(a)[0], next(b)[0]) for _ in range(5))
    one = InMemoryBatches(images, None, batch_size=8, seed=5)  # another layout: the same share of the epoch
    assert not one.load_state_dict(state) and one.state_dict()["position"] == 2 and next(one)[1] is None


# --- the rules of the house -------------------------------------------------------------------------


def test_importing_the_config_loads_no_torch():
    code = ("import sys, dcgan_dist.recipe, dcgan_dist.config, dcgan_dist.registry; "
            "print(sorted(m for m in sys.modules if m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_reads_no_test_variable():
    for path in (REPO / "dcgan_dist").rglob("*.py"):
        assert not re.search(r"DCGAN_TEST|FAULT_", path.read_text()), path


def test_the_repository_cites_only_what_it_holds():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"SEED\.md|DESIGN\.md|\.\./shared|STYLE\.md")
    cited = [f"{name}:{n}" for name in tracked if not name.startswith("tests/fixtures/")
             and (REPO / name).is_file() and name != "tests/test_structure.py"
             for n, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
             if pattern.search(line)]
    assert not cited, cited
    for name in tracked:  # every docs/*.md link inside the repository resolves
        if name.endswith(".md"):
            for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", (REPO / name).read_text()):
                assert (REPO / name).parent.joinpath(target).exists(), f"{name} links to missing {target}"


PACKAGE = REPO / "dcgan_dist"


def _imported_modules(text: str) -> set[str]:
    """The package modules a file imports, as paths under dcgan_dist/ without .py (e.g. "gan/models")."""
    found = set()
    for dotted, names in re.findall(r"^\s*from dcgan_dist((?:\.\w+)*) import (\([^)]*\)|[^\n#]+)", text, flags=re.M):
        base = dotted.strip(".").replace(".", "/")
        if base and (PACKAGE / f"{base}.py").is_file():
            found.add(base)
            continue
        for name in re.findall(r"\w+", re.sub(r"\s+as\s+\w+", "", names)):
            path = f"{base}/{name}" if base else name
            if (PACKAGE / f"{path}.py").is_file():
                found.add(path)
    found |= {m.replace(".", "/") for m in re.findall(r"^\s*import dcgan_dist\.([\w.]+)", text, flags=re.M)}
    return found


def test_modules_import_only_those_above_them_in_the_architecture_table():
    """docs/ARCHITECTURE.md's table is the layering: a module may import only the modules listed above it, and the
    modules of one folder stand together in it, so no folder imports a folder listed below it either."""
    table = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    order = re.findall(r"^\| `([\w/]+)\.py` \|", table, flags=re.M)
    modules = {str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert set(order) == modules and len(order) == len(modules), sorted(set(order) ^ modules)
    for folder in {m.split("/")[0] for m in order if "/" in m}:  # each folder's rows in one block
        rows = [i for i, m in enumerate(order) if m.startswith(folder + "/")]
        assert rows == list(range(rows[0], rows[-1] + 1)), f"{folder}/'s rows are not together in the table"
    for i, name in enumerate(order[:-1]):  # cli (last) imports everything, inside each command
        imported = _imported_modules((PACKAGE / f"{name}.py").read_text())
        above = set(order[:i])
        assert imported <= above, f"{name}.py imports {sorted(imported - above)}, listed below it"
    assert _imported_modules("from dcgan_dist.gan import models as M\nfrom dcgan_dist import checkpoint") == {
        "gan/models", "checkpoint"}  # the reader itself


def test_data_takes_config_sections_as_plain_objects_and_imports_neither_config_nor_train():
    for path in sorted((PACKAGE / "data").glob("*.py")):
        imported = _imported_modules(path.read_text())
        assert not {m for m in imported if m in ("config", "recipe") or m.startswith("train/")}, (path, imported)


def test_every_folder_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = init.read_text().strip()
        assert doc.startswith('"""') and "imports" in doc.lower(), \
            f"{init}: a docstring saying what it owns and may import"


def test_the_config_reads_no_file_but_the_yaml(tmp_path):
    """load_config of a store recipe whose store does not exist opens the recipe alone (an audit hook on "open",
    after the imports); the data facts, resolved when a run starts, are what read the store and refuse it."""
    missing, recipe = tmp_path / "no-store", REPO / "configs" / "celeba64.yaml"
    code = ("import sys, json, dcgan_dist.recipe as C\n"
            "opened = []\n"
            "sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open' else None)\n"
            f"cfg = C.load_config({str(recipe)!r}, ['data.root={missing}'])\n"
            "print(json.dumps([cfg.data.name, [p for p in opened if not p.endswith(('.py', '.pyc'))]]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["store", [str(recipe)]]
    from dcgan_dist.data.sources import facts
    from dcgan_dist.recipe import load_config

    with pytest.raises(UserError, match=r"is not a prepared store .* dcgan-prepare SOURCE --size S --out"):
        cfg = load_config(str(recipe), [f"data.root={missing}"])
        facts(cfg.data, cfg.model)
