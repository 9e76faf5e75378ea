"""`turboserve import-embeddings`: load a table's rows from a file into the persistent tier (RocksDB).

Sources, read in chunks so a table larger than memory is fine:
- `.npy`: a 2-D array [rows, dim], memory-mapped; row i is key i.
- `.safetensors`: one 2-D tensor per table; the one named by `--tensor`, else the one named like the table,
  else the file's only tensor. Row i is key i. float16/bfloat16/float64 are converted to float32.
- `.csv`: `key,v0,...,v{dim-1}` per line (layout `keyed`, the default) or `v0,...` with the line's row number
  as the key (layout `ordered`). A first line none of whose fields is a number is a header and skipped (a UTF-8
  byte-order mark is dropped); a first line with a bad value among numbers is an error, as on any other line.
  A key on several lines is imported once, the last line's values winning; the summary says how many repeated.
Every problem raises ImportFailed with a message meant for the user (the CLI prints it, exit status 2).
An import that wrote any row gives the table a new epoch and its new row count however it ends (an error, Ctrl-C):
a shared Redis tier names its keys by epoch, and must not serve rows of the old import for keys now rewritten.
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMATS = ("npy", "safetensors", "csv")
COUNTED_KEYS = 10_000_000  # a keyed CSV of up to this many rows has its repeated keys counted (80 MB of keys)
INT64_MAX = (1 << 63) - 1


class ImportFailed(ValueError):
    """The import cannot go on; the message says why."""


@dataclass
class Source:
    """A table's rows in a file: dim, rows (None if unknown), and the chunks (keys [n] int64, vectors [n, dim] float32)."""

    dim: int
    rows: int | None
    chunks: Iterator[tuple[np.ndarray, np.ndarray]]


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise ImportFailed(f"cannot tell the format of {path} from its suffix; pass --format {'|'.join(FORMATS)}")


