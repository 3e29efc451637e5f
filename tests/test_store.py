"""The prepared store: byte-identical and resumable preparation, what a reader refuses, batches identical to the
in-memory path, and a run trained from a store."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, accelerate_launch, assert_ok, env, free_port, run_train, snapshot
from dcgan_dist import checkpoint
from dcgan_dist.config import check_data
from dcgan_dist.data import decode, store
from dcgan_dist.data.batches import InMemoryBatches, StoreBatches
from dcgan_dist.data.prepare import PrepareOptions, prepare_store
from dcgan_dist.data.sources import batch_source, facts, load_dataset
from dcgan_dist.errors import UserError
from dcgan_dist.recipe import load_config

SIZES = [(40, 60), (70, 45), (100, 130), (33, 33)]  # (h, w); 100x130 JPEGs take the draft path at 32


def quiet(message: str) -> None:
    pass


def make_folder(root, per_class=6):
    """Two class sub-folders of random images, PNG and JPEG alternating, of assorted shapes."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = SIZES[i % len(SIZES)]
            ext = "jpg" if (i + c) % 2 else "png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i:02d}.{ext}")
    return root


def prepare(src, out, **kw):
    kw = {"size": 32, "workers": 1, "shard_size": 5, "progress": False, "log": quiet, **kw}
    options = PrepareOptions(**{f.name: kw.pop(f.name) for f in dataclasses.fields(PrepareOptions) if f.name in kw})
    return prepare_store(str(src), out, options=options, **kw)


def cli(*args, script=None):
    entry = [str(REPO / script)] if script else ["-c", "from dcgan_dist.cli import prepare_main; prepare_main()"]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)


def one_line_error(proc, text):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert text in proc.stderr, proc.stderr


# --- preparation ---------------------------------------------------------------------------------------


def test_one_and_two_workers_give_byte_identical_stores_with_labels(tmp_path):
    src = make_folder(tmp_path / "src")
    one = prepare(src, tmp_path / "one", workers=1)
    prepare(src, tmp_path / "two", workers=2)
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "labels.i64", "manifest.json", "shard-00000.u8", "shard-00001.u8", "shard-00002.u8"]
    m = one.manifest
    assert (m["count"], m["channels"], m["image_size"], m["shard_size"]) == (12, 3, 32, 5)
    assert [s["count"] for s in m["shards"]] == [5, 5, 2] and m["source"] == str(src) and m["skipped"] == []
    assert m["class_names"] == ["cats", "dogs"] and one.num_classes == 2
    assert one.labels.tolist() == [0] * 6 + [1] * 6
    raw = np.memmap(tmp_path / "one" / "shard-00001.u8", dtype=np.uint8, mode="r", shape=(5, 3, 32, 32))
    assert np.array_equal(raw, one.gather(range(5, 10)).numpy())  # raw [count, C, S, S], no header
    # the PNGs are exactly what the in-memory image-folder path decodes
    memory = load_dataset("imagefolder", str(src), 32, 3, cache_dir=str(tmp_path / "cache"))[0]
    pngs = [i for i, p in enumerate(decode.list_images(src)) if p.suffix == ".png"]
    assert torch.equal(one.gather(pngs), memory[pngs])
    assert not store.temp_dir(tmp_path / "one").exists()


def test_source_is_read_only_and_unchanged(tmp_path):
    src = make_folder(tmp_path / "src")
    before = snapshot(src)
    subprocess.run(["chmod", "-R", "a-w", str(src)], check=True)
    try:
        prepare(src, tmp_path / "store", workers=2)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(src)], check=True)
    assert snapshot(src) == before
    with pytest.raises(UserError, match="inside the source folder"):
        prepare(src, src / "store")
    assert snapshot(src) == before


