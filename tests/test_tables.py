"""Tables of encoded images as dcgan-prepare sources, written by the real Hugging Face `datasets` library:
a save_to_disk directory and Parquet files give the same store as the same images in a folder; bad rows and
columns are named; celeba is found where torchvision keeps it."""

import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_store import cli, make_folder, one_line_error, prepare

from dcgan_dist.data import store
from dcgan_dist.errors import UserError


def files_of(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def hf_dataset(files, labels, names=("cats", "dogs")):
    """The files' exact bytes as an Image column, with a ClassLabel column."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in files], "label": labels}
    return datasets.Dataset.from_dict(rows, features=features)


def everything(s):
    return s.gather(torch.arange(s.count)), s.gather_labels(torch.arange(s.count))


def test_a_datasets_directory_and_parquet_files_give_the_folders_store(tmp_path):
    folder = make_folder(tmp_path / "images")  # cats/ and dogs/, 6 each, PNG and JPEG of assorted shapes
    files = files_of(folder)
    want = prepare(folder, tmp_path / "from-folder")
    ds = hf_dataset(files, [0] * 6 + [1] * 6)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    (tmp_path / "parquet").mkdir()
    for k in range(2):  # two files, each of several row groups
        ds.shard(2, k, contiguous=True).to_parquet(str(tmp_path / "parquet" / f"train-{k}.parquet"), batch_size=4)
    assert pq.ParquetFile(tmp_path / "parquet" / "train-0.parquet").metadata.num_row_groups == 2
    for source in ("saved", "parquet"):
        for workers in (1, 2):
            out = tmp_path / f"{source}-{workers}"
            got = prepare(tmp_path / source, out, workers=workers)
            assert got.count == 12 and got.manifest["class_names"] == ["cats", "dogs"], got.manifest
            for a, b in zip(everything(got), everything(want)):
                assert torch.equal(a, b), (source, workers)
            assert store.verify_store(out).count == 12


def test_a_row_that_cannot_be_decoded_is_named_or_skipped(tmp_path):
    folder = make_folder(tmp_path / "images", per_class=2)
    files = files_of(folder)
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in files], "label": [0, 0, 1, 1]}
    rows["image"][2] = {"bytes": b"not an image", "path": None}
    table = tmp_path / "t.parquet"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(table))
    with pytest.raises(UserError, match=r"row 2 of .*t\.parquet.*--skip-bad-files"):
        prepare(table, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    got = prepare(table, tmp_path / "out", skip_bad_files=True)
    assert got.count == 3 and got.manifest["skipped"] == ["row 2"]
    assert got.gather_labels(torch.arange(3)).tolist() == [0, 0, 1]


def test_columns_are_chosen_by_name_or_refused_with_the_columns_there(tmp_path):
    folder = make_folder(tmp_path / "images", per_class=2)
    files = files_of(folder)
    plain = datasets.Dataset.from_dict({"picture": [p.read_bytes() for p in files], "y": [3, 1, 0, 2]})
    plain.to_parquet(str(tmp_path / "plain.parquet"))  # a binary column and an integer column, no HF features
    one_line_error(cli(str(tmp_path / "plain.parquet"), "--size", "32", "--out", str(tmp_path / "a")),
                   "has no image column (columns: picture, y)")
    one_line_error(cli(str(tmp_path / "plain.parquet"), "--size", "32", "--out", str(tmp_path / "a"),
                       "--image-column", "pic"), "--image-column 'pic'")
    got = prepare(tmp_path / "plain.parquet", tmp_path / "b", image_column="picture", label_column="y")
    assert got.num_classes == 4 and got.gather_labels(torch.arange(4)).tolist() == [3, 1, 0, 2]
    got = prepare(tmp_path / "plain.parquet", tmp_path / "c", image_column="picture")
    assert got.labels is None  # no column called label(s): unlabelled
    unlabelled = hf_dataset(files, [0, -1, 1, 1])  # datasets' -1: no label
    unlabelled.to_parquet(str(tmp_path / "minus.parquet"))
    one_line_error(cli(str(tmp_path / "minus.parquet"), "--size", "32", "--out", str(tmp_path / "d")),
                   "row 1 of label column 'label' is -1")
    got = prepare(tmp_path / "minus.parquet", tmp_path / "e", label_column="none")
    assert got.count == 4 and got.labels is None
    one_line_error(cli(str(folder), "--size", "32", "--out", str(tmp_path / "f"), "--label-column", "y"),
                   "are for Parquet or Arrow tables")


def test_celeba_is_read_where_torchvision_keeps_it(tmp_path):
    one_line_error(cli("celeba", "--root", str(tmp_path), "--size", "32", "--out", str(tmp_path / "x")),
                   "img_align_celeba")
    make_folder(tmp_path / "faces", per_class=2)
    aligned = tmp_path / "celeba" / "img_align_celeba"
    aligned.mkdir(parents=True)
    for k, p in enumerate(files_of(tmp_path / "faces")):
        shutil.copy(p, aligned / f"{k:06d}{p.suffix}")
    got = prepare("celeba", tmp_path / "store", root=str(tmp_path))
    assert got.count == 4 and got.labels is None
    assert np.array_equal(got.gather(torch.arange(4)).numpy(),
                          prepare(aligned, tmp_path / "direct").gather(torch.arange(4)).numpy())


def test_an_lsun_category_is_read_from_its_lmdb_as_torchvision_keeps_it(tmp_path):
    import lmdb

    one_line_error(cli("lsun:bedroom_train", "--root", str(tmp_path), "--size", "32", "--out", str(tmp_path / "x")),
                   "bedroom_train_lmdb")
    files = files_of(make_folder(tmp_path / "images", per_class=3))
    env = lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=2**26)
    with env.begin(write=True) as txn:  # keys in the folder's order (LMDB iterates keys sorted, as LSUN's ids are)
        for k, p in enumerate(files):
            txn.put(f"{k:040x}".encode(), p.read_bytes())
    env.close()
    got = prepare("lsun:bedroom_train", tmp_path / "store", root=str(tmp_path), workers=2)
    want = prepare(tmp_path / "images", tmp_path / "folder")
    assert got.count == 6 and got.labels is None
    assert torch.equal(got.gather(torch.arange(6)), want.gather(torch.arange(6)))
    one_line_error(cli(str(tmp_path / "bedroom_train_lmdb"), "--size", "32", "--out", str(tmp_path / "y"),
                       "--label-column", "y"), "has no columns to choose")
