"""Tables of encoded images as `dcgan-prepare` sources: Parquet files (as the Hugging Face hub serves datasets)
and Hugging Face `datasets` directories (`save_to_disk`'s Arrow files), read with pyarrow (the optional extra
`pip install 'dcgan_dist[tables]'`; the `datasets` library itself is not needed); and LSUN's LMDB databases as
torchvision reads them (`<root>/<category>_lmdb`, the `lmdb` package of the same extra).

A table holds one image column (an Hugging Face `Image` feature, a struct of encoded `bytes` and a `path`, or a
plain binary column) and optionally an integer label column (a `ClassLabel` feature names its classes). Columns
are found from the Hugging Face features in the files' metadata, else by name (`image`/`img`, `label`/`labels`);
`--image-column`/`--label-column` choose them. Rows are read a Parquet row group at a time, or from a memory-mapped
Arrow file, so a table larger than memory prepares.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dcgan_dist import fileio
from dcgan_dist.errors import UserError

TABLE_SUFFIXES = (".parquet", ".arrow")
IMAGE_NAMES, LABEL_NAMES = ("image", "img"), ("label", "labels")


def table_files(source: Path) -> list[Path]:
    """The Parquet or Arrow files of `source` (a file, or a directory searched recursively; a `save_to_disk`
    directory lists its own in state.json), in order; [] when it has none."""
    if source.is_file():
        return [source] if source.suffix in TABLE_SUFFIXES else []
    state = source / "state.json"
    if state.is_file():
        try:
            return [source / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{state} is not a Hugging Face datasets state file (no _data_files list); point "
                            "the source at the directory save_to_disk wrote") from None
    for suffix in TABLE_SUFFIXES:
        found = sorted(p for p in source.rglob(f"*{suffix}") if p.is_file())
        if found:
            return found
    return []


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
        return pyarrow
    except ImportError:
        raise UserError("reading Parquet or Arrow tables needs pyarrow: pip install 'dcgan_dist[tables]'") from None


@dataclass
class Table:
    """The rows of `files` as one sequence: encoded images, their labels and class names."""
    files: list[Path]
    image_column: str
    label_column: str | None
    class_names: list[str] | None
    parts: list[list[int]]  # per file, the rows of each part (a Parquet row group; an Arrow file is one)
    _open: tuple = (None, None, None)  # (file, part, its rows as a pyarrow table): rows are read in order

    def __len__(self) -> int:
        return sum(map(sum, self.parts))

    def listing(self) -> str:
        return fileio.listing(self.files)  # what identifies a table for a resumed preparation

    def labels(self) -> list[int] | None:
        if self.label_column is None:
            return None
        out: list[int] = []
        for path in self.files:
            column = _whole(path, [self.label_column]).column(self.label_column).to_pylist()
            for row, label in enumerate(column):
                if not isinstance(label, int) or label < 0:
                    raise UserError(f"{path}: row {row} of label column {self.label_column!r} is {label!r}, not a "
                                    "class index >= 0; pass --label-column none to prepare without labels")
            out += column
        return out

    def encoded(self, start: int, stop: int) -> list[tuple[str, bytes | None]]:
        """(name for messages, encoded image or None) of rows [start, stop) of the whole table."""
        out, base = [], 0
        for path, parts in zip(self.files, self.parts):
            row, count = max(start, base) - base, sum(parts)
            while row < min(stop, base + count) - base:
                first = self._part_of(path, parts, row)
                rows = self._open[2].slice(row - first, min(stop - base, first + self._open[2].num_rows) - row)
                out += [(f"row {row + k} of {path}", v.get("bytes") if isinstance(v, dict) else v)
                        for k, v in enumerate(rows.column(self.image_column).to_pylist())]
                row += rows.num_rows
            base += count
        return out

    def _part_of(self, path: Path, parts: list[int], row: int) -> int:
        """The first row of the part of `path` holding `row`, made the open one."""
        first = 0
        for part, rows in enumerate(parts):
            if row < first + rows:
                if self._open[:2] != (path, part):
                    self._open = (path, part, _part(path, part, self.image_column))
                return first
            first += rows
        raise IndexError(row)


@contextmanager
def _reading(path: Path):
    """pyarrow, with any failure to read `path` turned into a one-line UserError."""
    pa = _pyarrow()
    try:
        yield pa
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read table {path}: {e}") from None


def _ipc(path: Path):
    """A reader of an Arrow file, memory-mapped: the IPC file format, or the stream format save_to_disk writes."""
    pa = _pyarrow()
    try:
        return pa.ipc.open_file(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path)))


def _part(path: Path, part: int, column: str):
    """One column of a Parquet row group, or of a whole Arrow file (memory-mapped: read lazily)."""
    if path.suffix != ".parquet":
        return _whole(path, [column])
    with _reading(path) as pa:
        return pa.parquet.ParquetFile(path).read_row_group(part, columns=[column])


def _whole(path: Path, columns: list[str]):
    with _reading(path) as pa:
        if path.suffix == ".parquet":
            return pa.parquet.ParquetFile(path).read(columns=columns)
        return _ipc(path).read_all().select(columns)


def _part_rows(path: Path) -> list[int]:
    """The row count of each row group of a Parquet file; an Arrow file is one part."""
    if path.suffix != ".parquet":
        return [_whole(path, []).num_rows]
    with _reading(path) as pa:
        meta = pa.parquet.ParquetFile(path).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _schema(path: Path):
    with _reading(path) as pa:
        return pa.parquet.read_schema(path) if path.suffix == ".parquet" else _ipc(path).schema


def open_table(source: Path, image_column: str | None = None, label_column: str | None = None) -> Table:
    """The table at `source`. Columns None: found (see the module); label_column "none": no labels."""
    files = table_files(source)
    if not files:
        raise UserError(f"source {source} is not a Parquet (.parquet) or Arrow (.arrow) file" if source.is_file()
                        else f"source {source} holds no Parquet or Arrow files")
    schema = _schema(files[0])
    features = {}
    if schema.metadata and b"huggingface" in schema.metadata:
        features = json.loads(schema.metadata[b"huggingface"]).get("info", {}).get("features", {})
    names = schema.names

    def typed(kind: str) -> list[str]:
        return [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == kind and n in names]

    def pick(given: str | None, kind: str, usual: tuple[str, ...], option: str) -> str | None:
        if given is not None:
            if given not in names:
                raise UserError(f"{option} {given!r}: {files[0]} has no such column (columns: {', '.join(names)})")
            return given
        found = typed(kind) or [n for n in usual if n in names]
        return found[0] if found else None

    image = pick(image_column, "Image", IMAGE_NAMES, "--image-column")
    if image is None:
        raise UserError(f"{files[0]} has no image column (columns: {', '.join(names)}); name it with "
                        "--image-column")
    label = None if label_column == "none" else pick(label_column, "ClassLabel", LABEL_NAMES, "--label-column")
    class_names = features.get(label, {}).get("names") if label else None
    for path in files[1:]:
        missing = [c for c in (image, label) if c and c not in _schema(path).names]
        if missing:
            raise UserError(f"{path} has no column {missing[0]!r}, which {files[0]} has; the files of a source "
                            "must share their columns")
    return Table(files, image, label, class_names, [_part_rows(p) for p in files])


@dataclass
class LmdbTable:
    """An LSUN category: an LMDB database whose values are encoded images, in key order; no labels."""
    path: Path
    keys: list[bytes]
    image_column: str = "value"
    label_column: None = None
    class_names: None = None

    def __len__(self) -> int:
        return len(self.keys)

    def listing(self) -> str:
        return fileio.listing([self.path / "data.mdb"])  # not lock.mdb, which readers elsewhere touch

    def labels(self) -> None:
        return None

    def encoded(self, start: int, stop: int) -> list[tuple[str, bytes | None]]:
        with _lmdb_env(self.path).begin(buffers=False) as txn:
            return [(f"key {k.decode(errors='replace')} of {self.path}", txn.get(k)) for k in self.keys[start:stop]]


_ENVS: dict[Path, object] = {}


def _lmdb_env(path: Path):
    try:
        import lmdb
    except ImportError:
        raise UserError("reading LSUN's LMDB databases needs lmdb: pip install 'dcgan_dist[tables]'") from None
    if path not in _ENVS:  # one environment a process (LMDB allows no more); read-only, no lock file written
        try:
            _ENVS[path] = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as e:
            raise UserError(f"cannot open the LMDB database {path}: {e}") from None
    return _ENVS[path]


def is_lmdb(path: Path) -> bool:
    return path.is_dir() and (path / "data.mdb").is_file()


def open_lmdb(path: Path) -> LmdbTable:
    """An LMDB directory (`data.mdb`) as a table of encoded images in key order."""
    with _lmdb_env(path).begin() as txn:
        keys = list(txn.cursor().iternext(keys=True, values=False))
    return LmdbTable(path, keys)