def test_a_killed_preparation_resumes_to_a_byte_identical_store(tmp_path):
    src = make_folder(tmp_path / "src", per_class=10)
    prepare(src, tmp_path / "whole", shard_size=4)
    out = tmp_path / "resumed"
    args = [str(src), "--size", "32", "--out", str(out), "--shard-size", "4"]
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/faults/slow_prepare.py"), *args, "--workers", "1"],
                            cwd=REPO, env=env(FAULT_DECODE_DELAY="0.2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = store.temp_dir(out) / "unit-00000.u8.json"
    deadline = time.time() + 120
    while not first.exists():  # a sidecar is written after its unit is fsynced: the unit is finished
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # 16 images (>= 3 s of decoding) are still to come
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    inode = (store.temp_dir(out) / "unit-00000.u8").stat().st_ino
    with pytest.raises(UserError, match="not complete"):  # a store still being written is refused
        store.open_store(out)

    done = cli(*args, "--workers", "2")
    assert_ok(done)
    assert "resuming an interrupted preparation" in done.stdout and "kept from an interrupted run" in done.stdout
    assert snapshot(out) == snapshot(tmp_path / "whole")
    assert (out / "shard-00000.u8").stat().st_ino == inode  # kept, not decoded again
    assert not store.temp_dir(out).exists()


def test_an_interrupted_preparation_with_skipped_files_resumes_identically(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src", per_class=5)
    (src / "cats" / "01b.png").write_bytes(b"not an image")  # the middle of shard 0
    (src / "dogs" / "zz.jpg").write_bytes(b"nor this")  # after the last image
    whole = prepare(src, tmp_path / "whole", shard_size=3, skip_bad_files=True)
    assert whole.count == 10 and whole.manifest["skipped"] == ["cats/01b.png", "dogs/zz.jpg"]
    assert whole.labels.tolist() == [0] * 5 + [1] * 5

    decode_image, calls = decode.decode_image, []

    def dies_at_the_eighth(*args, **kwargs):  # an interrupt: the units finished so far stay
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_image", dies_at_the_eighth)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "resumed", shard_size=3, skip_bad_files=True)
    monkeypatch.setattr(decode, "decode_image", decode_image)
    assert sorted(p.name for p in store.temp_dir(tmp_path / "resumed").glob("*.json")) == [
        "plan.json", "unit-00000.u8.json", "unit-00001.u8.json"]
    prepare(src, tmp_path / "resumed", shard_size=3, skip_bad_files=True)
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "whole")
    # other arguments: the temporary directory of another plan is not reused
    monkeypatch.setattr(decode, "decode_image", dies_at_the_eighth)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "other", shard_size=3, skip_bad_files=True)
    monkeypatch.setattr(decode, "decode_image", decode_image)
    prepare(src, tmp_path / "other", shard_size=4, skip_bad_files=True)
    assert [s["count"] for s in store.open_store(tmp_path / "other").manifest["shards"]] == [4, 4, 2]


