"""The persistent tier: RocksDB (via rocksdict), holding every row of every table; the source of truth.

Layout: one column family per table; key = the int64 key as 8 big-endian bytes with the sign bit
flipped (so RocksDB's byte order is the keys' numeric order), value = the row's `dim` float32s in
native (little-endian) byte order. The default column family holds each table's metadata under
`table/<name>` as JSON (`dim`, `default`, `rows`), so reopening the directory finds every table.

Durability: every write goes through the WAL; with `sync=True` (the default) a write returns only
after the WAL is fsynced, so an acknowledged update survives a crash of the machine, not only of
the process. Lookups are one batched multi-get per call.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from itertools import islice

import numpy as np
import torch
from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions

from embeddings.tier import TableSpec, Tier, check_keys, check_vectors, keys_to_numpy, last_occurrence

logger = logging.getLogger(__name__)

_META_PREFIX = b"table/"
_JOURNAL_PREFIX = b"redis-dirty/"  # rows a shared Redis may hold stale: table name, then "/" and the key (none: all)
_RUN_ID_PREFIX = b"redis-run-id/"  # the run_id each Redis node last answered (embeddings/redis_guard.py)
_SIGN = np.uint64(1 << 63)


def encode_keys(keys: np.ndarray) -> list[bytes]:
    """8-byte big-endian, sign-flipped encodings of int64 keys (byte order = numeric order)."""
    raw = (keys.astype(np.uint64) ^ _SIGN).astype(">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    return opts


class PersistentTier(Tier):
    """Every row of every table in one RocksDB directory.

    path: the RocksDB directory (created if missing). sync: fsync the WAL before a write returns.
    read_only: open without write access (another process may hold the write lock).
    Thread-safe (RocksDB is; table creation takes a lock).
    """

    name = "persistent"

    def __init__(self, path: str | os.PathLike, sync: bool = True, read_only: bool = False) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.sync = sync
        self._lock = threading.Lock()
        families: list[str] = []
        if os.path.exists(os.path.join(self.path, "CURRENT")):
            families = [f for f in Rdict.list_cf(self.path, Options(raw_mode=True)) if f != "default"]
        access = AccessType.read_only() if read_only else AccessType.read_write()
        self._db = Rdict(self.path, _options(), column_families={f: Options(raw_mode=True) for f in families},
                         access_type=access)
        self._cfs = {f: self._db.get_column_family(f) for f in families}
        self._write_opts = {flag: self._make_write_options(flag) for flag in (False, True)}
        for key, value in self._db.items(from_key=_META_PREFIX):
            if not key.startswith(_META_PREFIX):
                break
            meta = json.loads(value)
            spec = TableSpec(key[len(_META_PREFIX):].decode(), meta["dim"], torch.tensor(meta["default"]), meta["rows"],
                             meta.get("epoch", ""))
            Tier.create_table(self, spec)
        logger.info("persistent tier at %s: tables %s", self.path, sorted(self.tables))

    @staticmethod
    def _make_write_options(sync: bool) -> WriteOptions:
        opts = WriteOptions()
        opts.sync = sync
        return opts

    def create_table(self, spec: TableSpec) -> None:
        """Create the table's column family and persist its metadata; an existing table keeps its own."""
        with self._lock:
            old = self.tables.get(spec.name)
            if old is not None:
                if old.dim != spec.dim:
                    raise ValueError(f"persistent: table {spec.name!r} is stored with dim={old.dim}, asked dim={spec.dim}")
                return
            if spec.name == "default":
                raise ValueError("'default' is RocksDB's own column family: name the table otherwise")
            meta = {"dim": spec.dim, "default": spec.default.tolist(), "rows": spec.rows, "epoch": spec.epoch}
            self._cfs[spec.name] = self._db.create_column_family(spec.name, Options(raw_mode=True))
            self._db.put(_META_PREFIX + spec.name.encode(), json.dumps(meta).encode(), self._write_opts[True])
            super().create_table(spec)

    def set_epoch(self, table: str, epoch: str, rows: int | None = None) -> None:
        """Record the table's new epoch (an import's; see TableSpec) and, if given, its rows, fsynced."""
        with self._lock:
            old = self.spec(table)
            spec = TableSpec(old.name, old.dim, old.default, old.rows if rows is None else rows, epoch)
            meta = {"dim": spec.dim, "default": spec.default.tolist(), "rows": spec.rows, "epoch": epoch}
            self._db.put(_META_PREFIX + table.encode(), json.dumps(meta).encode(), self._write_opts[True])
            self.tables[table] = spec

    def drop_table(self, table: str) -> None:
        """Delete a table, its rows and its metadata (an import that failed before writing any row undoes its table)."""
        with self._lock:
            self.spec(table)
            self._cfs.pop(table, None)
            self._db.drop_column_family(table)
            self._db.delete(_META_PREFIX + table.encode(), self._write_opts[True])
            del self.tables[table]

    def _cf(self, table: str) -> Rdict:
        self.spec(table)
        return self._cfs[table]

    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows stored: vectors [n, dim] and found [n] (CPU tensors), one multi-get; counted as hits and misses."""
        vectors, found = self.read(table, keys)
        hits = int(found.sum())
        self.count(hits=hits, misses=found.numel() - hits)
        return vectors, found

    def read(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`lookup` without counting: the server's own reads (settling rows after an update), not lookups."""
        spec, cf = self.spec(table), self._cf(table)
        k = keys_to_numpy(check_keys(keys))
        values = cf.get(encode_keys(k)) if k.size else []
        found = np.fromiter((v is not None for v in values), dtype=bool, count=k.size)
        out = np.empty((k.size, spec.dim), dtype=np.float32)  # [n, dim]
        out[:] = spec.default.numpy()
        if found.any():
            rows = b"".join(v for v in values if v is not None)
            out[found] = np.frombuffer(rows, dtype=np.float32).reshape(-1, spec.dim)
        return torch.from_numpy(out), torch.from_numpy(found)

    def scan(self, table: str, start: int | None = None, limit: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
        """Up to `limit` stored rows in key order, from key `start` on (None: the first): keys [m] int64 ascending and
        vectors [m, dim] float32; fewer than `limit` only at the table's end. Not counted as lookups."""
        spec, cf = self.spec(table), self._cf(table)
        from_key = encode_keys(np.array([start], dtype=np.int64))[0] if start is not None else None
        items = list(islice(cf.items(from_key=from_key), limit))
        keys = (np.frombuffer(b"".join(k for k, _ in items), dtype=">u8").astype(np.uint64) ^ _SIGN).view(np.int64)
        vectors = np.frombuffer(bytearray().join(v for _, v in items), dtype=np.float32).reshape(-1, spec.dim)  # writable
        return keys, vectors

    def estimated_rows(self, table: str) -> int:
        """RocksDB's estimate of the rows the table stores (exact after a flush with no overwrites)."""
        return int(self._cf(table).property_int_value("rocksdb.estimate-num-keys") or 0)

    def insert(self, table: str, keys: torch.Tensor, vectors: torch.Tensor, sync: bool | None = None) -> None:
        """Write the rows in one atomic batch through the WAL (fsynced if `sync`, default the tier's)."""
        self._write(table, keys, vectors, sync)

    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor, sync: bool | None = None) -> int:
        """The persistent tier holds every row: update is insert. Returns the number of unique keys."""
        return self._write(table, keys, vectors, sync)

    def _write(self, table: str, keys: torch.Tensor, vectors: torch.Tensor, sync: bool | None) -> int:
        spec = self.spec(table)
        keys = check_keys(keys)
        vecs = check_vectors(spec, keys, vectors).cpu().numpy()
        uniq, last_pos = last_occurrence(keys_to_numpy(keys))
        rows = vecs[last_pos]  # [u, dim]
        batch = WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._db.get_column_family_handle(table))
        width = 4 * spec.dim
        raw = rows.tobytes()
        for i, key in enumerate(encode_keys(uniq)):
            batch.put(key, raw[i * width:(i + 1) * width])
        self._db.write(batch, self._write_opts[self.sync if sync is None else sync])
        return int(uniq.size)

    def evict(self, table: str, keys: torch.Tensor, sync: bool | None = None) -> int:
        """Delete the rows from the store (the source of truth: they are gone). Returns the keys held."""
        cf = self._cf(table)
        k = np.unique(keys_to_numpy(check_keys(keys)))
        encoded = encode_keys(k)
        held = sum(v is not None for v in cf.get(encoded)) if encoded else 0
        batch = WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._db.get_column_family_handle(table))
        for key in encoded:
            batch.delete(key)
        self._db.write(batch, self._write_opts[self.sync if sync is None else sync])
        return held

    # -- the Redis tier's journal of rows it may hold stale (embeddings/redis_guard.py) ------------------------
    # One entry a key: `redis-dirty/<table>\0<8-byte key>` = b"k"; one for a whole table: `redis-dirty/<table>\0` = b"t".
    @staticmethod
    def _journal_keys(table: str, keys: np.ndarray | None) -> list[tuple[bytes, bytes]]:
        prefix = _JOURNAL_PREFIX + table.encode() + b"\0"
        if keys is None:
            return [(prefix, b"t")]
        raw = np.asarray(keys, dtype=np.int64).astype("<i8").tobytes()
        return [(prefix + raw[i:i + 8], b"k") for i in range(0, len(raw), 8)]

    def journal_add(self, table: str, keys: np.ndarray | None) -> None:
        """Record, fsynced, that Redis may hold stale rows of `keys` (None: of the whole table), so that a restart
        before Redis is reachable again still deletes them."""
        batch = WriteBatch(raw_mode=True)
        for key, value in self._journal_keys(table, keys):
            batch.put(key, value)
        self._db.write(batch, self._write_opts[True])

    def journal_remove(self, entries: dict[str, np.ndarray | None]) -> None:
        """Forget journal entries once Redis has deleted their rows (None: the table's whole-table entry)."""
        batch = WriteBatch(raw_mode=True)
        for table, keys in entries.items():
            for key, _ in self._journal_keys(table, keys):
                batch.delete(key)
        self._db.write(batch, self._write_opts[True])

    def journal(self) -> dict[str, np.ndarray | None]:
        """Every table's journalled keys (None: the whole table)."""
        keys: dict[str, list[bytes]] = {}
        whole: set[str] = set()
        for key, value in self._db.items(from_key=_JOURNAL_PREFIX):
            if not key.startswith(_JOURNAL_PREFIX):
                break
            rest = key[len(_JOURNAL_PREFIX):]
            if value == b"t":
                whole.add(rest[:-1].decode())
            else:
                keys.setdefault(rest[:-9].decode(), []).append(rest[-8:])
        out: dict[str, np.ndarray | None] = {t: np.frombuffer(b"".join(raw), "<i8").astype(np.int64) for t, raw in keys.items()}
        return {**out, **dict.fromkeys(whole)}

    def redis_run_ids(self) -> dict[str, bytes]:
        """The run_id each Redis node ("host:port") answered when last seen by a server on this database."""
        out = {}
        for key, value in self._db.items(from_key=_RUN_ID_PREFIX):
            if not key.startswith(_RUN_ID_PREFIX):
                break
            out[key[len(_RUN_ID_PREFIX):].decode()] = value
        return out

    def set_redis_run_id(self, node: str, run_id: bytes) -> None:
        """Record, fsynced, the run_id Redis node `node` ("host:port") answers now."""
        batch = WriteBatch(raw_mode=True)
        batch.put(_RUN_ID_PREFIX + node.encode(), run_id)
        self._db.write(batch, self._write_opts[True])

    def flush(self) -> None:
        """Flush memtables to SST files (not needed for durability: the WAL has every write)."""
        self._db.flush()

    def close(self) -> None:
        """Close the database (releases its lock; a later PersistentTier may reopen the directory)."""
        self._cfs.clear()
        self._db.close()