def _check_rows(path: Path, shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2 or shape[1] < 1:
        raise ImportFailed(f"{path}: {what} has shape {list(shape)}; a table must be 2-D [rows, dim]")


def read_npy(path: Path, chunk_rows: int) -> Source:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImportFailed(f"{path}: not a readable .npy file ({exc})") from None
    _check_rows(path, array.shape, "the array")
    if array.dtype.kind not in "fiu":
        raise ImportFailed(f"{path}: dtype {array.dtype} is not numeric")

    def chunks():
        for start in range(0, array.shape[0], chunk_rows):
            stop = min(array.shape[0], start + chunk_rows)
            yield np.arange(start, stop, dtype=np.int64), np.array(array[start:stop], dtype=np.float32)

    return Source(int(array.shape[1]), int(array.shape[0]), chunks())


def read_safetensors(path: Path, table: str, tensor: str | None, chunk_rows: int) -> Source:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise ImportFailed(f"{path}: not a readable safetensors file ({exc})") from None
    names = list(handle.keys())
    if tensor is None:
        tensor = table if table in names else names[0] if len(names) == 1 else None
        if tensor is None:
            raise ImportFailed(f"{path} holds {len(names)} tensors and none is named {table!r}; pick one with --tensor "
                               f"({', '.join(sorted(names)[:10])})")
    elif tensor not in names:
        raise ImportFailed(f"{path} has no tensor {tensor!r} (it has {', '.join(sorted(names)[:10])})")
    part = handle.get_slice(tensor)
    shape = tuple(part.get_shape())
    _check_rows(path, shape, f"tensor {tensor!r}")

    def chunks():
        for start in range(0, shape[0], chunk_rows):
            stop = min(shape[0], start + chunk_rows)
            rows = part[start:stop].to(torch.float32).numpy()
            yield np.arange(start, stop, dtype=np.int64), rows

    return Source(int(shape[1]), int(shape[0]), chunks())


def _number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return "_" not in field  # Python reads 1_000; no CSV writer means it


def _header(fields: list[str]) -> bool:
    """A header names its columns: not one of its fields is a number (a typo in a data line is not a header)."""
    return not any(_number(f) for f in fields)


def read_csv(path: Path, layout: str, chunk_rows: int) -> Source:
    """Rows of a CSV file; the first data line fixes dim; a line of another width or a non-number is an error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = sum(1 for _ in f)
            f.seek(0)
            first = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportFailed(f"{path}: cannot read ({exc})") from None
    if first is None:
        raise ImportFailed(f"{path} is empty")
    header = _header(first)
    width = len(first) - (layout == "keyed")
    if width < 1:
        raise ImportFailed(f"{path}: line 1 has {len(first)} fields; the {layout} layout needs "
                           f"{'a key and ' if layout == 'keyed' else ''}at least one value")

    def chunks():
        keys: list[int] = []
        rows: list[list[float]] = []
        at: list[int] = []  # each row's line, to name the first non-finite one
        row_number = 0
        with open(path, newline="", encoding="utf-8-sig") as f:
            for line, fields in enumerate(csv.reader(f), start=1):
                if line == 1 and header or not fields:
                    continue
                if len(fields) != width + (layout == "keyed"):
                    raise ImportFailed(f"{path}: line {line} has {len(fields)} fields, expected {width + (layout == 'keyed')}"
                                       f"{' (key, then dim values)' if layout == 'keyed' else ''}")
                values = fields[1:] if layout == "keyed" else fields
                try:
                    if any("_" in v for v in fields):
                        raise ValueError
                    rows.append([float(v) for v in values])
                except ValueError:
                    raise ImportFailed(f"{path}: line {line} holds a value that is not a number") from None
                if layout == "keyed":
                    try:
                        key = int(fields[0].strip())
                    except ValueError:
                        raise ImportFailed(f"{path}: line {line}: key {fields[0]!r} is not an integer") from None
                    if not -INT64_MAX - 1 <= key <= INT64_MAX:
                        raise ImportFailed(f"{path}: line {line}: key {key} is out of the int64 range")
                    keys.append(key)
                else:
                    keys.append(row_number)
                at.append(line)
                row_number += 1
                if len(rows) == chunk_rows:
                    yield np.asarray(keys, dtype=np.int64), _float32(path, rows, at)
                    keys, rows, at = [], [], []
        if rows:
            yield np.asarray(keys, dtype=np.int64), _float32(path, rows, at)

    return Source(width, max(1, lines - header), chunks())


def _float32(path: Path, rows: list[list[float]], lines: list[int]) -> np.ndarray:
    """The rows as float32 [n, dim]; ImportFailed naming the first line holding NaN or infinity."""
    with np.errstate(over="ignore"):  # a value past float32 becomes inf, refused below with its line
        vectors = np.asarray(rows, dtype=np.float32)
    bad = _first_non_finite(vectors)
    if bad is not None:
        raise ImportFailed(f"{path}: the values on line {lines[bad]} hold NaN or infinity (float32 takes |x| < 3.4e38)")
    return vectors


def _first_non_finite(vectors: np.ndarray) -> int | None:
    """Index of the first row of vectors [n, dim] with a NaN or an infinity; None if every value is finite."""
    bad = ~np.isfinite(vectors).all(axis=1)
    return int(bad.argmax()) if bad.any() else None


def parse_default(text: str | None, dim: int) -> torch.Tensor | None:
    """`--default-vector`: one number (repeated dim times) or dim comma-separated numbers."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ImportFailed(f"--default-vector {text!r} must be a number or {dim} comma-separated numbers") from None
    if len(values) == 1:
        values *= dim
    if len(values) != dim:
        raise ImportFailed(f"--default-vector has {len(values)} values; the table's dim is {dim}")
    default = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(default).all():  # as for every row: a NaN default would answer lookups with nulls
        raise ImportFailed(f"--default-vector {text!r} must be finite float32 numbers (no NaN, no infinity, |x| < 3.4e38)")
    return default


def import_table(db_path: str, table: str, file: str, fmt: str = "auto", tensor: str | None = None,
                 csv_layout: str = "keyed", default_vector: str | None = None, chunk_rows: int = 65536,
                 progress: bool = True) -> str:
    """Import one table; returns the summary line. Rows are written in chunks of chunk_rows (one atomic batch each)."""
    from tqdm import tqdm

    from embeddings.persistent import PersistentTier

    path = Path(file)
    if not path.is_file():
        raise ImportFailed(f"no such file: {path}")
    if not table:
        raise ImportFailed("--table must name a table")
    if table == "default":
        raise ImportFailed("--table default: 'default' is RocksDB's own column family; name the table otherwise")
    fmt = detect_format(path, fmt)
    if fmt == "npy":
        source = read_npy(path, chunk_rows)
    elif fmt == "safetensors":
        source = read_safetensors(path, table, tensor, chunk_rows)
    else:
        source = read_csv(path, csv_layout, chunk_rows)
    default = parse_default(default_vector, source.dim)
    started = time.perf_counter()
    db_path = os.path.expanduser(db_path)
    try:
        tier = PersistentTier(db_path, sync=False)
    except Exception as exc:  # noqa: BLE001 - rocksdict raises a plain Exception (e.g. "IO error: lock ...")
        raise ImportFailed(f"cannot open the embedding store at {db_path}: {exc} (is a server using it? stop it first)") from None
    written, created, touched, finished = 0, False, False, False
    old_rows = 0
    keyed = fmt == "csv" and csv_layout == "keyed"  # the only source whose keys may repeat
    seen: list[np.ndarray] = []  # a keyed CSV's keys, chunk by chunk (8 bytes a row), to count the repeated ones
    seen_rows, repeated = 0, 0
    digest = hashlib.blake2b(digest_size=8)
    try:
        from embeddings.tier import TableSpec

        existing = tier.tables.get(table)
        if existing is not None and existing.dim != source.dim:
            raise ImportFailed(f"table {table!r} is stored with dim {existing.dim}; {path} has rows of dim {source.dim}")
        if existing is None:
            # An empty file (0 rows) still makes a table, sized as one row: a fractional device cache needs rows >= 1.
            tier.create_table(TableSpec(table, source.dim, default, max(1, source.rows or 0)))
            created = True
        else:
            old_rows = existing.rows or 0
            if default is not None and not torch.equal(existing.default, default):
                print(f"turboserve: table {table!r} exists: its stored default vector is kept, --default-vector ignored")
        with tqdm(total=source.rows, unit="rows", unit_scale=(source.rows or 0) >= 10_000, desc=f"importing {table}", disable=not progress) as bar:
            for keys, vectors in source.chunks:
                bad = _first_non_finite(vectors)  # a CSV's reader named the line already; here .npy and .safetensors
                if bad is not None:
                    raise ImportFailed(f"{path}: the values of row {written + bad} hold NaN or infinity "
                                       "(float32 takes |x| < 3.4e38)")
                touched = True  # before the write: an interrupt inside it may leave the batch written
                tier.insert(table, torch.from_numpy(keys), torch.from_numpy(vectors), sync=False)
                digest.update(keys.tobytes())
                digest.update(vectors.tobytes())
                written += len(keys)
                if keyed and seen_rows + len(keys) <= COUNTED_KEYS:
                    seen.append(keys)
                    seen_rows += len(keys)
                elif keyed:  # too many to count in memory: the summary says nothing of repeats
                    seen, keyed = [], False
                bar.update(len(keys))
        tier.flush()  # memtables to SST files: the rows are on disk when the command returns
        finished = True
        if seen:
            repeated = written - np.unique(np.concatenate(seen)).size
    except ImportFailed as exc:
        if written:
            raise ImportFailed(f"{exc}; the {written:,} rows before it were imported") from None
        if created and not touched:  # nothing written: undo the table, so a corrected file (another dim, default) goes in
            tier.drop_table(table)
        raise
    finally:
        try:
            if touched:
                _new_epoch(tier, table, digest, finished, max(old_rows, written - repeated, 1))
        finally:
            tier.close()
    seconds = time.perf_counter() - started
    note = f"; {repeated:,} of them repeated an earlier line's key (the last line wins)" if repeated else ""
    return (f"imported {written:,} rows of dim {source.dim} into table {table!r} at {db_path} "
            f"from {path.name} ({fmt}) in {seconds:.2f} s ({written / max(seconds, 1e-9):,.0f} rows/s){note}")


def _new_epoch(tier, table: str, digest, finished: bool, rows: int) -> None:
    """Give the table a new epoch, so a shared Redis tier keeps nothing of it from before, and its rows.

    A finished import's epoch is the digest of the rows written, in order, and of the previous epoch: the same import
    on every replica's copy gives the same epoch, and the replicas still share Redis. An import that ended early
    (an error, Ctrl-C) gets a random one: it may have written a batch its digest missed, so it shares with nobody.
    rows: what the table holds at least, max(rows before, keys written); the exact count (the union of old and new
    keys) would take a scan of the table, and the two agree for .npy and .safetensors files, whose keys are 0..n-1.
    """
    if not finished:
        digest.update(os.urandom(8))
    digest.update(tier.spec(table).epoch.encode())
    tier.set_epoch(table, digest.hexdigest(), rows)