def test_bad_files_stop_the_command_or_are_skipped(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    (src / "dogs" / "bad.jpg").write_bytes(b"not an image")
    one_line_error(cli(str(src), "--size", "32", "--out", str(tmp_path / "s"), "--workers", "2"),
                   f"cannot decode image {src / 'dogs' / 'bad.jpg'}")
    assert not (tmp_path / "s").exists()
    proc = cli(str(src), "--size", "32", "--out", str(tmp_path / "s"), "--skip-bad-files")
    assert_ok(proc)
    assert "skipped 1 of 5" in proc.stdout and "data.name=store data.root=" in proc.stdout
    assert store.open_store(tmp_path / "s").manifest["skipped"] == ["dogs/bad.jpg"]


def test_an_existing_store_and_bad_arguments_are_refused(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    out = tmp_path / "s"
    prepare(src, out, channels=1)
    one_line_error(cli(str(src), "--size", "32", "--out", str(out)), "already exists; pass --overwrite")
    prepare(src, out, overwrite=True)
    assert store.open_store(out).channels == 3 and not (tmp_path / ".s.tmp-old").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not a store"):
        prepare(src, tmp_path / "other", overwrite=True)
    with pytest.raises(UserError, match="is neither a folder, a Parquet/Arrow table"):
        prepare(tmp_path / "nothing", tmp_path / "t")
    with pytest.raises(UserError, match=r"mnist5k has 1 channel\(s\), not 3"):
        prepare("mnist5k", tmp_path / "t", channels=3)
    one_line_error(cli(str(src), "--size", "30", "--out", str(tmp_path / "t")), "--size 30")
    one_line_error(cli(str(src), "--out", str(tmp_path / "t")), "give SOURCE, --size and --out")
    assert not (tmp_path / "t").exists()


# --- reading -------------------------------------------------------------------------------------------


def test_verify_names_a_damaged_shard_and_readers_refuse_broken_stores(tmp_path):
    src = make_folder(tmp_path / "src")
    path = tmp_path / "s"
    prepare(src, path)
    proc = cli("--verify", str(path))
    assert_ok(proc)
    assert "12 images, 3x32x32, 3 shard(s), 2 classes; every sha256 matches" in proc.stdout
    shard = path / "shard-00001.u8"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line_error(cli("--verify", str(path)), "shard-00001.u8 is damaged")
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(UserError, match="shard-00001.u8 holds 15359 bytes, manifest.json says 15360"):
        store.open_store(path)
    shard.unlink()
    with pytest.raises(UserError, match="shard-00001.u8 is missing"):
        store.open_store(path)
    manifest = json.loads((path / "manifest.json").read_text())
    outside = [{**manifest["shards"][0], "file": "../../etc/passwd"}, *manifest["shards"][1:]]
    (path / "manifest.json").write_text(json.dumps({**manifest, "shards": outside}))
    with pytest.raises(UserError, match="manifest.json is damaged"):  # nothing outside the store is opened
        store.open_store(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(UserError, match="format_version 2; this dcgan_dist reads up to 1: upgrade"):
        store.open_store(path)
    (path / "manifest.json").unlink()  # shards but no manifest: not a store (or one still being written)
    with pytest.raises(UserError, match="has no manifest.json"):
        store.open_store(path)
    with pytest.raises(UserError, match="is not a prepared store"):
        cfg = load_config(None, ["data.name=store", f"data.root={path}"])
        facts(cfg.data, cfg.model)


def test_the_config_takes_the_store_channels_and_refuses_another_size(tmp_path):
    path = tmp_path / "s"
    prepare("synthetic", path, channels=1, shard_size=100)
    cfg = load_config(None, ["data.name=store", f"data.root={path}", "model.image_size=32"])
    channels = facts(cfg.data, cfg.model).channels
    assert channels == 1 and cfg.model_kwargs(channels)[0]["channels"] == 1  # model.channels=0: the store's
    for extra, error in ((["model.image_size=64"], r"model.image_size = 64 .* holds 32x32 images: set "
                                                   r"model.image_size=32, or prepare a store with --size 64"),
                         (["model.image_size=32", "model.channels=3"], "holds 1-channel images")):
        cfg = load_config(None, ["data.name=store", f"data.root={path}", *extra])
        with pytest.raises(UserError, match=error):
            check_data(cfg, facts(cfg.data, cfg.model))
    with pytest.raises(UserError, match="holds 32x32 images but model.image_size = 64"):
        store.open_store(path, image_size=64)
    with pytest.raises(UserError, match="holds 1-channel images but the config asks for 3"):
        store.open_store(path, channels=3)


# --- batches -------------------------------------------------------------------------------------------


def source(cfg, rank, world_size):
    t = cfg.train
    return batch_source(cfg.data, facts(cfg.data, cfg.model), t.batch_size, t.seed, rank, world_size)


def test_memmap_batches_are_the_in_memory_batches(tmp_path):
    """A store of mnist5k gives, per rank, the very batches (images and labels) mnist5k in memory gives, with
    the same data.num_images subset, across an epoch boundary and after a resume from the saved position."""
    path = tmp_path / "mnist"
    prepare("mnist5k", path, shard_size=64)  # 79 shards: batches gather across several
    common = ["model.image_size=32", "data.num_images=300", "train.batch_size=8", "train.seed=3"]
    cached_cfg = load_config(None, ["data.name=mnist5k", f"data.cache_dir={tmp_path / 'cache'}", *common])
    store_cfg = load_config(None, ["data.name=store", f"data.root={path}", *common])
    images, labels = load_dataset("mnist5k", "data", 32, 1, num_images=300)
    for rank in (0, 1):
        a = InMemoryBatches(images, labels, batch_size=8, rank=rank, world_size=2, seed=3, num_classes=10)
        b, cached = (source(store_cfg, rank, 2),
                     source(cached_cfg, rank, 2))
        assert isinstance(b, StoreBatches) and isinstance(cached, StoreBatches)  # data.name=mnist5k: a store too
        assert torch.equal(next(cached)[0], next(InMemoryBatches(images, labels, 8, rank, 2, 3))[0])
        assert [(s.num_items, s.channels, s.image_size, s.num_classes, s.batches_per_epoch) for s in (a, b)] == [
            (300, 1, 32, 10, 18)] * 2
        assert torch.equal(a.first(16), b.first(16))
        for _ in range(25):  # 18 batches an epoch
            (xa, ya), (xb, yb) = next(a), next(b)
            assert xb.dtype == torch.uint8 and yb.dtype == torch.int64
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        state = b.state_dict()
        assert state == a.state_dict() and b.epoch == 1
        c = source(store_cfg, rank, 2)
        assert c.load_state_dict(state)
        for _ in range(15):
            (xa, ya), (xc, yc) = next(a), next(c)
            assert torch.equal(xa, xc) and torch.equal(ya, yc)
        one = source(store_cfg, 0, 1)  # another world size: the same share of the epoch
        assert not one.load_state_dict(state) and one.state_dict()["position"] == 14


def test_memmap_batches_without_labels_and_without_subset(tmp_path):
    path = tmp_path / "s"
    prepare("synthetic", path, channels=1, shard_size=50)
    images = load_dataset("synthetic", "", 32, 1)[0]  # [512, 1, 32, 32]
    a = InMemoryBatches(images, None, batch_size=16, rank=2, world_size=3, seed=1)
    b = StoreBatches(store.open_store(path, 32, 1), batch_size=16, rank=2, world_size=3, seed=1)
    assert b.num_classes == 0 and b.num_items == 512
    assert torch.equal(load_dataset("store", str(path), 32, 1)[0], images)  # evaluation's reference read of a store
    for _ in range(12):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and ya is None and yb is None


# --- training ------------------------------------------------------------------------------------------


def test_trains_from_a_store(tmp_path):
    path = tmp_path / "store"
    assert_ok(cli("synthetic", "--size", "32", "--channels", "1", "--out", str(path)))
    run = tmp_path / "run"
    proc = run_train("--config", "configs/smoke.yaml", "data.name=store", f"data.root={path}", f"run.dir={run}")
    assert_ok(proc)
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))
    assert meta["step"] == 12 and meta["generator"]["channels"] == 1
    assert meta["config"]["data"]["name"] == "store"


@pytest.mark.slow
def test_two_ranks_train_on_a_folder_whose_first_preparation_outlasts_the_collective_timeout(tmp_path):
    """3,000 images, train.collective_timeout_s=5, and a first preparation slowed to ~10 s: no rank waits for
    another's decode inside a collective (rank 1 waits on the cache's file lock), so the run trains; a second
    run reuses the cached store and decodes nothing."""
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3000):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(src / f"{i:04d}.png")
    args = ["--config", "configs/smoke.yaml", "data.name=imagefolder", f"data.root={src}", "data.num_images=null",
            "model.channels=1", f"data.cache_dir={tmp_path / 'cache'}", "train.collective_timeout_s=5",
            "train.steps=2", "train.checkpoint_every=0"]
    start = time.monotonic()
    proc = accelerate_launch(2, "tests/faults/faulty_train.py", *args, f"run.dir={tmp_path / 'a'}",
                             extra_env={"FAULT_DECODE_DELAY": "0.007"})  # 3000 x 7 ms / 2 workers: 10 s
    assert_ok(proc)
    assert time.monotonic() - start > 15, "the preparation must outlast the 5 s collective timeout"
    assert proc.stdout.count("preparing imagefolder") == 1 and "on imagefolder (3000 images" in proc.stdout
    proc = accelerate_launch(2, "launch/train.py", *args, f"run.dir={tmp_path / 'b'}")
    assert_ok(proc)
    assert "preparing" not in proc.stdout and "on imagefolder (3000 images" in proc.stdout


