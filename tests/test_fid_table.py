"""benchmarks/fid_table.py's aggregation over seeds: mean, sample standard deviation, range, and a plain verdict
against the best published figure."""

import importlib.util

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def fid_table():
    spec = importlib.util.spec_from_file_location("fid_table", REPO / "benchmarks" / "fid_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_aggregate_their_seeds_and_say_whether_they_beat_the_table(fid_table, capsys):
    runs = [{"name": "mnist", "seed": s, "fid": f, "data": "mnist", "protocol": "lucic: ...", "step": 15625,
             "train_minutes": 60.0 + s} for s, f in ((2, 7.0), (0, 5.0), (1, 6.0))]
    runs.append({"name": "fashion", "seed": 0, "fid": 30.0, "data": "fashion_mnist", "protocol": "lucic: ...",
                 "step": 15625, "train_minutes": None, "class_accuracy": 0.9})
    rows = fid_table.aggregate(runs)
    assert rows["mnist"]["fids"] == [5.0, 6.0, 7.0] and rows["mnist"]["seeds"] == [0, 1, 2]
    assert rows["mnist"]["mean"] == pytest.approx(6.0) and rows["mnist"]["sd"] == pytest.approx(1.0)
    assert (rows["mnist"]["min"], rows["mnist"]["max"], rows["mnist"]["train_minutes"]) == (5.0, 7.0, 61.0)
    assert rows["fashion"]["sd"] is None and "class_accuracy" not in rows["fashion"]  # not a _cond row
    fid_table.print_table({"cpu": "a CPU", "rows": rows, "published": fid_table.PUBLISHED})
    out = capsys.readouterr().out
    assert "| this project: mnist | 3 | **6.00** ± 1.00 [5.00, 7.00] |  | 5.00, 6.00, 7.00 | 61 |" in out
    assert "mnist: mean 6.00 over 3 seed(s) is below the best published 6.7" in out
    assert "fashion: mean 30.00 over 1 seed(s) is NOT below the best published 21.5" in out