@pytest.mark.slow
def test_two_ranks_wait_for_one_classifier_outside_any_collective(tmp_path):
    """train.eval_every with no classifier cached yet: one rank trains it (about a minute) while the other waits
    on its file lock, with train.collective_timeout_s=5; both then evaluate with it."""
    run = tmp_path / "run"
    proc = accelerate_launch(2, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run}",
                             "data.name=mnist5k", "model.channels=0", f"data.cache_dir={tmp_path / 'cache'}",
                             "train.collective_timeout_s=5", "train.steps=4", "train.eval_every=4",
                             "train.eval_num=64", "train.checkpoint_every=0", timeout=600)
    assert_ok(proc)
    # rank 0 either trains it or says it waits for the process that does
    assert proc.stdout.count("training one") == 1, proc.stdout
    assert "eval at step 4: classifier/fd" in proc.stdout
    assert len(list((tmp_path / "cache").glob("classifier-mnist5k-*.safetensors"))) == 1


@pytest.mark.slow
def test_two_rank_preparation_equals_one_process_byte_for_byte(tmp_path):
    """`accelerate launch ... dcgan-prepare` (2 ranks) shares the units and gives the very store one process
    gives: a folder with an undecodable file (units re-packed into shards) and a built-in set (units renamed)."""
    src = make_folder(tmp_path / "src", per_class=9)
    (src / "cats" / "03b.png").write_bytes(b"not an image")
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    for source, extra in ((str(src), ["--skip-bad-files"]), ("synthetic", [])):
        one, two = tmp_path / f"one-{len(extra)}", tmp_path / f"two-{len(extra)}"
        assert_ok(cli(source, "--size", "32", "--out", str(one), "--shard-size", "4", "--workers", "1", *extra))
        proc = subprocess.run([str(Path(sys.executable).parent / launch[0]), *launch[1:], "--main_process_port",
                               str(free_port()), str(Path(sys.executable).parent / "dcgan-prepare"), source,
                               "--size", "32", "--out", str(two), "--shard-size", "4", *extra],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert_ok(proc)
        assert "rank 1 of 2:" in proc.stdout and proc.stdout.count("train on it") == 1, proc.stdout
        assert snapshot(two) == snapshot(one)
        assert store.verify_store(two).count == (18 if extra else 512)


def test_gather_reads_the_same_images_from_the_page_cache_and_from_disk(tmp_path):
    """Warm images are copied with non-blocking reads; images evicted from the page cache (posix_fadvise) are
    read by the reader threads: the same bytes either way, in the order asked, across shards."""
    opened = prepare("synthetic", tmp_path / "s", shard_size=100)  # 512 images in 6 shards
    order = torch.randperm(512, generator=torch.Generator().manual_seed(0))[:300]
    warm = opened.gather(order)
    for shard in (tmp_path / "s").glob("shard-*.u8"):
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    cold = store.open_store(tmp_path / "s").gather(order)
    expected = np.concatenate([np.fromfile(p, np.uint8) for p in sorted((tmp_path / "s").glob("shard-*.u8"))])
    assert torch.equal(warm, cold)
    assert torch.equal(warm, torch.from_numpy(expected.reshape(512, 3, 32, 32))[order])
